"""The one batch-processing function behind both ``posebatch run`` and the Celery task.

Why shared: the per-image JSON must be byte-identical (log_id aside) whether an image went
through the local run or the cluster, so both read, infer, write and record through this code.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any

from posebatch.errors import INTERNAL_ERROR, StorageNotFound, UnsafeKeyError
from posebatch.keys import result_key
from posebatch.records import Record, record_from_result
from posebatch.schema import encode_result, error_result
from posebatch.settings import JobSettings
from posebatch.storage import Storage, safe_key
from workers.engine.pipeline import PoseEngine

LOOKUP_WINDOW = 64  # existence checks in flight; bounded so a huge listing streams
LIST_WINDOW = 256  # keys whose results are looked up with one listing of the output


def process_keys(
    engine: PoseEngine,
    src: Storage,
    dst: Storage,
    keys: Iterable[str],
    *,
    skip_existing: bool = True,
    on_record: Callable[[Record], None] | None = None,
) -> list[Record]:
    """Run ``keys`` of ``src`` through ``engine``, write ``dst/<key>.json``, return records.

    With ``skip_existing`` an image whose result already exists is not processed again; its
    record is rebuilt from the stored result, so the aggregates still count it exactly once.
    Retryable storage errors propagate (the caller retries the whole batch: writes are idempotent).
    """
    job: JobSettings = engine.job
    records: list[Record] = []
    emit = on_record or (lambda _r: None)

    def done(key: str, result: dict[str, Any]) -> Record:
        rec = record_from_result(key, result, job)
        records.append(rec)
        emit(rec)
        return rec

    with ThreadPoolExecutor(engine.io_threads, thread_name_prefix="write") as writers:
        writes: list[Future[None]] = []
        # Unsafe keys are refused first: the existence check reads dst/<key>.json, and a
        # "../x" there raised UnsafeKeyError, failing every image of the batch instead of one.
        safe = _refuse_unsafe(keys, done)
        todo = _filter_existing(safe, dst, job, done, writers) if skip_existing else safe
        loaders = ((k, _loader(src, k)) for k in todo)
        for key, result in engine.run(loaders):
            writes.append(writers.submit(dst.write, result_key(key), encode_result(result),
                                         "application/json"))
            done(key, result)
        for fut in writes:
            fut.result()  # surface write errors (retryable) before the batch counts as done
    return records


def _loader(src: Storage, key: str) -> Callable[[], bytes]:
    return lambda: src.read(key)


def _refuse_unsafe(keys: Iterable[str], done) -> Iterator[str]:
    for key in keys:
        try:
            safe_key(key)
        except UnsafeKeyError as err:
            done(key, error_result(INTERNAL_ERROR, f"refused key: {err}"))
            continue
        yield key


def _filter_existing(keys: Iterable[str], dst: Storage, job: JobSettings, done,
                     pool: ThreadPoolExecutor) -> Iterator[str]:
    """Yield the keys that have no result yet; record the others from their stored result."""

    def existing(key: str) -> dict[str, Any] | None:
        try:
            return json.loads(dst.read(result_key(key)))
        except StorageNotFound:
            return None
        except ValueError:  # a torn or foreign file: process the image again
            return None

    window: deque[tuple[str, Future[dict[str, Any] | None] | None]] = deque()
    it = iter(keys)
    while chunk := list(islice(it, LIST_WINDOW)):
        present = listed_results(dst, chunk)
        for key in chunk:
            known_absent = present is not None and result_key(key) not in present
            window.append((key, None if known_absent else pool.submit(existing, key)))
            if len(window) >= LOOKUP_WINDOW:
                yield from _settle(window.popleft(), done)
    while window:
        yield from _settle(window.popleft(), done)


def listed_results(dst: Storage, keys: list[str]) -> set[str] | None:
    """The result files of ``keys`` that exist, from one listing of the key range they span
    (one LIST request for a batch instead of a GET per image, 404 for every new one); None
    when the range holds too many other objects to be worth listing (then: a GET per key)."""
    wanted = sorted(result_key(k) for k in keys)
    lo, hi = wanted[0], wanted[-1]
    limit = 4 * len(wanted) + 1000
    found: set[str] = set()
    try:
        for n, key in enumerate(dst.iter_keys(start_after=lo[:-1])):
            if key > hi:
                return found
            if n >= limit:
                return None
            found.add(key)
    except StorageNotFound:  # the output does not exist yet: nothing is done
        return set()
    return found


def _settle(entry, done) -> Iterator[str]:
    key, fut = entry
    result = None if fut is None else fut.result()
    if result is None:
        yield key
    else:
        done(key, result)
