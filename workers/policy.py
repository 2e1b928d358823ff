"""What happens to a batch when things go wrong: retries, backoff, poison batches, missing images.

Why apart from the Celery task: this is the part of the cluster that decides whether images are
lost, retried or recorded as failed, so it must be readable in one place and unit-testable without
a broker (``tests/stubs.py`` holds an in-memory job state). ``workers/tasks.py`` only translates
the two outcomes that need Celery (``Retry``, ``Requeue``) into Celery's own exceptions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from posebatch.errors import (
    INTERNAL_ERROR,
    PermanentError,
    RetryableError,
    StateFull,
    StateUnavailable,
    StorageUnreachable,
)
from posebatch.records import Record

log = logging.getLogger(__name__)

MAX_RETRIES = 4
"""Storage errors other than outages: retried with exponential backoff, then the batch's images
are failed."""
STORAGE_PATIENCE = 600.0
"""Seconds of backoff a batch spends waiting out a storage outage before it gives up (the
default of ``ClusterSettings.storage_patience``)."""
OUTAGE_BACKOFF_CAP = 60
MAX_DELIVERIES = 8
"""Starts of one batch, retries and redeliveries after worker loss included (poison batches)."""
STATE_PATIENCE = 60.0
FULL_POLL_S = 1.0
FULL_LOG_SECONDS = 30.0
"""While Redis is full: try again every second, say so in the log every 30 s."""
"""Seconds a batch waits for the job-state Redis to come back before it goes back to the queue."""
_T = TypeVar("_T")


class JobState(Protocol):
    """The part of the job store (``posebatch.jobstate``) and of the end-of-job policy
    (``posebatch.jobend``: ``maybe_finalize``) the policy uses (``workers.state.job_state``)."""

    def has_job(self, job_id: str) -> bool: ...
    def count_delivery(self, job_id: str, batch_id: str) -> int: ...
    def has_record(self, job_id: str, keys: list[str]) -> list[bool]: ...
    def add_records(self, job_id: str, records: list[Record],
                    batch_id: str | None = None) -> bool: ...
    def maybe_finalize(self, job_id: str) -> bool: ...
    def note_waiting(self, job_id: str, why: str) -> None: ...


class Retry(Exception):  # noqa: N818 - an outcome, like Celery's own Retry
    """Run the batch again after ``countdown`` seconds."""

    def __init__(self, cause: Exception, countdown: int) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.countdown = countdown


class Requeue(Exception):  # noqa: N818
    """Give the message back to the broker unacknowledged; nothing was recorded, nothing lost."""


@dataclass(frozen=True)
class Attempt:
    job_id: str
    batch_id: str
    keys: list[str]
    retries: int
    """How many times this delivery has been retried already (Celery's ``request.retries``)."""


def backoff(retries: int) -> int:
    return min(2 ** retries, 30)


def outage_backoff(retries: int) -> int:
    return min(2 ** retries, OUTAGE_BACKOFF_CAP)


def outage_waited(retries: int) -> int:
    """Seconds of countdown spent before retry number ``retries`` of an outage."""
    return sum(outage_backoff(i) for i in range(retries))


def patiently(call: Callable[..., _T], *args: object, patience: float = STATE_PATIENCE,
              sleep: Callable[[float], None] = time.sleep) -> _T:
    """Run one job-state call, waiting out a Redis outage (restart, failover) for a while.

    Why not a Celery retry: the broker is usually the same Redis, so while it is down a retry
    cannot be published. Every call passed here is idempotent (HSET of the same values) or
    harmless when repeated (the delivery counter only bounds poison batches).
    """
    deadline = time.monotonic() + patience
    delay = 0.5
    told = 0.0
    while True:
        try:
            return call(*args)
        except StateFull as err:
            # A full Redis refuses the requeue and the acknowledgement as well: handing the batch
            # back cannot work, so hold it (its lease expires, nothing else moves either) and
            # go on the moment Redis takes writes again.
            if time.monotonic() - told >= FULL_LOG_SECONDS:
                log.error("%s; this batch waits (checking every %.0f s)", err, FULL_POLL_S)
                told = time.monotonic()
            sleep(FULL_POLL_S)
        except StateUnavailable as err:
            if time.monotonic() + delay > deadline:
                raise Requeue(f"job state unreachable for {patience:.0f} s: {err}") from err
            log.warning("job state Redis unreachable (%s); trying again in %.1f s", err, delay)
            sleep(delay)
            delay = min(delay * 2, 5.0)


def run_batch(state: JobState, attempt: Attempt, work: Callable[[], list[Record]], *,
              max_retries: int = MAX_RETRIES, max_deliveries: int = MAX_DELIVERIES,
              patience: float = STATE_PATIENCE,
              storage_patience: float = STORAGE_PATIENCE) -> int:
    """Run ``work`` for one batch under the policy; return how many images were recorded.

    Raises ``Retry`` (storage hiccup, retries left) or ``Requeue`` (job state unreachable).
    Every other way out records each image of the batch, so a job always completes.
    """
    job_id, batch_id = attempt.job_id, attempt.batch_id

    def state_call(call: Callable[..., _T], *args: object) -> _T:
        return patiently(call, *args, patience=patience)

    if not state_call(state.has_job, job_id):
        log.error("job %s is unknown: its state is gone from Redis (restarted without "
                  "persistence?); batch %s dropped. Run the same `posebatch submit` again: "
                  "images with results are skipped", job_id, batch_id)
        return 0
    if state_call(state.count_delivery, job_id, batch_id) > max_deliveries:
        return fail_missing(state, attempt, f"batch {batch_id} abandoned after "
                            f"{max_deliveries} attempts (the worker died or failed each time); "
                            "resubmit to retry", patience)
    try:
        records = work()
    except Requeue:
        raise
    except StateUnavailable as err:
        raise Requeue(str(err)) from err
    except StorageUnreachable as err:
        # An outage: wait it out for minutes (the README promises that transient storage errors
        # never fail images), bounded, and say so in the job's status meanwhile.
        waited = outage_waited(attempt.retries)
        if waited >= storage_patience:
            return fail_missing(state, attempt, f"batch {batch_id} failed: storage unreachable "
                                f"for {waited} s ({attempt.retries + 1} attempts): {err}",
                                patience)
        countdown = outage_backoff(attempt.retries)
        state_call(state.note_waiting, job_id,
                   f"storage unreachable, batches retry for up to {storage_patience:.0f} s "
                   f"(waited {waited} s so far): {err}")
        log.warning("batch %s of job %s: %s; storage outage, retry in %s s", batch_id, job_id,
                    err, countdown)
        raise Retry(err, countdown) from err
    except RetryableError as err:
        if attempt.retries >= max_retries:
            return fail_missing(state, attempt, f"batch {batch_id} failed after "
                                f"{max_retries + 1} attempts: {err}", patience)
        log.warning("batch %s of job %s: %s; retry in %s s", batch_id, job_id, err,
                    backoff(attempt.retries))
        raise Retry(err, backoff(attempt.retries)) from err
    except PermanentError as err:
        return fail_missing(state, attempt, f"batch {batch_id} cannot run: {err}", patience)
    except Exception as err:  # a bug must not leave the job waiting forever for these images
        log.exception("batch %s of job %s failed", batch_id, job_id)
        return fail_missing(state, attempt, f"batch {batch_id} failed: {type(err).__name__}: "
                            f"{err}", patience)
    # Results are written; recording them twice (a redelivery) is idempotent.
    if not state_call(state.add_records, job_id, records, batch_id):
        log.error("job %s disappeared from Redis while batch %s ran (restarted without "
                  "persistence?); its results are written, resubmit the job to count them",
                  job_id, batch_id)
        return 0
    try:
        state_call(state.maybe_finalize, job_id)
    except RetryableError as err:  # the aggregates could not be written
        if attempt.retries >= max_retries:
            log.error("job %s: cannot write the summary (%s); `posebatch wait %s` writes it",
                      job_id, err, job_id)
            return len(records)
        # Running the batch again finds its results (skipped) and finalizes again.
        raise Retry(err, backoff(attempt.retries)) from err
    return len(records)


def fail_missing(state: JobState, attempt: Attempt, reason: str,
                 patience: float = STATE_PATIENCE) -> int:
    """Record every image of the batch that has no record yet as failed, with the reason, so the
    job completes and the summary says what happened instead of waiting forever. They are
    marked ``batch_failure``: a rerun tries them again, whatever the reason says."""
    have = patiently(state.has_record, attempt.job_id, attempt.keys, patience=patience)
    missing = [Record(k, False, INTERNAL_ERROR, 0, 0, reason, batch_failure=True)
               for k, h in zip(attempt.keys, have, strict=True) if not h]
    log.error("job %s: %s (%d images recorded as failed)", attempt.job_id, reason, len(missing))
    patiently(state.add_records, attempt.job_id, missing, attempt.batch_id, patience=patience)
    try:
        patiently(state.maybe_finalize, attempt.job_id, patience=patience)
    except RetryableError as err:
        # The records are complete; only the aggregates are missing (the output may be what
        # fails). `posebatch wait` or the job's next finishing batch writes them.
        log.error("job %s: cannot write the summary (%s); `posebatch wait %s` writes it",
                  attempt.job_id, err, attempt.job_id)
    return 0
