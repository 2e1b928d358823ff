"""Per-image records and the job aggregates built from them.

Why records and not counters: a batch may run twice (redelivery after a worker dies, a retry, a
re-submitted job). A record is keyed by image, so writing it twice changes nothing, and every
aggregate is recomputed from the set of records: exact by construction.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from posebatch.settings import JobSettings

SUMMARY_NAME = "_summary.json"
COUNTS_NAME = "_counts.csv"
RESULT_SUFFIX = ".json"
MAX_REASONS = 50
CSV_COLUMNS = ("key", "status", "error_code", "person_num", "valid_persons", "error_msg")


@dataclass(frozen=True)
class Record:
    """What the aggregates need to know about one image."""

    key: str
    ok: bool
    error_code: int | None
    person_num: int
    valid_persons: int
    error_msg: str = ""

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


def record_from_result(key: str, result: dict[str, Any], job: JobSettings) -> Record:
    """Derive the record from the API result itself, so a skipped (already done) image and a
    freshly processed one produce the same record."""
    if "error_code" in result:
        return Record(key, False, int(result["error_code"]), 0, 0, str(result["error_msg"]))
    persons = result["person_info"]
    valid = sum(1 for p in persons if is_valid_person(p, job))
    return Record(key, True, None, int(result["person_num"]), valid)


def result_key(image_key: str) -> str:
    """``a/b.jpg`` -> ``a/b.jpg.json``: the image's own name plus ``.json``."""
    return image_key + RESULT_SUFFIX


def summarize(records: Iterable[Record], meta: dict[str, Any]) -> dict[str, Any]:
    """Aggregate counts; ``meta`` (job id, model, settings, ...) is copied in first."""
    seen = ok = persons = valid = 0
    failed_by_code: Counter[str] = Counter()
    reasons: Counter[tuple[int | None, str]] = Counter()
    example: dict[tuple[int | None, str], str] = {}
    histogram: Counter[int] = Counter()
    for r in records:
        seen += 1
        if r.ok:
            ok += 1
            persons += r.person_num
            valid += r.valid_persons
            histogram[r.valid_persons] += 1
        else:
            failed_by_code[str(r.error_code)] += 1
            reason = (r.error_code, r.error_msg)
            reasons[reason] += 1
            example[reason] = min(example.get(reason, r.key), r.key)
    return {
        **meta,
        "images_seen": seen,
        "succeeded": ok,
        "failed": seen - ok,
        "failed_by_code": dict(sorted(failed_by_code.items())),
        "persons_total": persons,
        "valid_persons_total": valid,
        "valid_persons_histogram": {str(k): histogram[k] for k in sorted(histogram)},
        # Why images failed, most frequent first (all of them are in _counts.csv).
        "failure_reasons": [
            {"error_code": code, "error_msg": msg, "images": n, "example": example[(code, msg)]}
            for (code, msg), n in sorted(reasons.items(),
                                         key=lambda kv: (-kv[1], kv[0][0] or 0, kv[0][1]))
        ][:MAX_REASONS],
    }


def counts_csv(records: Iterable[Record]) -> bytes:
    """The per-image count table, sorted by key, UTF-8 with BOM so spreadsheets detect it."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for r in sorted(records, key=lambda rec: rec.key):
        writer.writerow([r.key, "ok" if r.ok else "error", r.error_code or "", r.person_num,
                         r.valid_persons, r.error_msg])
    return ("\ufeff" + buf.getvalue()).encode("utf-8")


def summary_json(summary: dict[str, Any]) -> bytes:
    return (json.dumps(summary, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def write_aggregates(dst: Any, records: list[Record], meta: dict[str, Any],
                     prefix: str = "") -> dict[str, Any]:
    """Write ``_counts.csv`` then ``_summary.json`` (the summary last: its presence means both
    are complete) to storage ``dst``; return the summary."""
    summary = summarize(records, meta)
    dst.write(prefix + COUNTS_NAME, counts_csv(records), "text/csv")
    dst.write(prefix + SUMMARY_NAME, summary_json(summary), "application/json")
    return summary


# Fields of the summary that describe one run rather than the results; comparisons ignore them.
RUN_FIELDS = ("job_id", "created", "finished", "input", "output")
