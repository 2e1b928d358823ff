"""The Celery app both roles share: queue and task names, broker settings, error translation.

Why in the core: the producer sends tasks by name and the workers consume them; if each built its
own app, queue names and broker options could drift. Neither role imports the other: the
producer's app knows the tasks by name only, a worker's app registers them (``include``).

Why each setting (also in the README):
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a batch is acknowledged only after its
  results are written; if the worker dies mid-batch the broker hands it to another worker.
- ``worker_prefetch_multiplier = 1``: a worker reserves one batch at a time, so a slow or dying
  worker does not sit on batches other workers could run.
- ``visibility_timeout`` (Redis transport, 60 s): how long an unacknowledged batch stays
  invisible before Redis redelivers it. A live worker renews the batches it holds every 15 s
  (``posebatch.lease``), so only a lost machine's batches time out: they run again about a
  minute later, while a batch may run for hours on a live worker and still runs once.
- ``unacked_mutex_expire`` (12 s at the default timeout, kombu's default 300 s): see
  ``restore_mutex_seconds``.
- ``task_ignore_result``: results live in storage and job records, not in a result backend.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

from celery import Celery

from posebatch.errors import BrokerUnavailable
from posebatch.jobstate import redis_errors, strip_urls
from posebatch.lease import LEASE_RENEW_CONF, LeaseRenewal
from posebatch.queuenames import CONTROL_QUEUE, PROCESS_BATCH, QUEUE, SUBMIT_JOB
from posebatch.settings import ClusterSettings, RuntimeSettings, from_env

__all__ = ["CONTROL_QUEUE", "PROCESS_BATCH", "QUEUE", "SUBMIT_JOB", "broker_errors", "make_app",
           "restore_mutex_seconds", "restore_sweep_seconds"]


def restore_sweep_seconds(visibility_timeout: int) -> int:
    """How often a worker sweeps Redis for unacknowledged batches whose lease ran out (a lost
    worker's) and puts them back in the queue. kombu 5.7 defaults to a real sweep only every
    10 x 10 s, which would add up to 100 s to every recovery; one cheap ZRANGE every few seconds
    is nothing next to a batch. Recovery time = timeout + one renewal + at most one sweep."""
    return max(1, min(10, visibility_timeout // 10))


def restore_mutex_seconds(visibility_timeout: int) -> int:
    """How long the lock a sweep holds (kombu's ``unacked_mutex``) outlives a worker killed
    inside a sweep. kombu's default is 300 s: one machine lost mid-sweep (a ZRANGE and a few
    restores: milliseconds, but every few seconds on every worker) stopped every worker's
    recovery for five minutes (seen: tests/test_faults.py's restart waited past its 150 s).
    Two sweep intervals is far more than a sweep takes; if one ever took longer, a second
    worker sweeping too is harmless (each restore is a WATCHed transaction: once per tag)."""
    return 2 * restore_sweep_seconds(visibility_timeout)


def make_app(broker_url: str | None = None, include: Sequence[str] = ()) -> Celery:
    """The Celery app; ``include`` names the task modules this process registers."""
    url = broker_url or from_env(RuntimeSettings).broker_url
    cluster = from_env(ClusterSettings)
    app = Celery("posebatch", broker=url, include=list(include))
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        task_routes={SUBMIT_JOB: {"queue": CONTROL_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={
            "visibility_timeout": cluster.visibility_timeout,
            "unacked_restore_interval": restore_sweep_seconds(cluster.visibility_timeout),
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": restore_mutex_seconds(cluster.visibility_timeout)},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_track_started=False,
        worker_send_task_events=True,  # Flower and `celery events` see tasks as they run
        timezone="UTC",
    )
    app.conf[LEASE_RENEW_CONF] = cluster.renew_seconds
    app.steps["consumer"].add(LeaseRenewal)  # inert unless this process runs a worker
    if url.startswith("rediss://"):
        # Certificates are checked by default; see README for ssl_cert_reqs in the URL.
        app.conf.broker_use_ssl = {"ssl_cert_reqs": os.environ.get("POSEBATCH_SSL_CERT_REQS",
                                                                   "required")}
    return app


@contextlib.contextmanager
def broker_errors() -> Iterator[None]:
    """Translate kombu's and redis-py's errors while talking to the broker."""
    from kombu.exceptions import OperationalError

    with redis_errors():
        try:
            yield
        except OperationalError as err:
            raise BrokerUnavailable(f"cannot reach the broker ({strip_urls(str(err))}); is it "
                                    "running?") from err
