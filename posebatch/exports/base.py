"""What every export format is given: one image's result with its upright size, persons chosen.

Why a shared record: the formats differ only in how they spell a person (pixels or percent, v flags
or ``outside``), so reading storage, choosing persons and mapping scores to visibility happen once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from posebatch.exports.skeleton import NAMES
from posebatch.schema import COORD_DECIMALS, PoseResult


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


def persons_of(result: PoseResult, chosen: Iterable[int], threshold: float
               ) -> tuple[Person, ...]:
    """The persons ``chosen`` (indices) of a typed result, keypoints visible from ``threshold``;
    left/top/width/height as the JSON spells them (rounded width, not x2 - x1 again)."""
    out = []
    for i in chosen:
        kps = tuple(Keypoint(n, x, y, s, s >= threshold)
                    for n, (x, y, s) in zip(NAMES, result.kpts[i].tolist(), strict=True))
        x1, y1, x2, y2 = result.boxes_xyxy[i].tolist()
        width, height = (round(v, COORD_DECIMALS) for v in (x2 - x1, y2 - y1))
        out.append(Person(x1, y1, width, height, float(result.box_scores[i]), kps))
    return tuple(out)


class Writer(Protocol):
    """A format: ``add`` is called once per image, in key order; ``close`` finishes the files."""

    def add(self, item: ImageItem) -> None: ...

    def close(self) -> list[str]:
        """Finish writing; return the paths written (for the command's message)."""
        ...
