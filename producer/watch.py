"""``posebatch watch``: poll a drop folder and submit each new image exactly once.

Why a seen-set in Redis: an S3 listing is ordered by key, not by arrival, so "new" cannot be a
position in the listing. Every submitted key goes into a set named after (INPUT, OUTPUT); the set
outlives watcher restarts. Keys are added only after their job is enqueued, so a crash between
the two can at worst submit an image twice (harmless: results are idempotent), never lose one.
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
    digest = hashlib.sha256(f"{input_url}\n{output_url}".encode()).hexdigest()[:16]
    return f"{PREFIX}:watch:{digest}:seen"


def new_keys(r, seen: str, keys: Iterator[str]) -> Iterator[str]:
    for chunk in chunked(keys, CHECK_CHUNK):
        with redis_errors():
            flags = r.smismember(seen, chunk)
        yield from (k for k, f in zip(chunk, flags, strict=False) if not f)


def poll_once(input_url: str, output_url: str, *, job: JobSettings, broker_url: str,
              state_url: str | None = None, batch_images: int = DEFAULT_BATCH_IMAGES,
              max_job_images: int = 100_000) -> list[str]:
    """Submit the images not seen before; return the ids of the jobs created (maybe none)."""
    src, dst = open_storage(input_url), open_storage(output_url)
    r = connect(state_url or broker_url)
    seen = seen_key(src.url, dst.url)
    listing = (k for k in src.iter_keys() if is_image_key(k))
    jobs = []
    for keys in chunked(new_keys(r, seen, listing), max_job_images):
        job_id = submit(src.url, dst.url, job=job, broker_url=broker_url, state_url=state_url,
                        batch_images=batch_images, keys=keys, force=False,
                        summary_prefix="_jobs/{job_id}/")
        with redis_errors():
            r.sadd(seen, *keys)
        log.warning("job %s: %d new images", job_id, len(keys))
        jobs.append(job_id)
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
