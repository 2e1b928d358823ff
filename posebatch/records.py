"""Per-image records: what the aggregates need to know about one image, derived from its result.

Why records and not counters: a record is keyed by image, so writing it twice (a redelivered
batch, a retry, a re-submitted job) changes nothing; every count is recomputed from them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from posebatch.settings import JobSettings


@dataclass(frozen=True)
class Record:
    """What the aggregates need to know about one image."""

    key: str
    ok: bool
    error_code: int | None
    person_num: int
    valid_persons: int
    error_msg: str = ""
    width: int | None = None
    """Upright image size in pixels, recorded when the image is processed (None when unknown:
    the image failed, or the record predates sizes), so exports never decode images again."""
    height: int | None = None
    etag: str | None = None
    """The input object's ETag (a folder: ``mtime:<ns>``) and size in bytes when it was listed
    for the job that recorded this; a rerun compares them with the listing to find images
    replaced since (``producer.rerun``). None when not known (a local run, older tables)."""
    nbytes: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Record:
        return cls(**json.loads(text))


def is_valid_person(person: dict[str, Any], job: JobSettings) -> bool:
    """The seed's rule: more than N keypoints above a score, and a box above a score."""
    confident = sum(
        1 for part in person["body_parts"].values() if part["score"] > job.valid_kpt_score
    )
    return confident > job.valid_min_kpts and person["location"]["score"] > job.valid_box_score


def record_from_result(key: str, result: dict[str, Any], job: JobSettings,
                       size: tuple[int, int] | None = None) -> Record:
    """Derive the record from the API result itself, so a skipped (already done) image and a
    freshly processed one produce the same record; ``size`` is the upright (width, height)."""
    if "error_code" in result:
        return Record(key, False, int(result["error_code"]), 0, 0, str(result["error_msg"]))
    persons = result["person_info"]
    valid = sum(1 for p in persons if is_valid_person(p, job))
    w, h = size if size is not None else (None, None)
    return Record(key, True, None, int(result["person_num"]), valid, width=w, height=h)
