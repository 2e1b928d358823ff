"""What every export format is given: one image's result with its upright size, persons chosen.

Why a shared record: the formats differ only in how they spell a person (pixels or percent, v flags
or ``outside``), so reading storage, choosing persons and mapping scores to visibility happen once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from posebatch.exports.skeleton import NAMES


@dataclass(frozen=True)
class Keypoint:
    name: str
    x: float
    y: float
    score: float
    visible: bool
    """score >= the export's threshold: scores are not visibilities, this is the documented map."""


@dataclass(frozen=True)
class Person:
    left: float
    top: float
    width: float
    height: float
    score: float
    keypoints: tuple[Keypoint, ...]

    @property
    def num_visible(self) -> int:
        return sum(1 for k in self.keypoints if k.visible)


@dataclass(frozen=True)
class ImageItem:
    """One successfully processed image: its key (relative name), upright size, persons."""

    key: str
    width: int
    height: int
    persons: tuple[Person, ...]


def person_from_api(person: dict[str, Any], threshold: float) -> Person:
    loc = person["location"]
    parts = person["body_parts"]
    kps = tuple(
        Keypoint(n, float(parts[n]["x"]), float(parts[n]["y"]), float(parts[n]["score"]),
                 float(parts[n]["score"]) >= threshold)
        for n in NAMES
    )
    return Person(float(loc["left"]), float(loc["top"]), float(loc["width"]),
                  float(loc["height"]), float(loc["score"]), kps)


class Writer(Protocol):
    """A format: ``add`` is called once per image, in key order; ``close`` finishes the files."""

    def add(self, item: ImageItem) -> None: ...

    def close(self) -> list[str]:
        """Finish writing; return the paths written (for the command's message)."""
        ...
