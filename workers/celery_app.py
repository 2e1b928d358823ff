"""The Celery application: broker settings a GPU batch worker needs, and the per-process model.

Why each setting (also in the README):
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a batch is acknowledged only after its
  results are written; if the worker dies mid-batch the broker hands it to another worker.
- ``worker_prefetch_multiplier = 1``: a worker reserves one batch at a time, so a slow or dying
  worker does not sit on batches other workers could run.
- ``visibility_timeout`` (Redis transport): how long an unacknowledged batch stays invisible
  before Redis redelivers it; far above the longest batch, or busy batches would run twice.
- ``task_ignore_result``: results live in storage and job records, not in a result backend.
"""

from __future__ import annotations

import logging
import os

from celery import Celery, signals

from posebatch.settings import RuntimeSettings, from_env

log = logging.getLogger(__name__)

QUEUE = "posebatch"
CONTROL_QUEUE = "posebatch-control"
VISIBILITY_TIMEOUT = int(os.environ.get("POSEBATCH_VISIBILITY_TIMEOUT", str(4 * 3600)))
# How often a worker sweeps Redis for unacknowledged batches older than the visibility timeout
# (those of a worker that died) and puts them back in the queue. kombu 5.7 defaults to a real
# sweep only every 10 x 10 s, which adds up to 100 s to every recovery; one cheap ZRANGE every
# few seconds is nothing next to a batch. Recovery time = visibility timeout + at most one sweep.
RESTORE_SWEEP_SECONDS = max(1, min(10, VISIBILITY_TIMEOUT // 10))


def make_app(broker_url: str | None = None) -> Celery:
    url = broker_url or from_env(RuntimeSettings).broker_url
    app = Celery("posebatch", broker=url, include=["workers.tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        task_routes={"posebatch.submit_job": {"queue": CONTROL_QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT,
                                  "unacked_restore_interval": RESTORE_SWEEP_SECONDS,
                                  "unacked_restore_throttle": 1},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_track_started=False,
        worker_send_task_events=False,
        timezone="UTC",
    )
    if url.startswith("rediss://"):
        # Certificates are checked by default; see README for ssl_cert_reqs in the URL.
        app.conf.broker_use_ssl = {"ssl_cert_reqs": os.environ.get("POSEBATCH_SSL_CERT_REQS",
                                                                   "required")}
    return app


app = make_app()


@signals.worker_process_init.connect
def _load_model_in_child(**_kwargs) -> None:
    """One ONNX Runtime session per worker process, created after fork (never in the parent:
    a CUDA context or ORT thread pool does not survive fork)."""
    from workers import state

    state.load_engine()
