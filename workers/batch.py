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

from PIL import Image

from posebatch.errors import (
    BAD_SIZE,
    EMPTY_IMAGE,
    INTERNAL_ERROR,
    NAME_TOO_LONG_PREFIX,
    UNREADABLE_PREFIX,
    ImageError,
    ObjectTooLarge,
    ObjectUnreadable,
    StorageNotFound,
    UnsafeKeyError,
)
from posebatch.keys import overlay_key, result_key
from posebatch.overlay import draw_overlay, to_jpeg
from posebatch.records import Record, record_from_pose, record_from_result, valid_flags
from posebatch.schema import (
    PoseResult,
    encode_result,
    error_result,
    is_api_result,
    result_failure,
)
from posebatch.settings import JobSettings
from posebatch.storage import Storage, safe_key
from workers.engine.decode import DecodedImage
from workers.engine.pipeline import PoseEngine, Result, api_result
from workers.engine.stages import perf_counter

LOOKUP_WINDOW = 64  # existence checks in flight; bounded so a huge listing streams
LIST_WINDOW = 256  # keys whose results are looked up with one listing of the output
WRITE_WINDOW_PER_THREAD = 16  # results handed to writers and not yet recorded, per thread
WRITE_CHUNK = 4
"""Images per writer task: a hand-over per few images, not per image, while a GPU's batch of
32 still spreads over the writer threads (its PUTs to S3 wait on the network side by side)."""
_FOREIGN = {"foreign": True}  # marks a file at the result path that posebatch did not write


