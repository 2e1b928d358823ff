"""The only process-wide state of a worker: its model session, engine, job-store client and
claimed jobs.

Why a module: Celery's ``worker_process_init`` loads the model once after fork; tasks fetch it
here. Any other process (tests, the local run) never touches this module.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict

from posebatch.jobstate import JobStore
from posebatch.modelstore import ModelRef
from posebatch.settings import JobSettings, RuntimeSettings, from_env
from workers import metrics
from workers.engine.backends import Runner
from workers.engine.pipeline import PoseEngine
from workers.engine.topdown import TopDownModel
from workers.loading import open_model, select_model

log = logging.getLogger(__name__)

_model: Runner | TopDownModel | None = None
_model_ref: ModelRef | None = None
_store: JobStore | None = None
_claimed: set[str] = set()  # jobs whose output manifest this process has checked and written
_engines: OrderedDict[str, PoseEngine] = OrderedDict()
MAX_ENGINES = 2
"""Engines kept for as many distinct job settings (LRU): a worker usually serves one job."""


def runtime() -> RuntimeSettings:
    return from_env(RuntimeSettings)


def load_model() -> tuple[Runner | TopDownModel, ModelRef]:
    """This process's model (loaded on first use) and which file it is."""
    global _model, _model_ref
    if _model is None:
        rt = runtime()
        start = time.perf_counter()
        sel = select_model(rt)
        _model_ref = sel.ref
        _model = open_model(rt, sel.ref, sel.trt_present, sel.backend)
        metrics.model_loaded(time.perf_counter() - start)
        log.warning("worker model %s (%s) on %s", _model_ref.name, _model_ref.sha256[:12],
                    _model.info.provider)
    assert _model_ref is not None
    return _model, _model_ref


def engine(job: JobSettings) -> PoseEngine:
    """This process's engine for ``job``'s settings: its decode and writer threads and its batch
    memory are made once and serve every batch task (each task made its own before)."""
    key = json.dumps(job.to_dict(), sort_keys=True)
    found = _engines.get(key)
    if found is None:
        model, _ref = load_model()
        rt = runtime()
        found = _engines[key] = PoseEngine(model, job, rt.batch_size, rt.io_threads)
        if len(_engines) > MAX_ENGINES:
            _engines.popitem(last=False)[1].close()
    _engines.move_to_end(key)
    return found


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
