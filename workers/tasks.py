"""The Celery task of the model workers: one batch of images.

Only wiring lives here: the job's parameters become storage objects and an engine, the shared
batch function (``workers.batch``) does the work, and the policy (``workers.policy``) decides
about failures. Its two Celery-shaped outcomes become ``task.retry`` and ``Reject(requeue)``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any, NoReturn

from celery.exceptions import Reject

from posebatch.errors import ConfigError, ModelError
from posebatch.manifest import claim_output, manifest
from posebatch.queue import PROCESS_BATCH
from posebatch.records import Record
from posebatch.settings import ClusterSettings, JobSettings, from_env
from posebatch.storage import Storage, open_storage
from workers import metrics, policy, state
from workers.batch import process_keys
from workers.celery_app import app

log = logging.getLogger(__name__)


class ModelMismatch(Exception):
    """This worker runs another model than the job's (the first worker's): its results must not
    mix with the job's, so the batch goes back to the queue for a worker that has the model."""


MISMATCH_PAUSE_S = 2.0
"""How long a worker of another model holds a batch before handing it back: long enough that an
idle worker with the job's model, blocked on the queue, takes it next instead of this one."""


@app.task(name=PROCESS_BATCH, bind=True, acks_late=True, max_retries=None)
def process_batch(self, job_id: str, batch_id: str, input_url: str, output_url: str,
                  settings: dict[str, Any], force: bool = False,
                  keys: list[str] | None = None) -> int:
    """Process one batch; the message is acknowledged only once every image has a record.

    ``max_retries=None``: the policy alone bounds retries (a count for storage errors, a time
    for storage outages). With Celery's default (3) the last retry raised the storage error
    instead of recording the images as failed, and the job never completed.
    """
    cluster = from_env(ClusterSettings)
    if keys is None:  # the message names the batch; its keys are in the job state
        try:
            keys = policy.patiently(state.job_store().batch_keys, job_id, batch_id,
                                    patience=cluster.state_patience)
        except policy.Requeue as err:
            raise Reject(str(err), requeue=True) from err
        if keys is None:
            log.info("batch %s of job %s is recorded already (or its job is gone): nothing "
                     "to do", batch_id, job_id)
            return 0
    attempt = policy.Attempt(job_id, batch_id, keys, self.request.retries)
    job = JobSettings.from_dict(settings)
    try:  # before the policy counts a delivery: a batch this worker cannot run is not an attempt
        policy.patiently(_check_model, job_id, job, patience=cluster.state_patience)
    except ModelMismatch as err:
        metrics.handed_back()
        with contextlib.suppress(policy.Requeue):  # only a note for `status`
            policy.patiently(state.job_store().note_waiting, job_id,
                             f"{err}; waiting for a worker with the job's model",
                             patience=cluster.state_patience)
        log.warning("batch %s of job %s handed back: %s", batch_id, job_id, err)
        time.sleep(MISMATCH_PAUSE_S)
        raise Reject(str(err), requeue=True) from err
    except policy.Requeue as err:
        raise Reject(str(err), requeue=True) from err
    except (ModelError, ConfigError):
        pass  # the model cannot open for this job: the policy records why, in work() below

    def work() -> list[Record]:
        return _run(job_id, input_url, output_url, keys, job, force, cluster.state_patience)

    try:
        with metrics.batch():
            return policy.run_batch(state.job_state(), attempt, work,
                                    patience=cluster.state_patience,
                                    storage_patience=cluster.storage_patience)
    except policy.Requeue as err:
        # Not acknowledged: back to the queue (or, if the broker is down too, redelivered after
        # the visibility timeout). Recording nothing now loses nothing: records are idempotent.
        log.error("batch %s of job %s: %s; the batch goes back to the queue", batch_id, job_id,
                  err)
        raise Reject(str(err), requeue=True) from err
    except policy.Retry as err:
        _retry(self, err)


def _run(job_id: str, input_url: str, output_url: str, keys: list[str], job: JobSettings,
         force: bool, state_patience: float) -> list[Record]:
    _model, ref, label = state.load_model(job)
    store = state.job_store()
    policy.patiently(store.note_runner, job_id, label, patience=state_patience)
    src, dst = _storage(input_url), _storage(output_url)
    _claim(job_id, dst, manifest(job, ref.sha256, ref.name, label), force)
    engine = state.engine(job)  # threads and batch memory kept from task to task
    before = engine.stages.snapshot()
    records = process_keys(engine, src, dst, keys, skip_existing=not force)
    metrics.images(records)
    metrics.stages(engine.stages.since(before))
    return records


def _check_model(job_id: str, job: JobSettings) -> None:
    """The job's model is the first worker's (recorded once); raise ModelMismatch if this
    worker's model for ``job`` is another file."""
    _model, ref, _label = state.load_model(job)
    on_record = state.job_store().note_model(job_id, {"name": ref.name, "sha256": ref.sha256})
    if on_record["sha256"] != ref.sha256:
        raise ModelMismatch(f"job {job_id} runs model {on_record.get('name')} "
                            f"({on_record['sha256'][:12]}) but this worker has {ref.name} "
                            f"({ref.sha256[:12]})")


def _claim(job_id: str, dst: Storage, wanted: dict[str, Any], force: bool) -> None:
    """Check and write the output manifest once per job in this process."""
    if not state.has_claimed(job_id):
        claim_output(dst, wanted, force)
        state.note_claimed(job_id)


def _retry(task, err: policy.Retry) -> NoReturn:
    """``task.retry``, except that a retry Celery cannot publish (broker down) does not drop the
    message, as Celery would (Reject without requeue): it stays queued, or comes back after the
    visibility timeout."""
    try:
        raise task.retry(exc=err.cause, countdown=err.countdown) from err.cause
    except Reject as rej:
        raise Reject(rej.reason, requeue=True) from err.cause


@functools.lru_cache(maxsize=32)
def _storage(url: str) -> Storage:
    """One storage object per URL per worker process, so one S3 client (created lazily after
    fork): a new boto3 client costs ~0.1 s, more than all S3 requests of a small batch."""
    return open_storage(url)
