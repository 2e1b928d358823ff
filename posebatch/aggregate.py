"""The job aggregates (``_summary.json``, ``_counts.csv``), recomputed from per-image records.

Why recomputed and not counted: a batch may run twice (redelivery after a worker dies, a retry,
a re-submitted job). Records are keyed by image (``posebatch.records``), so the aggregates built
from the set of records are exact by construction.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from posebatch.errors import PosebatchError, StorageNotFound
from posebatch.imagesize import upright_size
from posebatch.records import Record

SUMMARY_NAME = "_summary.json"
COUNTS_NAME = "_counts.csv"
MAX_REASONS = 50
CSV_COLUMNS = ("key", "status", "error_code", "person_num", "valid_persons", "error_msg",
               "width", "height")
"""width, height: the upright image's size, empty when unknown (failed images); exports read it."""


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
                         r.valid_persons, r.error_msg, _blank(r.width), _blank(r.height)])
    return ("\ufeff" + buf.getvalue()).encode("utf-8")


def _blank(value: int | None) -> int | str:
    return "" if value is None else value


def summary_json(summary: dict[str, Any]) -> bytes:
    return (json.dumps(summary, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def write_aggregates(dst: Any, records: list[Record], meta: dict[str, Any],
                     prefix: str = "", src: Any = None) -> dict[str, Any]:
    """Write ``_counts.csv`` then ``_summary.json`` (the summary last: its presence means both
    are complete) to storage ``dst``; return the summary. ``src`` (the job's input) fills the
    sizes no earlier count table knows."""
    summary = summarize(records, meta)
    records = keep_known_sizes(dst, records, prefix, src)
    dst.write(prefix + COUNTS_NAME, counts_csv(records), "text/csv")
    dst.write(prefix + SUMMARY_NAME, summary_json(summary), "application/json")
    return summary


def keep_known_sizes(dst: Any, records: list[Record], prefix: str = "",
                     src: Any = None) -> list[Record]:
    """Fill the sizes that records of skipped images lack: from the count table being replaced,
    else (with ``src``) from the image's header.

    An image skipped because its result exists was not decoded in this run; its size was
    recorded by the run that processed it, in the previous ``_counts.csv``, unless that run never
    wrote one: a worker that died after writing results but before recording them (its batch
    is redelivered and skips them). Those few are read from the input; no pixel is decoded.
    """
    missing = {r.key for r in records if r.ok and r.width is None}
    if not missing:
        return records
    sizes: dict[str, tuple[int, int]] = {}
    try:
        old = dst.read(prefix + COUNTS_NAME).decode("utf-8-sig")
    except (StorageNotFound, UnicodeDecodeError):
        old = ""
    for row in csv.DictReader(io.StringIO(old, newline="")):
        if row.get("key") in missing and (row.get("width") or "").isdigit() and (
                row.get("height") or "").isdigit():
            sizes[row["key"]] = (int(row["width"]), int(row["height"]))
    if src is not None:
        for key in sorted(missing - sizes.keys()):
            size = _header_size(src, key)
            if size is not None:
                sizes[key] = size
    return [replace(r, width=sizes[r.key][0], height=sizes[r.key][1])
            if r.width is None and r.key in sizes else r for r in records]


def _header_size(src: Any, key: str) -> tuple[int, int] | None:
    try:
        return upright_size(src.read(key))
    except (PosebatchError, OSError):  # gone or unreadable since: the size stays unknown
        return None


# Fields of the summary that describe one run rather than the results; comparisons ignore them.
RUN_FIELDS = ("job_id", "created", "finished", "input", "output")
