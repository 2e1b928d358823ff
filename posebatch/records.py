"""Per-image records: what the aggregates need to know about one image, derived from its result.

Why records and not counters: a record is keyed by image, so writing it twice (a redelivered
batch, a retry, a re-submitted job) changes nothing; every count is recomputed from them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from posebatch.errors import INTERNAL_ERROR
from posebatch.schema import PoseResult, person_counts, result_failure
from posebatch.settings import JobSettings

LEGACY_BATCH_PREFIX = "batch "
"""How versions before ``Record.batch_failure`` marked a batch's failure: error 282000 with a
message starting "batch ..." (only ``legacy_batch_failure`` reads it)."""


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
    batch_failure: bool = False
    """The image failed because its whole batch did (abandoned after too many deliveries,
    storage unreachable for too long, retries exhausted, a bug): set by the worker's policy
    (``workers.policy.fail_missing``), never from the message. Such an image may still hold an
    old result and is worth another try: a rerun submits it again (``producer.rerun``), and a
    ``--force`` job with one keeps its output marked unfinished (``posebatch.jobend``)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Record:
        fields = json.loads(text)
        record = cls(**fields)
        if "batch_failure" not in fields:  # written before the flag
            record = replace(record, batch_failure=legacy_batch_failure(
                record.error_code, record.error_msg or ""))
        return record


def record_from_pose(key: str, result: PoseResult, job: JobSettings,
                     size: tuple[int, int] | None = None,
                     numbers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Record:
    """``record_from_result`` of ``result.to_api()``, the same record, from the arrays
    (``numbers``: its ``rounded()``, when the caller has them already)."""
    persons, valid = result.counts(job.valid_kpt_score, job.valid_min_kpts,
                                   job.valid_box_score, numbers=numbers)
    w, h = size if size is not None else (None, None)
    return Record(key, True, None, persons, valid, width=w, height=h)


def legacy_batch_failure(error_code: int | None, error_msg: str) -> bool:
    """Whether a record written before ``Record.batch_failure`` existed (a count table without
    its column, a Redis record of an older worker) was a batch's failure: the one place the old
    "batch " message prefix is read; everything else asks the field."""
    return error_code == INTERNAL_ERROR and error_msg.startswith(LEGACY_BATCH_PREFIX)


def valid_flags(result: PoseResult, job: JobSettings) -> np.ndarray:
    """``(n,)`` bool: the seed's rule with the job's thresholds (more than ``valid_min_kpts``
    keypoints above ``valid_kpt_score``, and a box score above ``valid_box_score``)."""
    return result.valid(job.valid_kpt_score, job.valid_min_kpts, job.valid_box_score)


def record_from_result(key: str, result: dict[str, Any], job: JobSettings,
                       size: tuple[int, int] | None = None) -> Record:
    """Derive the record from the API result itself, so a skipped (already done) image and a
    freshly processed one produce the same record; ``size`` is the upright (width, height)."""
    failure = result_failure(result)
    if failure is not None:
        return Record(key, False, failure.code, 0, 0, failure.message)
    persons, valid = person_counts(result, job.valid_kpt_score, job.valid_min_kpts,
                                   job.valid_box_score)
    w, h = size if size is not None else (None, None)
    return Record(key, True, None, persons, valid, width=w, height=h)
