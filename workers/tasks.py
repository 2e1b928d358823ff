"""Celery tasks: one batch of images, and (for beat schedules) the submission of a whole job.

Worker-wide behaviour lives in hooks (``celery_app``) and the shared batch function
(``workers.batch``); a task body only wires job parameters to them and records the outcome.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from celery.exceptions import Reject
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from posebatch.aggregate import Record
from posebatch.errors import INTERNAL_ERROR, PermanentError, RetryableError
from posebatch.jobs import claim_output, manifest
from posebatch.settings import JobSettings
from posebatch.storage import Storage, open_storage
from workers import state
from workers.batch import process_keys
from workers.celery_app import app
from workers.engine.pipeline import PoseEngine

log = logging.getLogger(__name__)

MAX_RETRIES = 4  # storage errors: retried with exponential backoff, then the batch fails
MAX_DELIVERIES = 8  # starts of one batch, retries and redeliveries after worker loss included
REDIS_PATIENCE = 60.0  # seconds a batch waits for the job-state Redis to come back
_claimed: set[str] = set()  # jobs whose output manifest this process has checked
_T = TypeVar("_T")


class _StateUnavailable(Exception):
    """The job-state Redis stayed unreachable for REDIS_PATIENCE seconds."""


def _redis(call: Callable[..., _T], *args: Any) -> _T:
    """Run one job-state call, waiting out a Redis outage (restart, failover) for a while.

    Why not ``self.retry``: the broker is usually the same Redis, so while it is down a retry
    cannot be published, and Celery then rejects the message *without* requeueing it: the
    batch's images would never be recorded and the job would wait forever. Every call passed
    here is idempotent (HSET/HSETNX/SADD of the same values) or harmless when repeated
    (the delivery counter only bounds poison batches).
    """
    deadline = time.monotonic() + REDIS_PATIENCE
    delay = 0.5
    while True:
        try:
            return call(*args)
        except (RedisConnectionError, RedisTimeoutError) as err:
            if time.monotonic() + delay > deadline:
                raise _StateUnavailable(f"job state unreachable for {REDIS_PATIENCE:.0f} s: "
                                        f"{err}") from err
            log.warning("job state Redis unreachable (%s); trying again in %.1f s", err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


@app.task(name="posebatch.process_batch", bind=True, acks_late=True, max_retries=MAX_RETRIES)
def process_batch(self, job_id: str, batch_id: str, input_url: str, output_url: str,
                  keys: list[str], settings: dict[str, Any], force: bool = False) -> int:
    """Process one batch; the message is acknowledged only once every image has a record.

    ``max_retries`` must equal MAX_RETRIES: with Celery's default (3) the last retry raised the
    storage error instead of recording the images as failed, and the job never completed.
    """
    try:
        return _process_batch(self, job_id, batch_id, input_url, output_url, keys, settings,
                              force)
    except _StateUnavailable as err:
        # Not acknowledged: back to the queue (or, if the broker is down too, redelivered after
        # the visibility timeout). Recording nothing now loses nothing: records are idempotent.
        log.error("batch %s of job %s: %s; the batch goes back to the queue", batch_id, job_id,
                  err)
        raise Reject(str(err), requeue=True) from err


def _process_batch(self, job_id: str, batch_id: str, input_url: str, output_url: str,
                   keys: list[str], settings: dict[str, Any], force: bool) -> int:
    store = state.job_store()
    if not _redis(store.has_job, job_id):
        log.error("job %s is unknown: its state is gone from Redis (restarted without "
                  "persistence?); batch %s dropped. Run the same `posebatch submit` again: "
                  "images with results are skipped", job_id, batch_id)
        return 0
    deliveries = _redis(store.count_delivery, job_id, batch_id)
    if deliveries > MAX_DELIVERIES:
        _fail_missing(job_id, keys, f"batch {batch_id} abandoned after {MAX_DELIVERIES} "
                      "attempts (the worker died or failed each time); resubmit to retry")
        return 0
    try:
        model, ref = state.load_engine()
        job = JobSettings.from_dict(settings)
        on_record = _redis(store.note_model, job_id, {"name": ref.name, "sha256": ref.sha256})
        if on_record["sha256"] != ref.sha256:
            raise _ModelMismatch(f"job {job_id} runs model {on_record['sha256'][:12]} but this "
                                 f"worker has {ref.sha256[:12]}; run one model per cluster")
        src, dst = _storage(input_url), _storage(output_url)
        if job_id not in _claimed:
            claim_output(dst, manifest(ref.sha256, ref.name, job), force)
            _claimed.add(job_id)
        rt = state.runtime()
        engine = PoseEngine(model, job, rt.batch_size, rt.io_threads)
        records = process_keys(engine, src, dst, keys, skip_existing=not force)
    except RetryableError as err:
        if self.request.retries >= MAX_RETRIES:
            _fail_missing(job_id, keys, f"batch {batch_id} failed after {MAX_RETRIES + 1} "
                          f"attempts: {err}")
            return 0
        log.warning("batch %s of job %s: %s; retry in %s s", batch_id, job_id, err,
                    _backoff(self))
        _retry(self, err)
    except PermanentError as err:
        _fail_missing(job_id, keys, f"batch {batch_id} cannot run: {err}")
        return 0
    except _StateUnavailable:
        raise
    except Exception as err:  # a bug must not leave the job waiting forever for these images
        log.exception("batch %s of job %s failed", batch_id, job_id)
        _fail_missing(job_id, keys, f"batch {batch_id} failed: {type(err).__name__}: {err}")
        return 0
    # Results are written; recording them twice (a redelivery) is idempotent.
    if not _redis(store.add_records, job_id, records):
        log.error("job %s disappeared from Redis while batch %s ran (restarted without "
                  "persistence?); its results are written, resubmit the job to count them",
                  job_id, batch_id)
        return 0
    try:
        _redis(store.maybe_finalize, job_id)
    except RetryableError as err:  # the aggregates could not be written
        if self.request.retries >= MAX_RETRIES:
            log.error("job %s: cannot write the summary (%s); `posebatch wait %s` writes it",
                      job_id, err, job_id)
            return len(records)
        # Running the batch again finds its results (skipped) and finalizes again.
        _retry(self, err)
    return len(records)


def _backoff(task) -> int:
    return min(2 ** task.request.retries, 30)


def _retry(task, err: Exception) -> NoReturn:
    """``task.retry`` (raises Retry), except that a retry Celery cannot publish (broker down)
    does not drop the message, as Celery would (Reject without requeue): it stays queued, or
    comes back after the visibility timeout."""
    try:
        raise task.retry(exc=err, countdown=_backoff(task)) from err
    except Reject as rej:
        raise Reject(rej.reason, requeue=True) from err


@functools.lru_cache(maxsize=32)
def _storage(url: str) -> Storage:
    """One storage object per URL per worker process, so one S3 client (created lazily after
    fork): a new boto3 client costs ~0.1 s, more than all S3 requests of a small batch."""
    return open_storage(url)


class _ModelMismatch(PermanentError):
    pass


def _fail_missing(job_id: str, keys: list[str], reason: str) -> None:
    """Record every image of the batch that has no record yet as failed, with the reason, so the
    job completes and the summary says what happened instead of waiting forever."""
    store = state.job_store()
    have = _redis(store.has_record, job_id, keys)
    missing = [Record(k, False, INTERNAL_ERROR, 0, 0, reason)
               for k, h in zip(keys, have, strict=True) if not h]
    log.error("job %s: %s (%d images recorded as failed)", job_id, reason, len(missing))
    _redis(store.add_records, job_id, missing)
    try:
        _redis(store.maybe_finalize, job_id)
    except RetryableError as err:
        # The records are complete; only the aggregates are missing (the output may be what
        # fails). `posebatch wait` or the job's next finishing batch writes them.
        log.error("job %s: cannot write the summary (%s); `posebatch wait %s` writes it",
                  job_id, err, job_id)


@app.task(name="posebatch.submit_job")
def submit_job(input_url: str, output_url: str, settings: dict[str, Any] | None = None,
               batch_images: int = 64, force: bool = False) -> str:
    """What a beat schedule entry runs: list INPUT and enqueue its batches, like `submit`."""
    from producer.submit import submit

    rt = state.runtime()
    return submit(input_url, output_url, job=JobSettings.from_dict(settings or {}),
                  broker_url=rt.broker_url, state_url=rt.state_url, batch_images=batch_images,
                  force=force)
