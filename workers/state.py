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

from posebatch import jobend
from posebatch.jobstate import JobStore
from posebatch.modelstore import ModelRef
from posebatch.records import Record
from posebatch.settings import JobSettings, RuntimeSettings, from_env
from workers import metrics
from workers.engine.backends import Runner
from workers.engine.pipeline import PoseEngine
from workers.engine.topdown import TopDownModel
from workers.loading import open_model, runner_label, select_model

log = logging.getLogger(__name__)

_models: dict[tuple[str, str], tuple[Runner | TopDownModel, ModelRef, str]] = {}
"""Open models by (precision, backend): the worker's own, plus one per pin a job asked for."""
MAX_MODELS = 2
_store: JobStore | None = None
_claimed: set[str] = set()  # jobs whose output manifest this process has checked and written
_engines: OrderedDict[str, PoseEngine] = OrderedDict()
MAX_ENGINES = 2
"""Engines kept for as many distinct job settings (LRU): a worker usually serves one job."""


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


def engine(job: JobSettings) -> PoseEngine:
    """This process's engine for ``job``'s settings: its decode and writer threads, its decode
    processes (``decode_workers``) and its batch memory are made once and serve every batch
    task (each task made its own before)."""
    key = json.dumps(job.to_dict(), sort_keys=True)
    found = _engines.get(key)
    if found is None:
        model, _ref, _label = load_model(job)
        rt = runtime()
        found = _engines[key] = PoseEngine(model, job, rt.batch_size,
                                           rt.io_threads_for(local=False),
                                           rt.decode_workers, rt.decode)
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


class PolicyState:
    """``workers.policy.JobState`` over this worker's store: the store's reads and writes, and
    ``maybe_finalize`` from the end-of-job policy (``posebatch.jobend``), which the store does
    not run (it only stores)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def has_job(self, job_id: str) -> bool:
        return self.store.has_job(job_id)

    def count_delivery(self, job_id: str, batch_id: str) -> int:
        return self.store.count_delivery(job_id, batch_id)

    def has_record(self, job_id: str, keys: list[str]) -> list[bool]:
        return self.store.has_record(job_id, keys)

    def add_records(self, job_id: str, records: list[Record],
                    batch_id: str | None = None) -> bool:
        return self.store.add_records(job_id, records, batch_id)

    def note_waiting(self, job_id: str, why: str) -> None:
        self.store.note_waiting(job_id, why)

    def maybe_finalize(self, job_id: str) -> bool:
        return jobend.maybe_finalize(self.store, job_id)


def job_state() -> PolicyState:
    """What ``workers.policy.run_batch`` works on: the job store and the end-of-job policy."""
    return PolicyState(job_store())


def has_claimed(job_id: str) -> bool:
    return job_id in _claimed


def note_claimed(job_id: str) -> None:
    _claimed.add(job_id)
