"""The only process-wide state of a worker: its model session, job-store client and claimed jobs.

Why a module: Celery's ``worker_process_init`` loads the model once after fork; tasks fetch it
here. Any other process (tests, the local run) never touches this module.
"""

from __future__ import annotations

import logging
import time

from posebatch.jobstate import JobStore
from posebatch.modelstore import ModelRef
from posebatch.settings import JobSettings, RuntimeSettings, from_env
from workers import metrics
from workers.engine.backends import Runner
from workers.engine.topdown import TopDownModel
from workers.loading import open_model, runner_label, select_model

log = logging.getLogger(__name__)

_models: dict[tuple[str, str], tuple[Runner | TopDownModel, ModelRef, str]] = {}
"""Open models by (precision, backend): the worker's own, plus one per pin a job asked for."""
MAX_MODELS = 2
_store: JobStore | None = None
_claimed: set[str] = set()  # jobs whose output manifest this process has checked and written


def runtime() -> RuntimeSettings:
    return from_env(RuntimeSettings)


def load_model(job: JobSettings | None = None) -> tuple[Runner | TopDownModel, ModelRef, str]:
    """The model for ``job``'s pinned precision and backend (this worker's own when the job
    leaves them ``auto``), loaded on first use, with which file it is and its runner label."""
    rt = runtime() if job is None else job.pinned_runtime(runtime())
    key = (rt.precision, rt.backend)
    if key not in _models:
        start = time.perf_counter()
        sel = select_model(rt)
        model = open_model(rt, sel.ref, sel.trt_present, sel.backend)
        metrics.model_loaded(time.perf_counter() - start)
        label = runner_label(model, sel.ref)
        log.warning("worker model %s (%s) on %s: %s; batches of jobs that run another model "
                    "are handed back to the queue", sel.ref.name, sel.ref.sha256[:12],
                    model.info.provider, label)
        if len(_models) >= MAX_MODELS:  # a pin seldom used: the oldest one goes
            del _models[next(k for k in _models if k != (runtime().precision,
                                                         runtime().backend))]
        _models[key] = (model, sel.ref, label)
    return _models[key]


def job_store() -> JobStore:
    global _store
    if _store is None:
        rt = runtime()
        _store = JobStore.from_url(rt.state_url or rt.broker_url)
    return _store


def has_claimed(job_id: str) -> bool:
    return job_id in _claimed


def note_claimed(job_id: str) -> None:
    _claimed.add(job_id)
