"""``posebatch submit``: list the images of INPUT, cut them into batch tasks, enqueue them.

Why it streams: the listing is consumed page by page and each batch is sent as soon as it is
full, so a prefix with a million keys needs memory for one batch, and workers start on the first
batches while the listing is still running.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from posebatch.errors import ConfigError
from posebatch.jobstate import JobStore, new_job_id
from posebatch.manifest import check_output, manifest
from posebatch.queue import PROCESS_BATCH, QUEUE, broker_errors, make_app
from posebatch.selection import Selection, select_keys
from posebatch.settings import DEFAULT_BATCH_IMAGES, JobSettings
from posebatch.storage import open_storage


def chunked(keys: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(keys)
    while chunk := list(islice(it, size)):
        yield chunk


def submit(input_url: str, output_url: str, *, job: JobSettings, broker_url: str,
           state_url: str | None = None, batch_images: int = DEFAULT_BATCH_IMAGES,
           force: bool = False, job_id: str | None = None, keys: Iterable[str] | None = None,
           summary_prefix: str = "", on_batch: Callable[[int], None] | None = None,
           selection: Selection | None = None) -> str:
    """Enqueue one job; return its id. ``keys`` (relative to INPUT) replaces the listing;
    ``selection`` (key list, include/exclude) picks from INPUT as ``posebatch run`` does."""
    if batch_images < 1:
        raise ConfigError(f"--batch-images: expected >= 1, got {batch_images}")
    src, dst = open_storage(input_url), open_storage(output_url)
    if not force:  # refuse early, before anything is enqueued
        check_output(dst, manifest(job))
    store = JobStore.from_url(state_url or broker_url)
    job_id = job_id or new_job_id()
    store.create(job_id, {"input": src.url, "output": dst.url,
                          "settings": job.to_dict(), "force": force,
                          "summary_prefix": summary_prefix})
    app = make_app(broker_url)
    listing = keys if keys is not None else select_keys(src, selection)
    total = batches = 0
    with broker_errors(), app.producer_or_acquire() as producer:
        for batch in chunked(listing, batch_images):
            app.send_task(
                PROCESS_BATCH, queue=QUEUE, producer=producer,
                kwargs={"job_id": job_id, "batch_id": f"{batches:08d}", "input_url": src.url,
                        "output_url": dst.url, "keys": batch, "settings": job.to_dict(),
                        "force": force},
            )
            total += len(batch)
            batches += 1
            if on_batch:
                on_batch(len(batch))
    store.mark_submitted(job_id, total, batches)
    if total == 0:
        store.write_aggregates(job_id)
    else:
        store.maybe_finalize(job_id)  # the workers may all have finished before we got here
    return job_id