def process_keys(
    engine: PoseEngine,
    src: Storage,
    dst: Storage,
    keys: Iterable[str],
    *,
    skip_existing: bool = True,
    on_record: Callable[[Record], None] | None = None,
    overlays: bool = False,
    before_first_write: Callable[[], None] | None = None,
) -> list[Record]:
    """Run ``keys`` of ``src`` through ``engine``, write ``dst/<key>.json``, return records.

    With ``skip_existing`` an image whose result already exists is not processed again; its
    record is rebuilt from the stored result, so the aggregates still count it exactly once.
    A file at the result path that is not a posebatch result (another tool's sidecar) is never
    overwritten, even without ``skip_existing``: that image gets an error record instead.
    Retryable storage errors propagate (the caller retries the whole batch: writes are idempotent).
    Each record carries the image's upright size (a skipped image's: see ``_filter_existing``).
    With ``overlays``, each processed image also gets ``dst/<key>.overlay.jpg``.
    ``before_first_write`` runs once, before the first result is written (the local run claims
    the output there, so a run that writes nothing claims nothing).
    """
    job: JobSettings = engine.job
    records: list[Record] = []
    emit = on_record or (lambda _r: None)

    def done(key: str, result: dict[str, Any], size: tuple[int, int] | None = None) -> Record:
        rec = record_from_result(key, result, job, size)
        records.append(rec)
        emit(rec)
        return rec

    timer = engine.stages
    window = WRITE_WINDOW_PER_THREAD * engine.io_threads

    def handle_one(key: str, result: Result, image: DecodedImage | None
                   ) -> tuple[Record, float, float]:
        """The JSON, the write, the overlay and the record of one image, and the seconds of
        the first two."""
        t0 = perf_counter()
        size = (image.width, image.height) if image is not None else None
        draw = overlays and image is not None
        if isinstance(result, PoseResult) and not draw:
            numbers = result.rounded()  # rounded once, for the JSON and the record
            data = result.to_json(numbers=numbers)  # the API dict's bytes without the dict
            rec = record_from_pose(key, result, job, size, numbers)
            api = None
        else:
            api = api_result(result)
            data = encode_result(api)
            rec = record_from_result(key, api, job, size)
        t1 = perf_counter()
        dst.write(result_key(key, job.result_layout), data, "application/json")
        t2 = perf_counter()
        if draw and api is not None and dst.name_problem(
                overlay_key(key, job.result_layout)) is None:
            _write_overlay(dst, key, api, image, job)
        return rec, t1 - t0, t2 - t1

    def handle(group: list[tuple[str, Result, DecodedImage | None]]) -> list[Record]:
        """On a writer thread, up to WRITE_CHUNK images of one model batch."""
        out: list[Record] = []
        encode = write = 0.0
        try:
            for key, result, image in group:
                rec, e, w = handle_one(key, result, image)
                out.append(rec)
                encode += e
                write += w
        finally:
            timer.add_many({"encode": encode, "write": write})
        return out

    def finish(fut: Future[list[Record]]) -> None:
        for rec in fut.result():  # a write error (retryable) surfaces here, before the end
            records.append(rec)
            emit(rec)

    writers = engine.writers()  # the engine's: kept from batch to batch
    pending: deque[tuple[Future[list[Record]], int]] = deque()
    in_flight = 0  # images handed to writers and not yet recorded
    try:
        started = False
        # Unsafe keys are refused first: the existence check reads dst/<key>.json, and a
        # "../x" there raised UnsafeKeyError, failing every image of the batch instead of one.
        safe = _refuse_unsafe(keys, done, dst, job.result_layout)
        todo = _filter_existing(safe, dst, job, done, writers, redo=not skip_existing)
        loaders = ((k, image_loader(src, k, job.max_image_bytes)) for k in todo)
        for group in engine.run_batches(loaders, pixels=overlays):
            if not group:
                continue
            t0 = perf_counter()
            if before_first_write is not None and not started:
                before_first_write()
            started = True
            # The JSON, write and record run on the writer threads: the model's thread only
            # hands results on. Records are taken in order, as their writes finish.
            for start in range(0, len(group), WRITE_CHUNK):
                chunk = group[start:start + WRITE_CHUNK]
                pending.append((writers.submit(handle, chunk), len(chunk)))
                in_flight += len(chunk)
            while pending and (pending[0][0].done() or in_flight > window):
                fut, n = pending.popleft()
                in_flight -= n
                finish(fut)
            timer.add("hand_on", perf_counter() - t0)
        while pending:
            finish(pending.popleft()[0])
    finally:  # an error: let the writes in flight end before the caller retries the batch
        for fut, _n in pending:
            fut.cancel()
        for fut, _n in pending:
            if not fut.cancelled():
                fut.exception()
    return records


def _write_overlay(dst: Storage, key: str, result: dict[str, Any], image: DecodedImage,
                   job: JobSettings) -> None:
    sx, sy = image.scale_xy  # draw on the decoded pixels (maybe a JPEG draft), not a resize
    typed = PoseResult.from_api(result, image.width, image.height)
    over = draw_overlay(Image.fromarray(image.rgb), typed, job.valid_kpt_score,
                        valid_flags(typed, job).tolist(), scale=(1.0 / sx, 1.0 / sy))
    dst.write(overlay_key(key, job.result_layout), to_jpeg(over), "image/jpeg")


def image_loader(src: Storage, key: str, max_bytes: int) -> Callable[[], bytes]:
    """Read one image, its size checked before its bytes are read; a problem of this one object
    becomes an ImageError (its error result), a problem of the storage propagates."""

    def load() -> bytes:
        try:
            return src.read(key, max_bytes=max_bytes)
        except ObjectTooLarge as err:
            raise ImageError(BAD_SIZE, f"image is {err.size} bytes; the limit is {err.limit} "
                             "bytes") from err
        except ObjectUnreadable as err:
            raise ImageError(EMPTY_IMAGE, f"{UNREADABLE_PREFIX}{err}") from err
        except StorageNotFound as err:
            raise ImageError(EMPTY_IMAGE, f"{UNREADABLE_PREFIX}{err} (removed after the "
                             "listing?)") from err

    return load


