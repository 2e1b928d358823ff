"""The model workers' Celery app: the shared app (``posebatch.queue``) plus the per-process model.

Why a module of its own: ``celery -A workers.celery_app`` and ``posebatch worker`` need an app
object that registers the batch task and loads the model once per child process, after fork.
"""

from __future__ import annotations

from celery import signals

from posebatch.lease import LeaseRenewal
from posebatch.queue import make_app

app = make_app(include=["workers.tasks"])


class MeteredLease(LeaseRenewal):
    """The lease of ``posebatch.lease``, counting renewals in the worker's metrics."""

    def tick(self) -> int:
        from workers import metrics

        n = super().tick()
        metrics.lease_renewed(n)
        return n


app.steps["consumer"].discard(LeaseRenewal)
app.steps["consumer"].add(MeteredLease)


@signals.worker_process_init.connect
def _load_model_in_child(**_kwargs) -> None:
    """One ONNX Runtime session per worker process, created after fork (never in the parent:
    a CUDA context or ORT thread pool does not survive fork)."""
    from workers import state

    state.load_model()
