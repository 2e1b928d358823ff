"""The end of a job, streamed: records sorted on disk, tables written to files, files uploaded.

A job writing into an output's root writes only its own tables (``_jobs/<job id>/``) and lists
them in the root's index (``posebatch.roottables``): O(job), whatever the output already holds.

Why: a job's aggregates used to be built in memory (every record in a list, the CSV as one
string, one PUT): ~0.5 KB of RAM per image, an OOM kill from ~2M images in a 1 GiB pod. Here
memory is bounded by ``CHUNK`` records whatever the job size: records are sorted in runs spilled
to a temporary folder and merged (``heapq.merge``), each ``_counts.csv`` is written to a file
while its summary is tallied, and the file is uploaded in parts (S3 multipart upload via
``Storage.upload``).
"""

from __future__ import annotations

import csv
import heapq
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from operator import attrgetter
from pathlib import Path
from typing import Any

from posebatch.aggregate import COUNTS_NAME, with_header_size
from posebatch.errors import StorageNotFound
from posebatch.records import Record
from posebatch.roottables import (
    JOBS_FOLDER,
    Table,
    TablesLock,
    add_job,
    no_lock,
)

CHUNK = 200_000
"""Records held in memory at once while sorting (~60 MB of Python objects)."""
PROGRESS_EVERY = 50_000
_by_key = attrgetter("key")


def external_sort(records: Iterable[Record], workdir: Path, chunk: int = CHUNK,
                  on_progress: Callable[[], None] = lambda: None) -> Iterator[Record]:
    """``records`` sorted by key, holding at most ``chunk`` of them in memory."""
    runs: list[Path] = []
    buf: list[Record] = []
    for n, r in enumerate(records, 1):
        buf.append(r)
        if n % PROGRESS_EVERY == 0:
            on_progress()
        if len(buf) >= chunk:
            runs.append(_spill(buf, workdir, len(runs)))
            buf = []
    buf.sort(key=_by_key)
    if not runs:
        yield from buf
        return
    runs.append(_spill(buf, workdir, len(runs)))
    yield from heapq.merge(*(_read_run(p) for p in runs), key=_by_key)


def _spill(buf: list[Record], workdir: Path, n: int) -> Path:
    buf.sort(key=_by_key)
    path = workdir / f"run-{n:05d}.jsonl"
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        for r in buf:
            f.write(json.dumps([r.key, r.ok, r.error_code, r.person_num, r.valid_persons,
                                r.error_msg, r.width, r.height, r.etag, r.nbytes,
                                r.batch_failure],
                               ensure_ascii=False) + "\n")
    return path


def _read_run(path: Path) -> Iterator[Record]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            yield Record(*json.loads(line))


INPUTS_NAME = "_inputs.csv"
"""``_jobs/<job id>/_inputs.csv``: key, etag, bytes of every image the job was given, written by
``submit`` from the listing; the finalize puts them in the count table's etag/bytes columns."""


def read_inputs(path: Path) -> Iterator[Record]:
    """The rows of an ``_inputs.csv`` as records that carry only a key and a version."""
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            n = row.get("bytes") or ""
            yield Record(row["key"], True, None, 0, 0, etag=row.get("etag") or None,
                         nbytes=int(n) if n.isdigit() else None)


def with_versions(mine: Iterator[Record], versions: Iterator[Record]) -> Iterator[Record]:
    """``mine`` (sorted) with etag/bytes from ``versions`` (sorted), merge-joined by key."""
    pending = next(versions, None)
    for r in mine:
        while pending is not None and pending.key < r.key:
            pending = next(versions, None)
        if pending is not None and pending.key == r.key and r.etag is None:
            r = replace(r, etag=pending.etag, nbytes=pending.nbytes)
        yield r


def finalize(dst: Any, records: Iterable[Record], meta: dict[str, Any], prefix: str,
             merge_root: bool, on_progress: Callable[[], None] = lambda: None,
             src: Any = None, inputs_key: str | None = None,
             tables_lock: TablesLock = no_lock) -> dict[str, Any]:
    """Write the job's aggregates to ``dst`` at ``prefix``; with ``merge_root`` (a job writing
    to the output's root) to ``_jobs/<job id>/``, then the job's table goes into the root's
    index under ``tables_lock`` (``posebatch.roottables``: no earlier row is read unless the
    policy compacts). ``src`` (the job's input) gives the sizes of skipped images
    (``with_header_size``; into the root, the compaction does, from the job's ``input``
    in ``meta``, for the rows whose size no table knows); ``inputs_key`` names the job's
    ``_inputs.csv`` (the versions its listing saw), if any. Returns the summary written at
    ``prefix`` (the root's, with ``merge_root``)."""
    with tempfile.TemporaryDirectory(prefix="posebatch-finalize-") as tmp:
        work = Path(tmp)
        mine = external_sort(records, work, on_progress=on_progress)
        if inputs_key is not None:
            inputs_path = work / "inputs.csv"
            try:
                dst.download(inputs_key, str(inputs_path))
            except StorageNotFound:
                pass
            else:
                (work / "inputs").mkdir()
                mine = with_versions(mine, external_sort(read_inputs(inputs_path),
                                                         work / "inputs"))
        table = Table(work / "counts.csv")
        for n, r in enumerate(mine, 1):
            # Into the root, a skipped image's size is found at the compaction: from the row
            # it replaces, else from its header (only then is it known that no table has it).
            table.add(r if merge_root else with_header_size(r, src))
            if n % PROGRESS_EVERY == 0:
                on_progress()
        if not merge_root:
            return table.publish(dst, prefix, meta)
        own = table.publish(dst, f"{JOBS_FOLDER}{meta['job_id']}/", meta)
        if own["images_seen"] == 0 and dst.exists(COUNTS_NAME):
            # A rerun that found nothing new: the root tables already say everything.
            return own
        return add_job(dst, meta["job_id"], own["images_seen"], meta, tables_lock, on_progress)
