"""An output's root tables: a compacted base plus an index of the per-job tables written since.

Why: every job writing into an output's root used to download the whole root ``_counts.csv``,
merge-join it with its own rows and upload it again (~13 s per 1M earlier rows; 100M rows: 4.7
GB down and up, ~15 min per job). Here, as in an LSM tree, a job end writes only its own
``_jobs/<job id>/_counts.csv`` + ``_summary.json`` and then a small index, ``_tables.json``;
earlier rows are not read. Cost: O(job) + O(index).

The layout of an output's root:

- ``_counts.csv`` / ``_summary.json``: the *base*: every image's row as of the last compaction,
  and the summary of those rows (with the newest compacted job's meta, as before).
- ``_jobs/<job id>/_counts.csv``: each job's own rows (sorted by key), kept forever.
- ``_tables.json``: the index: the per-job tables not compacted into the base yet ("pending"),
  oldest first, with their row counts and their job's meta. Written last, under the output's
  lock (``jobstate.JobStore.output_lock``, held by ``posebatch.jobend``): its presence and
  content say which tables count.

The current rows of an output are the base and the pending tables merged (``current_rows``):
a heap merge of sorted files, newest row of a key winning; an ``ok`` row that lacks a size or an
input version takes it from the row it replaces (a skipped image, whose result existed: the rule
the merging finalize had). Memory is one row per table. Every reader of an output's rows uses it
(exports, report, recount's sizes, reruns, `run`'s sizes).

A *compaction* (``compact``) writes that merged view as the new base and empties the index; an
``ok`` row that still has no size (a skipped image no table knew) has it read from its header
in the job's input (``with_header_size``: a ranged GET of 64 KiB) there, once, so a job end
never reads an image. At a
job end it runs when the pending rows reach ``1 / COMPACT_RATIO`` of the base, or when more than
``MAX_PENDING`` tables are pending (readers download each), or when there is no base yet (the
first job): a row is rewritten O(1) times amortized (at most ``COMPACT_RATIO + 1`` rows written
per row added). ``posebatch compact OUTPUT`` does it on demand. It runs under the output's lock,
which a timer thread renews (``RenewedLock``), as is the job's finalize lock, through the long
download, merge and upload: job ends into the same output wait meanwhile.

Between compactions the root ``_summary.json`` counts the base only; its ``pending`` list names
the tables not in it (with their own counts, which may overlap the base). Exact current totals:
``posebatch compact OUTPUT`` (writes them), or ``current_summary`` (tallies the merged view).

Crash safety: the merge is idempotent (merging a table already in the base again changes no
row), so a compaction killed after its base and before its index leaves a correct output; a
job end killed before its index leaves its rows out until it is finalized again (it is: the
job is not ``done``). Outputs of older versions (a root ``_counts.csv``, no index) read as a base
with nothing pending; ``run`` and ``recount`` replace the base and empty an existing index.
"""

from __future__ import annotations

import csv
import heapq
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from posebatch.aggregate import (
    COUNTS_NAME,
    CSV_COLUMNS,
    PREVIOUS_COLUMNS,
    SUMMARY_NAME,
    Tally,
    csv_row,
    row_record,
    summarize,
    summary_json,
    with_header_size,
)
from posebatch.errors import ConfigError, StorageNotFound
from posebatch.records import Record, legacy_batch_failure
from posebatch.storage import LocalStorage, open_storage

INDEX_NAME = "_tables.json"
INDEX_FORMAT = 1
COMPACT_RATIO = 8
"""Compact at a job end once the pending rows reach base rows / this."""
MAX_PENDING = 32
"""Compact at a job end once more tables than this are pending (each reader downloads each)."""
PROGRESS_EVERY = 50_000
JOBS_FOLDER = "_jobs/"

Check = Callable[[], None]
TablesLock = Callable[[], AbstractContextManager[Check]]
"""Makes the context that holds an output's tables lock; it gives a check that raises once the
lock was lost."""


