"""Reruns in O(new): what a re-submission of the same INPUT into the same OUTPUT must submit.

Why: a nightly rerun of a 10M-image prefix with 50k new images used to queue all 10M keys; each
worker then listed the output and GET every done result to rebuild its record (9.95M GETs, 1-2.7
hours on 8 workers). The output's current rows (the root ``_counts.csv`` and the per-job tables
not compacted into it yet, merged: ``roottables.current_rows``) already say, per key, what is
done and with which input version. Here the listing (sorted on local disk, it is not in key order on
every server) is merge-joined with that table, and only keys that are

- ``new``: no row;
- ``retry``: a row whose failure may pass (216200 "no image data": unreadable; a batch that
  failed as a whole: ``Record.batch_failure``), as the worker's skip-existing rule already
  retries;
- ``changed``: a row whose etag/bytes differ from the listing's (re-uploaded under the same
  name): queued as forced batches, so the worker replaces the old result;

are submitted. A done image costs nothing but its listing entry: no LIST of the output, no GET.
Rows from tables written without versions (a local `run`, an older posebatch) count as
unchanged. A result deleted by hand while its row stays is not redone: `--force` redoes all.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from posebatch.errors import EMPTY_IMAGE, UNREADABLE_PREFIX, ConfigError
from posebatch.finalize import external_sort
from posebatch.records import Record
from posebatch.roottables import current_rows
from posebatch.selection import Selection, select_keys
from posebatch.storage import ObjectInfo, Storage

NEW, RETRY, CHANGED = "new", "retry", "changed"


def list_parallel() -> int:
    """Paginators listing INPUT at once (``POSEBATCH_LIST_PARALLEL``, default 8; 1 = one
    stream in key order): one stream lists ~4,000 keys/s, too few to feed 8 GPU workers."""
    raw = os.environ.get("POSEBATCH_LIST_PARALLEL", "8")
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"POSEBATCH_LIST_PARALLEL={raw!r}: expected a whole number of "
                          "paginators (1 = one sequential listing)") from None
    if n < 1:
        raise ConfigError(f"POSEBATCH_LIST_PARALLEL={n}: expected >= 1")
    return n


def retryable(row: Record) -> bool:
    """A failure worth another try: the object could not be read (permissions, an archive
    restored since), or its batch failed as a whole (an outage, a worker lost each time)."""
    if row.ok:
        return False
    return row.batch_failure or (row.error_code == EMPTY_IMAGE
                                 and row.error_msg.startswith(UNREADABLE_PREFIX))


def changed(row: Record, info: ObjectInfo) -> bool:
    """The listed object is not the one the row was recorded from (only when the row says)."""
    return ((row.etag is not None and row.etag != info.etag)
            or (row.nbytes is not None and row.nbytes != info.size))


class _Listed:
    """A view of ``src`` whose ``iter_keys`` comes from ``iter_objects``, remembering the last
    object handed out: ``select_keys`` (extensions, sniffing, include/exclude) takes its keys
    lazily one at a time, so the object of the key it yields is that last one. No version is
    held for more than one key."""

    def __init__(self, src: Storage, parallel: int = 1,
                 objects: Iterable[ObjectInfo] | None = None) -> None:
        self.src = src
        self.parallel = parallel
        self.objects = objects
        self.last: ObjectInfo | None = None

    def iter_keys(self, suffixes=None, start_after=None, page_size=None) -> Iterator[str]:
        objects = self.objects if self.objects is not None else self.src.iter_objects(
            parallel=self.parallel)
        for info in objects:
            self.last = info
            yield info.key

    def __getattr__(self, name: str):
        return getattr(self.src, name)


def listed_objects(src: Storage, selection: Selection | None, parallel: int | None = None,
                   objects: Iterable[ObjectInfo] | None = None) -> Iterator[ObjectInfo]:
    """The objects ``select_keys`` picks from INPUT, with their ETag and size; listed by
    ``parallel`` paginators (default ``list_parallel()``), so in no particular order, or taken
    from ``objects`` (an inventory report) instead of a listing."""
    view = _Listed(src, list_parallel() if parallel is None else parallel, objects)
    for key in select_keys(view, selection):  # type: ignore[arg-type]
        info = view.last
        if info is None or info.key != key:  # pragma: no cover - select_keys changed shape
            raise RuntimeError(f"listing out of step at {key!r}")
        yield info


def _as_record(info: ObjectInfo) -> Record:
    return Record(info.key, True, None, 0, 0, etag=info.etag, nbytes=info.size)


@contextmanager
def rerun_plan(src: Storage, dst: Storage, selection: Selection | None,
               objects: Iterable[ObjectInfo] | None = None
               ) -> Iterator[Iterator[tuple[ObjectInfo, str]]]:
    """(object, why) for every listed image (or every one of ``objects``) that must be
    submitted, sorted by key; a context manager because the sorted listing and the earlier
    tables live in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="posebatch-rerun-") as tmp, \
            current_rows(dst) as rows:
        listing = external_sort((_as_record(i) for i in listed_objects(
            src, selection, objects=objects)), Path(tmp))
        yield _merge(listing, rows)


def _merge(listing: Iterable[Record], rows: Iterator[Record]) -> Iterator[tuple[ObjectInfo, str]]:
    row = next(rows, None)
    for item in listing:
        info = ObjectInfo(item.key, item.etag or "", item.nbytes or 0, 0.0)
        while row is not None and row.key < item.key:
            row = next(rows, None)
        if row is None or row.key != item.key:
            yield info, NEW
        elif retryable(row):
            yield info, RETRY
        elif changed(row, info):
            yield info, CHANGED


def inputs_line(info: ObjectInfo) -> str:
    """One row of ``_jobs/<job id>/_inputs.csv`` (key, etag, bytes), CSV-quoted."""
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([info.key, info.etag, info.size])
    return buf.getvalue()

