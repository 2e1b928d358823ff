"""``posebatch watch``: poll a drop folder; submit each new image once, and again when replaced.

Why versions in Redis: an S3 listing is ordered by key, not by arrival, so "new" cannot be a
position in the listing. Every submitted key goes into a hash named after (INPUT, OUTPUT), with
its version (S3 ETag and size; a folder's size and mtime); the hash outlives watcher restarts.
An image re-uploaded under the same name has another version: it is submitted again with
``force`` (its old result replaced). Keys are recorded only after their job is enqueued, so a
crash between the two can at worst submit an image twice (harmless), never lose one.

Why the versions hash stays small: each finished poll stores its start time (the cursor). An
object that last changed more than ``settle`` seconds before the previous poll started was
visible to that poll, so it was submitted then (or was unchanged): it is not looked up again,
and its version is dropped from the hash. The hash holds the versions of the last ``settle``
seconds of uploads, not 117 bytes for every object ever seen (1.1 GB at 10M). A re-upload
changes the object's time, so it is looked up again; its version is gone by then, and the
existence of its result tells a replaced image (submitted with force) from a new one.
``settle`` must exceed the longest upload plus the clocks' skew (S3's LastModified is when the
upload began; the object is listed only once it completed).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator

from posebatch.jobstate import PREFIX, connect, redis_errors
from posebatch.keys import is_image_key, result_key
from posebatch.settings import DEFAULT_BATCH_IMAGES, JobSettings
from posebatch.storage import open_storage
from producer.submit import chunked, submit

log = logging.getLogger(__name__)
CHECK_CHUNK = 500
SETTLE_SECONDS = 3600.0
"""How long after an object's LastModified/ctime it may still appear in a listing (uploads in
progress, clock skew): its version is kept that long, then dropped."""
STATE_TTL = 30 * 24 * 3600
"""A watcher's state (versions, cursor) expires this long after its last poll."""


def seen_key(input_url: str, output_url: str) -> str:
    """The set of keys submitted by older versions (no versions): known, not resubmitted."""
    digest = hashlib.sha256(f"{input_url}\n{output_url}".encode()).hexdigest()[:16]
    return f"{PREFIX}:watch:{digest}:seen"


def versions_key(input_url: str, output_url: str) -> str:
    """Hash key -> version (ETag/size, or size/mtime) of every image submitted."""
    return seen_key(input_url, output_url)[: -len(":seen")] + ":versions"


def cursor_key(input_url: str, output_url: str) -> str:
    """When the last finished poll started (seconds since the epoch)."""
    return seen_key(input_url, output_url)[: -len(":seen")] + ":cursor"


def classify(r, versions: str, legacy: str, listing: Iterator[tuple[str, str]],
             has_result=None) -> Iterator[tuple[str, str, str]]:
    """(key, version, what) for keys that are ``new`` or ``changed`` (replaced since they were
    submitted); unchanged keys are left out. ``has_result(key)``, when given, tells a key with
    no version on record that already has a result (its version was dropped: a re-upload of an
    old image) from a new one."""
    for chunk in chunked(listing, CHECK_CHUNK):
        keys = [k for k, _v in chunk]
        with redis_errors():
            known = r.hmget(versions, keys)
            old = r.smismember(legacy, keys) if r.exists(legacy) else [0] * len(keys)
        for (key, version), had, in_legacy in zip(chunk, known, old, strict=True):
            if had is None and in_legacy:
                yield key, version, "known"
            elif had is None:
                yield key, version, "changed" if has_result and has_result(key) else "new"
            elif had.decode() != version:
                yield key, version, "changed"


def poll_once(input_url: str, output_url: str, *, job: JobSettings, broker_url: str,
              state_url: str | None = None, batch_images: int = DEFAULT_BATCH_IMAGES,
              max_job_images: int = 100_000, settle: float = SETTLE_SECONDS) -> list[str]:
    """Submit the images not seen before, and those replaced since (ETag/size or size/mtime
    changed: reprocessed with force); return the ids of the jobs created (maybe none).

    Redis is asked only about objects that changed within ``settle`` seconds before the
    previous poll began or since (module docstring); the versions of older ones are dropped."""
    src, dst = open_storage(input_url), open_storage(output_url)
    r = connect(state_url or broker_url)
    versions = versions_key(src.url, dst.url)
    legacy = seen_key(src.url, dst.url)
    cursor = cursor_key(src.url, dst.url)
    started = time.time()
    with redis_errors():
        raw = r.get(cursor)
    horizon = float(raw) - settle if raw is not None else None
    aged: list[str] = []  # versions no later poll needs: dropped once this poll is through

    def recent() -> Iterator[tuple[str, str]]:
        for info in src.iter_objects():
            if not is_image_key(info.key):
                continue
            if info.changed < started - settle:
                if horizon is None or info.changed >= horizon:
                    aged.append(info.key)  # looked up now (maybe), never again
                if horizon is not None and info.changed < horizon:
                    continue  # seen by a finished poll already
            yield info.key, info.version

    def has_result(key: str) -> bool:
        return horizon is not None and dst.exists(result_key(key, job.result_layout))

    jobs = _submit_listing(r, versions, legacy, recent(), has_result, src=src, dst=dst,
                           job=job, broker_url=broker_url, state_url=state_url,
                           batch_images=batch_images, max_job_images=max_job_images)
    with redis_errors():  # every submission is queued: move the cursor, drop aged versions
        for chunk in chunked(aged, CHECK_CHUNK):
            r.hdel(versions, *chunk)
        pipe = r.pipeline()
        pipe.set(cursor, repr(started), ex=STATE_TTL)
        pipe.expire(versions, STATE_TTL)
        pipe.execute()
    return jobs