def no_lock() -> AbstractContextManager[Check]:
    """For one writer only (a local folder no job finishes into, tests)."""
    return nullcontext(lambda: None)


def iter_counts_csv(path: Path | str) -> Iterator[Record]:
    """Stream a ``_counts.csv`` (sorted by key, as written) back as records. A table with
    today's columns, or those before ``batch_failure``, is read by position (no dict per row:
    ~2x faster on 10M-row tables)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            return
        header = tuple(header)
        if header not in (CSV_COLUMNS, PREVIOUS_COLUMNS):  # older (no width/height, etag/bytes)
            for row in rows:
                yield row_record(dict(zip(header, row, strict=False)))
            return
        width = len(header)
        flagged = header == CSV_COLUMNS
        for row in rows:
            if len(row) != width:  # a short row (blank trailing fields cut): as DictReader did
                yield row_record({k: v or "" for k, v in zip(header, row, strict=False)})
                continue
            if flagged:
                key, status, code, persons, valid, msg, w, h, etag, n, flag = row
                batch = flag == "1"
            else:
                key, status, code, persons, valid, msg, w, h, etag, n = row
                batch = bool(code) and legacy_batch_failure(int(code), msg)
            yield Record(key, status == "ok", int(code) if code else None, int(persons),
                         int(valid), msg, int(w) if w.isdigit() else None,
                         int(h) if h.isdigit() else None, etag or None,
                         int(n) if n.isdigit() else None, batch)


class Table:
    """One ``_counts.csv`` being written to a local file, and its summary being tallied."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115
        self.file.write("\ufeff")  # UTF-8 with BOM so spreadsheets detect it
        self.writer = csv.writer(self.file, lineterminator="\r\n")
        self.writer.writerow(CSV_COLUMNS)
        self.tally = Tally()

    def add(self, r: Record) -> None:
        self.writer.writerow(csv_row(r))
        self.tally.add(r)

    def publish(self, dst: Any, prefix: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Upload the table, then the summary (last: its presence means both are complete)."""
        self.file.close()
        dst.upload(prefix + COUNTS_NAME, str(self.path), "text/csv")
        summary = self.tally.summary(meta)
        dst.write(prefix + SUMMARY_NAME, summary_json(summary), "application/json")
        return summary


@dataclass(frozen=True)
class Pending:
    """A per-job table not compacted into the base yet."""

    job_id: str
    rows: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def counts(self) -> str:
        return f"{JOBS_FOLDER}{self.job_id}/{COUNTS_NAME}"


@dataclass(frozen=True)
class Index:
    """``_tables.json``; ``base_rows`` None: not known (no index: an older output, or none)."""

    base_rows: int | None = None
    pending: tuple[Pending, ...] = ()
    exists: bool = False

    def to_json(self) -> bytes:
        return (json.dumps({
            "format": INDEX_FORMAT, "base": COUNTS_NAME, "base_rows": self.base_rows,
            "pending": [{"job_id": p.job_id, "counts": p.counts, "rows": p.rows, "meta": p.meta}
                        for p in self.pending],
        }, ensure_ascii=False, indent=1) + "\n").encode("utf-8")


def read_index(dst: Any) -> Index:
    try:
        data = json.loads(dst.read(INDEX_NAME))
    except StorageNotFound:
        return Index()
    except ValueError as err:
        raise ConfigError(f"{dst.join(INDEX_NAME)} is not JSON ({err}): restore it, or delete it "
                          "and run `posebatch recount` to rebuild the root tables") from err
    if data.get("format", 0) > INDEX_FORMAT:
        raise ConfigError(f"{dst.join(INDEX_NAME)} was written by a newer posebatch (format "
                          f"{data['format']}): upgrade posebatch to read this output")
    pending = tuple(Pending(str(p["job_id"]), int(p["rows"]), p.get("meta") or {})
                    for p in data.get("pending", []))
    for p in pending:  # the index names files to read: never one outside _jobs/<job id>/
        if not p.job_id or "/" in p.job_id or p.job_id in (".", ".."):
            raise ConfigError(f"{dst.join(INDEX_NAME)} lists a job id {p.job_id!r} that is not "
                              "a folder name under _jobs/: restore the file, or delete it and "
                              "run `posebatch recount OUTPUT`")
    return Index(data.get("base_rows"), pending, exists=True)


def write_index(dst: Any, index: Index) -> None:
    dst.write(INDEX_NAME, index.to_json(), "application/json")  # atomic: one PUT / a rename


def base_rows(dst: Any, index: Index) -> int:
    """Rows in the base: from the index, else (an older output) its summary; 0: no base."""
    if index.base_rows is not None:
        return index.base_rows
    try:
        return int(json.loads(dst.read(SUMMARY_NAME)).get("images_seen", 0))
    except (StorageNotFound, ValueError):
        return 0 if not dst.exists(COUNTS_NAME) else 1


def has_tables(dst: Any) -> bool:
    """Whether any job's rows are in the output's root tables (what makes a submit a rerun)."""
    return dst.exists(COUNTS_NAME) or bool(read_index(dst).pending)


def should_compact(base: int, pending: Sequence[Pending]) -> bool:
    rows = sum(p.rows for p in pending)
    return base == 0 or rows * COMPACT_RATIO >= base or len(pending) > MAX_PENDING


def carried(r: Record, old: Record) -> Record:
    """``r`` replacing ``old``: an ok record of a skipped image keeps the size and version the
    replaced row knew (its image was not decoded, its listing may not have been seen)."""
    if r.ok and r.width is None and old.width is not None:
        r = replace(r, width=old.width, height=old.height)
    if r.ok and r.etag is None and old.etag is not None:
        r = replace(r, etag=old.etag, nbytes=old.nbytes)
    return r


def merged(tables: Sequence[Iterable[Record]]) -> Iterator[tuple[Record, int]]:
    """(row, the table it came from) for every key of ``tables`` (each sorted by key, oldest
    first), in key order: the newest table's row wins, carrying from the rows it replaces."""
    if len(tables) == 1:  # a compacted output: no heap, no fold
        yield from ((r, 0) for r in tables[0])
        return
    tagged = [_tagged(t, age) for age, t in enumerate(tables)]
    group: list[Record] = []
    newest = 0
    for key, neg_age, r in heapq.merge(*tagged):  # (key, -age) is unique: records never compared
        if group and key != group[0].key:
            yield _fold(group), newest
            group = []
        if not group:
            newest = -neg_age
        group.append(r)
    if group:
        yield _fold(group), newest


def _tagged(table: Iterable[Record], age: int) -> Iterator[tuple[str, int, Record]]:
    for r in table:
        yield r.key, -age, r


def _fold(group: list[Record]) -> Record:
    """The rows of one key, newest first, folded oldest to newest (as successive merges did)."""
    out = group[-1]
    for r in reversed(group[:-1]):
        out = carried(r, out)
    return out


def merge_newest(tables: Sequence[Iterable[Record]]) -> Iterator[Record]:
    return (r for r, _ in merged(tables))


def _fetch(dst: Any, keys: Sequence[str], work: Path, required: Sequence[bool]) -> list[str]:
    """Local paths of ``keys`` (downloaded unless ``dst`` is a local folder); a missing optional
    one (the base of an output with none yet) is left out."""
    paths: list[str] = []
    for n, (key, needed) in enumerate(zip(keys, required, strict=True)):
        if isinstance(dst, LocalStorage):  # read in place (the real name: _path checks it)
            path = dst._path(key)
            if not Path(path).is_file():
                if needed:
                    _missing(dst, key)
                continue
            paths.append(path)
            continue
        path = str(work / f"table-{n:04d}.csv")
        try:
            dst.download(key, path)
        except StorageNotFound:
            if needed:
                _missing(dst, key)
            continue
        paths.append(path)
    return paths


def _missing(dst: Any, key: str) -> None:
    raise ConfigError(f"{dst.join(key)} is listed in {dst.join(INDEX_NAME)} but missing: "
                      "restore it, or run `posebatch recount OUTPUT` to rebuild the root tables "
                      "from the results")


@contextmanager
def current_rows(dst: Any, index: Index | None = None) -> Iterator[Iterator[Record]]:
    """The output's current rows (base + pending, newest wins), sorted by key, streamed; a
    context manager because the tables are downloaded to a temporary folder first."""
    index = read_index(dst) if index is None else index
    with tempfile.TemporaryDirectory(prefix="posebatch-tables-") as tmp:
        paths = _fetch(dst, [COUNTS_NAME, *(p.counts for p in index.pending)], Path(tmp),
                       [False, *(True for _ in index.pending)])
        yield merge_newest([iter_counts_csv(p) for p in paths])


def current_summary(dst: Any) -> dict[str, Any]:
    """The root summary with exact counts of the current rows (tallied over the merged view,
    nothing written); the stored summary itself when nothing is pending."""
    summary = json.loads(dst.read(SUMMARY_NAME))
    index = read_index(dst)
    if not index.pending:
        return summary
    with current_rows(dst, index) as rows:
        exact = summarize(rows, {**_meta(summary), **index.pending[-1].meta})
    return exact


def _meta(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary without its counts and pending list: the job's meta."""
    counted = set(Tally().summary({})) | {"pending", "earlier_results", "counts_cover"}
    return {k: v for k, v in summary.items() if k not in counted}


def compact(dst: Any, index: Index | None = None, on_progress: Check = lambda: None
            ) -> dict[str, Any]:
    """Write the current rows as the new base (``_counts.csv``, then ``_summary.json``), then an
    empty index; return the new root summary. Call it holding the output's tables lock."""
    index = read_index(dst) if index is None else index
    if not index.pending:
        try:
            return json.loads(dst.read(SUMMARY_NAME))
        except StorageNotFound:
            pass  # no base and nothing pending: an empty one
    with tempfile.TemporaryDirectory(prefix="posebatch-compact-") as tmp:
        work = Path(tmp)
        paths = _fetch(dst, [COUNTS_NAME, *(p.counts for p in index.pending)], work,
                       [False, *(True for _ in index.pending)])
        on_progress()
        newest = len(paths) - 1
        first_pending = len(paths) - len(index.pending)  # 1 with a base, 0 without
        inputs: dict[str, Any] = {}
        base = Table(work / "base.csv")
        kept = 0
        for n, (r, source) in enumerate(merged([iter_counts_csv(p) for p in paths]), 1):
            if r.ok and r.width is None and source >= first_pending:
                r = with_header_size(r, _input_of(index.pending[source - first_pending],
                                                  inputs))
            base.add(r)
            if source != newest:
                kept += 1
            if n % PROGRESS_EVERY == 0:
                on_progress()
        on_progress()
        meta = dict(index.pending[-1].meta) if index.pending else {}
        if not meta:
            try:
                meta = _meta(json.loads(dst.read(SUMMARY_NAME)))
            except (StorageNotFound, ValueError):
                meta = {}
        if kept and index.pending:
            meta["earlier_results"] = kept
        summary = base.publish(dst, "", meta)
    on_progress()
    write_index(dst, Index(base.tally.seen, ()))
    return summary


def _input_of(p: Pending, opened: dict[str, Any]) -> Any:
    """The storage of the job's input (None if unknown or unreachable): where the size of a
    skipped image no table knows is read from its header (a ranged GET, never the image)."""
    url = p.meta.get("input")
    if not url:
        return None
    if url not in opened:
        try:
            opened[url] = open_storage(url)
        except (ConfigError, OSError):
            opened[url] = None
    return opened[url]


def add_job(dst: Any, job_id: str, rows: int, meta: dict[str, Any],
            tables_lock: TablesLock = no_lock, on_progress: Check = lambda: None
            ) -> dict[str, Any]:
    """Put a job's own table (``_jobs/<job id>/_counts.csv``, already written) into the root:
    listed in the index, and compacted into the base when the policy says; return the root
    summary. Reads the index and the root summary, never an earlier row unless it compacts."""
    with tables_lock() as lost:

        def check() -> None:
            on_progress()
            lost()

        index = read_index(dst)
        kept = [p for p in index.pending if p.job_id != job_id]  # finalized again: same rows
        entry = Pending(job_id, rows, meta)
        at = next((i for i, p in enumerate(index.pending) if p.job_id == job_id), len(kept))
        index = replace(index, pending=(*kept[:at], entry, *kept[at:]))
        base = base_rows(dst, index)
        if should_compact(base, index.pending):
            return compact(dst, index, check)
        check()
        summary = _with_pending(dst, index)
        write_index(dst, replace(index, base_rows=base))
        return summary


def _with_pending(dst: Any, index: Index) -> dict[str, Any]:
    """The root summary (the base's counts) with the list of tables not in them yet."""
    summary = json.loads(dst.read(SUMMARY_NAME))
    summary["counts_cover"] = ("the base: the rows of _counts.csv; the tables under pending "
                               "are not in these counts (run `posebatch compact OUTPUT` for "
                               "exact totals)")
    summary["pending"] = [{"job_id": p.job_id, "counts": p.counts, "rows": p.rows,
                           "finished": p.meta.get("finished")} for p in index.pending]
    dst.write(SUMMARY_NAME, summary_json(summary), "application/json")
    return summary


def write_base(dst: Any, records: list[Record], meta: dict[str, Any], prefix: str = "",
               src: Any = None) -> dict[str, Any]:
    """Replace the tables at ``prefix`` with ``records`` (every image of the output: ``run``,
    ``recount``): ``_counts.csv`` then ``_summary.json`` (its presence means both are complete),
    then, at the root, an empty index if one exists (pending tables are older than these
    records). ``src`` (the job's input) fills the sizes no earlier table knows."""
    from posebatch.aggregate import counts_csv

    summary = summarize(records, meta)
    records = keep_known_sizes(dst, records, prefix, src)
    dst.write(prefix + COUNTS_NAME, counts_csv(records), "text/csv")
    dst.write(prefix + SUMMARY_NAME, summary_json(summary), "application/json")
    if not prefix:
        index = read_index(dst)
        if index.exists:
            write_index(dst, Index(len(records), ()))
    return summary


def keep_known_sizes(dst: Any, records: list[Record], prefix: str = "",
                     src: Any = None) -> list[Record]:
    """Fill the sizes that records of skipped images lack: from the current rows being
    replaced, else (with ``src``) from the image's header.

    An image skipped because its result exists was not decoded in this run; its size was
    recorded by the run that processed it, in the current rows, unless that run never wrote one:
    a worker that died after writing results but before recording them (its batch is
    redelivered and skips them). Those few are read from the input; no pixel is decoded.
    """
    missing = {r.key for r in records if r.ok and (r.width is None or r.etag is None)}
    if not missing:
        return records
    known: dict[str, Record] = {}
    for row in _rows_at(dst, prefix):
        if row.key in missing:
            known[row.key] = row  # its size and the input version it had
    return [with_header_size(carried(r, known[r.key]) if r.key in known else r, src)
            for r in records]


def _rows_at(dst: Any, prefix: str) -> Iterator[Record]:
    if not prefix:
        try:
            with current_rows(dst) as rows:
                yield from rows
        except UnicodeDecodeError:
            return
        return
    with tempfile.TemporaryDirectory(prefix="posebatch-tables-") as tmp:
        paths = _fetch(dst, [prefix + COUNTS_NAME], Path(tmp), [False])
        try:
            for p in paths:
                yield from iter_counts_csv(p)
        except UnicodeDecodeError:
            return