def _refuse_unsafe(keys: Iterable[str], done, dst: Storage, layout: str) -> Iterator[str]:
    """Keys that are unsafe, or whose result the output cannot hold (a name over 255 bytes, an
    S3 key over 1024): an error result each (recorded only: it cannot be written), never a
    failed batch."""
    for key in keys:
        try:
            safe_key(key)
        except UnsafeKeyError as err:
            done(key, error_result(INTERNAL_ERROR, f"refused key: {err}"))
            continue
        problem = dst.name_problem(result_key(key, layout))
        if problem is not None:
            done(key, error_result(INTERNAL_ERROR, f"{NAME_TOO_LONG_PREFIX}{problem}; rename the "
                                   "image or use a shorter --out"))
            continue
        yield key


def _filter_existing(keys: Iterable[str], dst: Storage, job: JobSettings, done,
                     pool: ThreadPoolExecutor, *, redo: bool = False) -> Iterator[str]:
    """Yield the keys that have no result yet (all of ours with ``redo``); record the others
    from their stored result, and a foreign file at the result path as an error.

    Their records carry no size (reading every skipped image again would make a re-run of a
    drop folder download it all); the aggregates take it from the previous count table.
    """

    layout = job.result_layout

    def existing(key: str) -> dict[str, Any] | None:
        try:
            data = dst.read(result_key(key, layout))
        except StorageNotFound:
            return None
        try:
            result = json.loads(data)
        except ValueError:  # writes are atomic: a file we cannot parse is not ours
            return _FOREIGN
        if not is_api_result(result):
            return _FOREIGN
        failure = result_failure(result)
        if redo or (failure is not None and failure.code == EMPTY_IMAGE
                    and failure.message.startswith(UNREADABLE_PREFIX)):
            return None  # unreadable before: permissions or an archive may be fixed since
        return result

    window: deque[tuple[str, Future[dict[str, Any] | None] | None]] = deque()
    it = iter(keys)
    while chunk := list(islice(it, LIST_WINDOW)):
        present = listed_results(dst, chunk, layout)
        for key in chunk:
            known_absent = present is not None and result_key(key, layout) not in present
            window.append((key, None if known_absent else pool.submit(existing, key)))
            if len(window) >= LOOKUP_WINDOW:
                yield from _settle(window.popleft(), done, dst, layout)
    while window:
        yield from _settle(window.popleft(), done, dst, layout)


def listed_results(dst: Storage, keys: list[str], layout: str = "mirror") -> set[str] | None:
    """The result files of ``keys`` that exist, from one listing of the key range they span
    (one LIST request for a batch instead of a GET per image, 404 for every new one); None
    when the range holds too many other objects to be worth listing, or when the results are
    sharded (one task's lie under up to 256 prefixes: no one range holds them), and then: a GET
    per key."""
    if layout != "mirror":
        return None
    wanted = sorted(result_key(k) for k in keys)
    lo, hi = wanted[0], wanted[-1]
    limit = 4 * len(wanted) + 1000
    found: set[str] = set()
    try:
        # Pages sized to the task: its results, their overlays and a little more; a range
        # holding more (other files) continues with further pages of that size.
        pages = dst.iter_keys(start_after=lo[:-1], page_size=2 * len(wanted) + 8)
        for n, key in enumerate(pages):
            if key > hi:
                return found
            if n >= limit:
                return None
            found.add(key)
    except StorageNotFound:  # the output does not exist yet: nothing is done
        return set()
    return found


def _settle(entry, done, dst: Storage, layout: str) -> Iterator[str]:
    key, fut = entry
    result = None if fut is None else fut.result()
    if result is None:
        yield key
    elif result is _FOREIGN:
        done(key, error_result(INTERNAL_ERROR, f"{dst.join(result_key(key, layout))} exists and "
                               "is not a posebatch result (another tool's file?); it was not "
                               "overwritten: move it away, or write the results to another "
                               "--out"))
    else:
        done(key, result)