def _submit_listing(r, versions: str, legacy: str, listing: Iterator[tuple[str, str]],
                    has_result, *, src, dst, job: JobSettings, broker_url: str,
                    state_url: str | None, batch_images: int, max_job_images: int) -> list[str]:
    """Submit the new and the replaced images of ``listing`` (key, version) as jobs of at most
    ``max_job_images``, recording each version once its job is queued; return the job ids."""
    jobs: list[str] = []
    todo: dict[str, list[tuple[str, str]]] = {"new": [], "changed": []}

    def flush(what: str) -> None:
        entries = todo[what]
        if not entries:
            return
        keys = [k for k, _v in entries]
        job_id = submit(src.url, dst.url, job=job, broker_url=broker_url, state_url=state_url,
                        batch_images=batch_images, keys=keys, force=what == "changed",
                        summary_prefix="_jobs/{job_id}/")
        with redis_errors():  # only after the job is queued: a crash resubmits, never loses
            r.hset(versions, mapping=dict(entries))
        log.warning("job %s: %d %s images", job_id, len(keys), what)
        jobs.append(job_id)
        todo[what] = []

    for key, version, what in classify(r, versions, legacy, listing, has_result):
        if what == "known":  # submitted by an older version: remember its version only
            with redis_errors():
                r.hset(versions, key, version)
            continue
        todo[what].append((key, version))
        if len(todo[what]) >= max_job_images:
            flush(what)
    flush("new")
    flush("changed")
    return jobs


def after_key(input_url: str, output_url: str) -> str:
    """The last key an incremental poll listed (``poll_incremental``)."""
    return seen_key(input_url, output_url)[: -len(":seen")] + ":after"


def poll_incremental(input_url: str, output_url: str, *, job: JobSettings, broker_url: str,
                     state_url: str | None = None, batch_images: int = DEFAULT_BATCH_IMAGES,
                     max_job_images: int = 100_000) -> list[str]:
    """List INPUT only past the last key listed before (S3 ``StartAfter``) and submit what is
    there: O(new) requests for inputs whose keys only grow (timestamps, ULIDs, date folders).

    A key that sorts before the cursor when it arrives (or an image replaced under its old
    name) is not seen here: the full poll (``poll_once``, every ``--reconcile-every``) catches
    it. Versions are recorded as the full poll records them, so it does not take these for
    re-uploads; it also trims them."""
    src, dst = open_storage(input_url), open_storage(output_url)
    r = connect(state_url or broker_url)
    cursor = after_key(src.url, dst.url)
    with redis_errors():
        raw = r.get(cursor)
    last = [raw.decode("utf-8", "surrogateescape") if raw is not None else None]

    def listing() -> Iterator[tuple[str, str]]:
        for info in src.iter_objects(start_after=last[0]):
            last[0] = info.key  # the listing's own order: what StartAfter resumes from
            if is_image_key(info.key):
                yield info.key, info.version

    jobs = _submit_listing(r, versions_key(src.url, dst.url), seen_key(src.url, dst.url),
                           listing(), None, src=src, dst=dst, job=job, broker_url=broker_url,
                           state_url=state_url, batch_images=batch_images,
                           max_job_images=max_job_images)
    if last[0] is not None:
        with redis_errors():  # every submission is queued: move past what was listed
            r.set(cursor, last[0].encode("utf-8", "surrogateescape"), ex=STATE_TTL)
    return jobs


def watch(input_url: str, output_url: str, *, interval: float, once: bool = False,
          incremental: bool = False, reconcile_every: float = 3600.0, **kwargs) -> None:
    """Poll every ``interval`` seconds; with ``incremental``, list only past the last key,
    and list everything (``poll_once``) at the start and every ``reconcile_every`` seconds
    (0: never)."""
    full_at = time.monotonic()  # an incremental watcher's first poll lists everything anyway
    while True:
        started = time.monotonic()
        jobs: list[str] = []
        if incremental:
            jobs += poll_incremental(input_url, output_url,
                                     **{k: v for k, v in kwargs.items() if k != "settle"})
        if not incremental or (reconcile_every and started - full_at >= reconcile_every):
            jobs += poll_once(input_url, output_url, **kwargs)
            full_at = started
        for job_id in jobs:
            print(job_id, flush=True)
        if once:
            return
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
