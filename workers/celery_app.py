"""The model workers' Celery app: the shared app (``posebatch.queue``) plus the per-process model.

Why a module of its own: ``celery -A workers.celery_app`` and ``posebatch worker`` need an app
object that registers the batch task and loads the model once per child process, after fork.
"""

from __future__ import annotations

from celery import signals

from posebatch.queue import make_app

app = make_app(include=["workers.tasks"])


@signals.worker_process_init.connect
def _load_model_in_child(**_kwargs) -> None:
    """One ONNX Runtime session per worker process, created after fork (never in the parent:
    a CUDA context or ORT thread pool does not survive fork)."""
    from workers import state

    state.load_model()
