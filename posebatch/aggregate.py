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

from posebatch.errors import PosebatchError
from posebatch.imagesize import upright_size
from posebatch.records import Record, legacy_batch_failure

SUMMARY_NAME = "_summary.json"
COUNTS_NAME = "_counts.csv"
MAX_REASONS = 50
CSV_COLUMNS = ("key", "status", "error_code", "person_num", "valid_persons", "error_msg",
               "width", "height", "etag", "bytes", "batch_failure")
"""width, height: the upright image's size, empty when unknown (failed images); exports read it.
etag, bytes: the input object's version when its job listed it (empty when unknown: `run`,
older tables); a rerun submits an image again when the listing says otherwise.
batch_failure: ``1`` when the image failed because its whole batch did
(``Record.batch_failure``: a rerun retries it), empty otherwise. Tables written before the
column read through ``legacy_batch_failure`` (their 282000 "batch ..." rows)."""
PREVIOUS_COLUMNS = CSV_COLUMNS[:-1]
"""The columns of tables written before ``batch_failure``: still read by position."""


class Tally:
    """The summary's counts, fed one record at a time: memory independent of the number of
    images (only distinct failure reasons are kept), so a finalize can stream."""

    def __init__(self) -> None:
        self.seen = self.ok = self.persons = self.valid = 0
        self.failed_by_code: Counter[str] = Counter()
        self.reasons: Counter[tuple[int | None, str]] = Counter()
        self.example: dict[tuple[int | None, str], str] = {}
        self.histogram: Counter[int] = Counter()

    def add(self, r: Record) -> None:
        self.seen += 1
        if r.ok:
            self.ok += 1
            self.persons += r.person_num
            self.valid += r.valid_persons
            self.histogram[r.valid_persons] += 1
        else:
            self.failed_by_code[str(r.error_code)] += 1
            reason = (r.error_code, r.error_msg)
            self.reasons[reason] += 1
            self.example[reason] = min(self.example.get(reason, r.key), r.key)

    def summary(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            **meta,
            "images_seen": self.seen,
            "succeeded": self.ok,
            "failed": self.seen - self.ok,
            "failed_by_code": dict(sorted(self.failed_by_code.items())),
            "persons_total": self.persons,
            "valid_persons_total": self.valid,
            "valid_persons_histogram": {str(k): self.histogram[k]
                                        for k in sorted(self.histogram)},
            # Why images failed, most frequent first (all of them are in _counts.csv).
            "failure_reasons": [
                {"error_code": code, "error_msg": msg, "images": n,
                 "example": self.example[(code, msg)]}
                for (code, msg), n in sorted(self.reasons.items(),
                                             key=lambda kv: (-kv[1], kv[0][0] or 0, kv[0][1]))
            ][:MAX_REASONS],
        }


def summarize(records: Iterable[Record], meta: dict[str, Any]) -> dict[str, Any]:
    """Aggregate counts; ``meta`` (job id, model, settings, ...) is copied in first."""
    tally = Tally()
    for r in records:
        tally.add(r)
    return tally.summary(meta)


def csv_row(r: Record) -> list[Any]:
    return [r.key, "ok" if r.ok else "error", r.error_code or "", r.person_num,
            r.valid_persons, r.error_msg, _blank(r.width), _blank(r.height), r.etag or "",
            _blank(r.nbytes), "1" if r.batch_failure else ""]


def counts_csv(records: Iterable[Record]) -> bytes:
    """The per-image count table, sorted by key, UTF-8 with BOM so spreadsheets detect it."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for r in sorted(records, key=lambda rec: rec.key):
        writer.writerow(csv_row(r))
    return ("\ufeff" + buf.getvalue()).encode("utf-8")


def _blank(value: int | None) -> int | str:
    return "" if value is None else value


def summary_json(summary: dict[str, Any]) -> bytes:
    return (json.dumps(summary, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


HEADER_READS = (64 * 2**10, 2**20)
"""Bytes of an image read (ranged GET) to find its size: 64 KiB hold the header of every
JPEG, PNG and BMP but those with huge EXIF/ICC blocks before the frame header; 1 MiB then."""


def header_size(src: Any, key: str) -> tuple[int, int] | None:
    """The image's upright size from its first bytes only (``Storage.peek``: a ranged GET),
    never the whole object; None when it cannot be told (gone, unreadable, no image)."""
    for n in HEADER_READS:
        try:
            head = src.peek(key, n)
        except (PosebatchError, OSError):  # gone or unreadable since
            return None
        try:
            return upright_size(head)
        except (OSError, SyntaxError, ValueError):  # cut before the frame header, or no image
            if len(head) < n:
                return None  # that was the whole object
    return None


def with_header_size(r: Record, src: Any) -> Record:
    """A record of an image skipped because its result exists carries no size; when no earlier
    table had it (a worker died after writing results but before recording them, so its batch was
    redelivered and skipped them; a watch job's own table) it is read from the image's header,
    a ranged GET of its first 64 KiB: a 12 MP photo is never downloaded for its size."""
    if not r.ok or r.width is not None or src is None:
        return r
    size = header_size(src, r.key)
    return r if size is None else replace(r, width=size[0], height=size[1])


# Fields of the summary that describe one run rather than the results; comparisons ignore them.
RUN_FIELDS = ("job_id", "created", "finished", "input", "output")


def records_from_counts_csv(data: bytes) -> list[Record]:
    """Read a ``_counts.csv`` back into records (the inverse of ``counts_csv``)."""
    rows = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    return [row_record(r) for r in rows]


def row_record(r: dict[str, str]) -> Record:
    """One row of a ``_counts.csv`` (older tables have no width/height, etag/bytes or
    batch_failure columns; a row without the last reads it from the old message prefix)."""
    w, h, n = r.get("width") or "", r.get("height") or "", r.get("bytes") or ""
    code = int(r["error_code"]) if r["error_code"] else None
    flag = r.get("batch_failure")
    return Record(r["key"], r["status"] == "ok", code,
                  int(r["person_num"]), int(r["valid_persons"]), r["error_msg"],
                  int(w) if w.isdigit() else None, int(h) if h.isdigit() else None,
                  r.get("etag") or None, int(n) if n.isdigit() else None,
                  legacy_batch_failure(code, r["error_msg"]) if flag is None else flag == "1")
