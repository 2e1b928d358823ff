"""``posebatch status`` and ``posebatch wait``: a job's progress, read from its Redis records."""

from __future__ import annotations

import os
import sys
import time

from posebatch.errors import ConfigError
from posebatch.jobend import maybe_finalize
from posebatch.jobstate import JobProgress, JobStore
from producer.reaper import Reaper

STALL_SECONDS = float(os.environ.get("POSEBATCH_STALL_SECONDS", "600"))
LOST_HINT = ("its state is gone from Redis (a restart without persistence, or another Redis). "
             "Recover with the same `posebatch submit INPUT --out OUTPUT`: images that already "
             "have a result are skipped, and the new job's summary counts them all")


def describe(p: JobProgress, full: str | None = None) -> str:
    """One line on a job; ``full``: why Redis refuses writes now (``JobStore.full``)."""
    total = "?" if p.total is None else str(p.total)
    # The rate counts the images that got a result: refused ones cost microseconds, and an
    # all-failed job printed "14000.0 img/s".
    ok = p.done - p.failed
    speed = f"{p.rate * ok / p.done:.1f} img/s" if ok > 0 else "no rate (no image succeeded)"
    line = f"job {p.job_id}: {p.state}; {p.done}/{total} images done, {p.failed} failed, {speed}"
    if not p.submitted and p.state != "abandoned":
        line += " (still being submitted, or the producer stopped before the end: resubmit)"
    if p.state == "done":
        line += f"; summary in {p.output}"
    if p.state == "abandoned":
        line += f": {p.error}"
    if p.state == "running" and p.waiting:
        line += f"; waiting: {p.waiting}"
    if p.state == "running" and full:
        line += f"; waiting: {full}"
    idle = time.time() - (p.updated_at or p.started_at or time.time())
    if p.state == "running" and idle > STALL_SECONDS:
        line += (f"; no progress for {idle / 60:.0f} min: check that workers run "
                 "(`celery -A workers.celery_app inspect active`); a batch lost in a crash "
                 "returns after the visibility timeout, or resubmit the same job (done images "
                 "are skipped)")
    return line


def unknown(store: JobStore, job_id: str) -> str:
    """Why a job id has no state here, as precisely as Redis lets us tell.

    A generated id carries its creation time: created before this Redis started, its state was
    lost with a restart; created after, it should be here, so the id is probably mistyped (or
    the job finished longer ago than the retention). A hand-picked id says nothing: both."""
    created = job_created(job_id)
    started = store.server_started()
    recent = ", ".join(store.recent(5)) or "none"
    mistyped = (f"no job {job_id} in this Redis: check the id (recent jobs: {recent}; "
                "`posebatch status` lists them); finished jobs are kept for "
                "POSEBATCH_JOB_RETENTION seconds (default 7 days)")
    if created is not None and started is not None and created + 1 >= started:
        return mistyped
    if created is not None and started is not None:
        return f"job {job_id} is unknown: {LOST_HINT}"
    return f"{mistyped}. If it did run here, {LOST_HINT}"


def job_created(job_id: str) -> float | None:
    """The creation time encoded in a generated id (``new_job_id``), else None."""
    from datetime import UTC, datetime

    try:
        return datetime.strptime(job_id[:15], "%Y%m%d-%H%M%S").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def get(store: JobStore, job_id: str) -> JobProgress:
    p = store.progress(job_id)
    if p is None:
        raise ConfigError(unknown(store, job_id))
    return p


def wait(store: JobStore, job_id: str, *, poll: float = 1.0, timeout: float | None = None,
         progress: bool | None = None, reaper: Reaper | None = None,
         requeue_after: float = 30.0) -> JobProgress:
    """Block until the job is done (or ``timeout`` s pass); show a progress bar on a terminal.

    With a ``reaper``, a job that records nothing for ``requeue_after`` seconds is checked for
    batches lost with a machine, which are queued again: `wait` ends by itself."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    deadline = None if timeout is None else time.monotonic() + timeout
    p = get(store, job_id)
    last_done, moved_at, looked_at = p.done, time.monotonic(), 0.0
    with tqdm(total=p.total, unit="img", disable=not show, dynamic_ncols=True) as bar:
        while True:
            p = store.progress(job_id)
            if p is None:
                raise ConfigError(f"job {job_id} disappeared while waiting: {LOST_HINT}")
            if p.total is not None and bar.total != p.total:
                bar.total = p.total
            bar.n = p.done
            bar.set_postfix(failed=p.failed, refresh=False)
            bar.refresh()
            if p.state == "done":
                return p
            if p.state == "abandoned":
                raise ConfigError(f"job {job_id} was abandoned: {p.error}")
            if p.submitted and p.total is not None and p.done >= p.total:
                maybe_finalize(store, job_id)  # the last worker died before finalizing
            now = time.monotonic()
            if p.done != last_done:
                last_done, moved_at = p.done, now
            elif (reaper is not None and p.submitted and p.state == "running"
                  and now - moved_at >= requeue_after and now - looked_at >= reaper.grace):
                looked_at = now
                reaper.look(job_id, now)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not done after {timeout} s: "
                                   f"{describe(p, store.full())}")
            time.sleep(poll)
