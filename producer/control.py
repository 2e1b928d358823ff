"""The control worker: scheduled submissions (list INPUT, enqueue its batches) and the watchdog
that queues again batches lost with a machine.

Why not on the model workers: a listing of a large prefix takes minutes and needs no model; a GPU
worker running it would sit idle. ``posebatch control`` consumes only the control queue, where
``posebatch beat`` sends ``submit_job``. It runs tasks in a thread (``--pool threads``), so its
main process keeps renewing the lease on a long listing and keeps running the watchdog.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime
from typing import Any

from celery import bootsteps

from posebatch.jobend import maybe_finalize
from posebatch.jobstate import PREFIX, JobStore, redis_errors
from posebatch.queue import CONTROL_QUEUE, SUBMIT_JOB, make_app
from posebatch.settings import (
    DEFAULT_BATCH_IMAGES,
    ClusterSettings,
    JobSettings,
    RuntimeSettings,
    from_env,
)
from producer.reaper import Reaper
from producer.submit import submit

log = logging.getLogger(__name__)
LISTING_LOCK_SECONDS = 120
"""Expiry of the lock a scheduled listing holds, refreshed at every batch it queues: a control
worker that dies mid-listing frees its schedule within two minutes."""
WATCHED_JOBS = 200


class Watchdog(bootsteps.StartStopStep):
    """Every half ``requeue_after``, look at running jobs that recorded nothing for
    ``requeue_after`` seconds and queue again their lost batches (``producer.reaper``), and
    finalize complete jobs whose finalizer died, so a job finishes by itself even when nobody
    runs `posebatch wait`."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.tref = None

    def start(self, c: Any) -> None:
        rt, cluster = from_env(RuntimeSettings), from_env(ClusterSettings)
        self.after = cluster.requeue_after
        self.store = JobStore.from_url(rt.state_url or rt.broker_url)
        self.reaper = Reaper(self.store, rt.broker_url, grace=self.after / 2)
        self.tref = c.timer.call_repeatedly(self.after / 2, self.tick, priority=10)

    def tick(self) -> None:
        try:
            for job_id in self.store.recent(WATCHED_JOBS):
                p = self.store.progress(job_id)
                if p is None or p.state != "running" or not p.submitted:
                    continue
                if p.total is not None and p.done >= p.total:
                    # Complete but not finalized: its finalizer died (OOM-killed?) and its
                    # lock has expired, or no batch was left to finalize it.
                    maybe_finalize(self.store, job_id)
                    continue
                last = p.updated_at or p.started_at or _timestamp(p.created)
                if time.time() - last >= self.after:
                    self.reaper.look(job_id)
        except Exception as err:  # the watchdog must never take the control worker down
            log.warning("watchdog: %s", err)

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None


def _timestamp(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return time.time()


app = make_app(include=["producer.control"])
app.steps["consumer"].add(Watchdog)


def schedule_key(input_url: str, output_url: str) -> str:
    digest = hashlib.sha256(f"{input_url}\n{output_url}".encode()).hexdigest()[:16]
    return f"{PREFIX}:schedule:{digest}"


@app.task(name=SUBMIT_JOB, queue=CONTROL_QUEUE)
def submit_job(input_url: str, output_url: str, settings: dict[str, Any] | None = None,
               batch_images: int = DEFAULT_BATCH_IMAGES, force: bool = False,
               inventory: str | None = None) -> str:
    """What a beat schedule entry runs: list INPUT (or read its newest S3 Inventory report,
    ``inventory``) and enqueue its batches, like `submit`.

    A run does not start while the previous run of the same INPUT -> OUTPUT is still going
    (listing, or its job still running): the nightly run of a folder that took 25 hours would
    otherwise overlap the next one and process its images twice.
    """
    rt = from_env(RuntimeSettings)
    store = JobStore.from_url(rt.state_url or rt.broker_url)
    key = schedule_key(input_url, output_url)
    with redis_errors():
        previous = store.r.get(f"{key}:last")
        p = store.progress(previous.decode()) if previous else None
        if p is not None and p.state == "running":
            log.warning("schedule %s -> %s: the previous run (job %s) is still running; this "
                        "run is skipped", input_url, output_url, p.job_id)
            return f"skipped: job {p.job_id} still running"
        if not store.r.set(f"{key}:lock", 1, nx=True, ex=LISTING_LOCK_SECONDS):
            log.warning("schedule %s -> %s: the previous run is still listing; this run is "
                        "skipped", input_url, output_url)
            return "skipped: previous run still listing"

    def refresh(_n: int) -> None:
        store.r.expire(f"{key}:lock", LISTING_LOCK_SECONDS)

    try:
        job_id = submit(input_url, output_url, job=JobSettings.from_dict(settings or {}),
                        broker_url=rt.broker_url, state_url=rt.state_url,
                        batch_images=batch_images, force=force, on_batch=refresh,
                        inventory=inventory)
        # Expires with the job's own state: a schedule removed from the file leaves nothing.
        store.r.set(f"{key}:last", job_id, ex=from_env(ClusterSettings).job_retention)
        return job_id
    finally:
        store.r.delete(f"{key}:lock")
