"""Celery tasks: one batch of images, and (for beat schedules) the submission of a whole job.

Worker-wide behaviour lives in hooks (``celery_app``) and the shared batch function
(``workers.batch``); a task body only wires job parameters to them and records the outcome.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from posebatch.aggregate import Record
from posebatch.errors import INTERNAL_ERROR, PermanentError, RetryableError
from posebatch.jobs import claim_output, manifest
from posebatch.settings import JobSettings
from posebatch.storage import open_storage
from workers import state
from workers.batch import process_keys
from workers.celery_app import app
from workers.engine.pipeline import PoseEngine

log = logging.getLogger(__name__)

MAX_RETRIES = 4  # storage errors: retried with exponential backoff, then the batch fails
MAX_DELIVERIES = 8  # starts of one batch, retries and redeliveries after worker loss included
_claimed: set[str] = set()  # jobs whose output manifest this process has checked


@app.task(name="posebatch.process_batch", bind=True, acks_late=True)
def process_batch(self, job_id: str, batch_id: str, input_url: str, output_url: str,
                  keys: list[str], settings: dict[str, Any], force: bool = False) -> int:
    store = state.job_store()
    deliveries = store.count_delivery(job_id, batch_id)
    if deliveries > MAX_DELIVERIES:
        _fail_missing(job_id, keys, f"batch {batch_id} abandoned after {MAX_DELIVERIES} "
                      "attempts (the worker died or failed each time); resubmit to retry")
        return 0
    try:
        model, ref = state.load_engine()
        job = JobSettings.from_dict(settings)
        on_record = store.note_model(job_id, {"name": ref.name, "sha256": ref.sha256})
        if on_record["sha256"] != ref.sha256:
            raise _ModelMismatch(f"job {job_id} runs model {on_record['sha256'][:12]} but this "
                                 f"worker has {ref.sha256[:12]}; run one model per cluster")
        src, dst = open_storage(input_url), open_storage(output_url)
        if job_id not in _claimed:
            claim_output(dst, manifest(ref.sha256, ref.name, job), force)
            _claimed.add(job_id)
        rt = state.runtime()
        engine = PoseEngine(model, job, rt.batch_size, rt.io_threads)
        records = process_keys(engine, src, dst, keys, skip_existing=not force)
    except (RetryableError, RedisConnectionError, RedisTimeoutError) as err:
        if self.request.retries >= MAX_RETRIES:
            _fail_missing(job_id, keys, f"batch {batch_id} failed after {MAX_RETRIES + 1} "
                          f"attempts: {err}")
            return 0
        countdown = min(2 ** self.request.retries, 30)
        log.warning("batch %s of job %s: %s; retry in %s s", batch_id, job_id, err, countdown)
        raise self.retry(exc=err, countdown=countdown) from err
    except PermanentError as err:
        _fail_missing(job_id, keys, f"batch {batch_id} cannot run: {err}")
        return 0
    except Exception as err:  # a bug must not leave the job waiting forever for these images
        log.exception("batch %s of job %s failed", batch_id, job_id)
        _fail_missing(job_id, keys, f"batch {batch_id} failed: {type(err).__name__}: {err}")
        return 0
    try:
        store.add_records(job_id, records)
        store.maybe_finalize(job_id)
    except (RetryableError, RedisConnectionError, RedisTimeoutError) as err:
        # Results are written; recording them again on the retry is idempotent (skip_existing
        # re-reads them, or --force recomputes identical records).
        raise self.retry(exc=err, countdown=min(2 ** self.request.retries, 30)) from err
    return len(records)


class _ModelMismatch(PermanentError):
    pass


def _fail_missing(job_id: str, keys: list[str], reason: str) -> None:
    """Record every image of the batch that has no record yet as failed, with the reason, so the
    job completes and the summary says what happened instead of waiting forever."""
    store = state.job_store()
    have = store.has_record(job_id, keys)
    missing = [Record(k, False, INTERNAL_ERROR, 0, 0, reason)
               for k, h in zip(keys, have, strict=True) if not h]
    log.error("job %s: %s (%d images recorded as failed)", job_id, reason, len(missing))
    store.add_records(job_id, missing)
    store.maybe_finalize(job_id)


@app.task(name="posebatch.submit_job")
def submit_job(input_url: str, output_url: str, settings: dict[str, Any] | None = None,
               batch_images: int = 64, force: bool = False) -> str:
    """What a beat schedule entry runs: list INPUT and enqueue its batches, like `submit`."""
    from producer.submit import submit

    rt = state.runtime()
    return submit(input_url, output_url, job=JobSettings.from_dict(settings or {}),
                  broker_url=rt.broker_url, state_url=rt.state_url, batch_images=batch_images,
                  force=force)
