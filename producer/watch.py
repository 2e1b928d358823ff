"""``posebatch watch``: poll a drop folder; submit each new image once, and again when replaced.

Why versions in Redis: an S3 listing is ordered by key, not by arrival, so "new" cannot be a
position in the listing. Every submitted key goes into a hash named after (INPUT, OUTPUT), with
its version (S3 ETag and size; a folder's size and mtime); the hash outlives watcher restarts.
An image re-uploaded under the same name has another version: it is submitted again with
``force`` (its old result replaced). Keys are recorded only after their job is enqueued, so a
crash between the two can at worst submit an image twice (harmless), never lose one.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator

from posebatch.jobstate import PREFIX, connect, redis_errors
from posebatch.keys import is_image_key
from posebatch.settings import DEFAULT_BATCH_IMAGES, JobSettings
from posebatch.storage import open_storage
from producer.submit import chunked, submit

log = logging.getLogger(__name__)
CHECK_CHUNK = 500


def seen_key(input_url: str, output_url: str) -> str:
    """The set of keys submitted by older versions (no versions): known, not resubmitted."""
    digest = hashlib.sha256(f"{input_url}\n{output_url}".encode()).hexdigest()[:16]
    return f"{PREFIX}:watch:{digest}:seen"


def versions_key(input_url: str, output_url: str) -> str:
    """Hash key -> version (ETag/size, or size/mtime) of every image submitted."""
    return seen_key(input_url, output_url)[: -len(":seen")] + ":versions"


def classify(r, versions: str, legacy: str,
             listing: Iterator[tuple[str, str]]) -> Iterator[tuple[str, str, str]]:
    """(key, version, what) for keys that are ``new`` or ``changed`` (replaced since they were
    submitted); unchanged keys are left out."""
    for chunk in chunked(listing, CHECK_CHUNK):
        keys = [k for k, _v in chunk]
        with redis_errors():
            known = r.hmget(versions, keys)
            old = r.smismember(legacy, keys) if r.exists(legacy) else [0] * len(keys)
        for (key, version), had, in_legacy in zip(chunk, known, old, strict=True):
            if had is None:
                yield key, version, "known" if in_legacy else "new"
            elif had.decode() != version:
                yield key, version, "changed"


def poll_once(input_url: str, output_url: str, *, job: JobSettings, broker_url: str,
              state_url: str | None = None, batch_images: int = DEFAULT_BATCH_IMAGES,
              max_job_images: int = 100_000) -> list[str]:
    """Submit the images not seen before, and those replaced since (ETag/size or size/mtime
    changed: reprocessed with force); return the ids of the jobs created (maybe none)."""
    src, dst = open_storage(input_url), open_storage(output_url)
    r = connect(state_url or broker_url)
    versions = versions_key(src.url, dst.url)
    legacy = seen_key(src.url, dst.url)
    listing = ((k, v) for k, v in src.iter_versions() if is_image_key(k))
    jobs = []
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

    for key, version, what in classify(r, versions, legacy, listing):
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


def watch(input_url: str, output_url: str, *, interval: float, once: bool = False,
          **kwargs) -> None:
    while True:
        started = time.monotonic()
        for job_id in poll_once(input_url, output_url, **kwargs):
            print(job_id, flush=True)
        if once:
            return
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
