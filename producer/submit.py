"""``posebatch submit``: list the images of INPUT, cut them into batch tasks, enqueue them.

Why it streams: the listing is consumed page by page and each batch is sent as soon as it is
full, so a prefix with a million keys needs memory for one batch, and workers start on the first
batches while the listing is still running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from typing import Any, TypeVar

from posebatch.errors import ConfigError
from posebatch.finalize import INPUTS_NAME
from posebatch.jobend import maybe_finalize, write_aggregates
from posebatch.jobstate import JobStore, connect, new_job_id, redis_errors
from posebatch.manifest import check_output, manifest
from posebatch.queue import PROCESS_BATCH, QUEUE, broker_errors, make_app
from posebatch.roottables import has_tables
from posebatch.selection import Selection, select_keys
from posebatch.settings import DEFAULT_BATCH_IMAGES, ClusterSettings, JobSettings, from_env
from posebatch.storage import ObjectInfo, Storage, open_storage
from producer.inventory import inventory_objects
from producer.rerun import CHANGED, NEW, inputs_line, listed_objects, rerun_plan

log = logging.getLogger(__name__)
ENQUEUE_GROUP = 64
"""Batches whose key lists go to Redis in one round trip before their messages are sent."""
JOBS_FOLDER = "_jobs/"
JOB_RECORD = "_job.json"
_T = TypeVar("_T")


def chunked(keys: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(keys)
    while chunk := list(islice(it, size)):
        yield chunk


def check_reachable(src: Storage, dst: Storage, job_id: str, listing: Iterator[_T],
                    meta: dict[str, Any]) -> Iterator[_T]:
    """Fail before anything is queued when INPUT cannot be listed or OUTPUT cannot be written.

    Why: a job queued towards a missing bucket ran every batch into the same error, and `status`
    said "running" meanwhile. The input check takes the listing's first page (the listing then
    continues from it); the output check writes ``_jobs/<job id>/_job.json`` (the job's input,
    output and settings: a record of who wrote into this output, and when).
    """
    first = next(listing, None)
    dst.write(f"{JOBS_FOLDER}{job_id}/{JOB_RECORD}",
              (json.dumps({"job_id": job_id, **meta}, indent=2) + "\n").encode(),
              "application/json")
    return listing if first is None else chain([first], listing)


def backpressure(broker: Any, high_water: int, poll: float = 1.0,
                 on_wait: Callable[[], None] | None = None) -> None:
    """Wait while the queue holds more than ``high_water`` batches: queued work costs Redis
    memory (~1.5 KB a batch of 32 plus its keys), and workers cannot use more than a few
    batches ahead anyway. The wait is logged once, so a long submit says why it is slow.
    ``on_wait`` runs at every poll: the control worker refreshes its listing lock there, which
    would otherwise lapse during a wait of hours and let the next scheduled run list too."""
    if not high_water:
        return
    said = False
    while (depth := _depth(broker)) > high_water:
        if not said:
            log.warning("queue holds %d batches (more than POSEBATCH_QUEUE_HIGH_WATER=%d): "
                        "waiting for workers to drain it", depth, high_water)
            said = True
        if on_wait is not None:
            on_wait()
        time.sleep(poll)


def _depth(broker: Any) -> int:
    with redis_errors():
        return int(broker.llen(QUEUE))


def task_id(job_id: str, batch_id: str) -> str:
    """Deterministic, so ``producer.reaper`` can tell which batches are queued or held."""
    return f"{job_id}.{batch_id}"


FORCED_BATCH = "c"
"""Batch ids starting with this hold images replaced since their result was written (a rerun's
``changed`` keys): queued with ``force`` whatever the job's own, also when requeued."""


def batch_forced(batch_id: str, meta: dict[str, Any]) -> bool:
    return bool(meta["force"]) or batch_id.startswith(FORCED_BATCH)


def send_batch(app: Any, producer: Any, job_id: str, batch_id: str,
               meta: dict[str, Any]) -> None:
    """Queue one batch. The message names the batch, not its keys (the worker reads them from
    the job state): ~0.6 KB whatever the batch size, instead of a base64 key list plus Celery's
    1 KB ``kwargsrepr`` copy of it."""
    app.send_task(
        PROCESS_BATCH, queue=QUEUE, producer=producer, task_id=task_id(job_id, batch_id),
        kwargs={"job_id": job_id, "batch_id": batch_id, "input_url": meta["input"],
                "output_url": meta["output"], "settings": meta["settings"],
                "force": batch_forced(batch_id, meta)},
        kwargsrepr=f"{{'job_id': {job_id!r}, 'batch_id': {batch_id!r}}}",
    )


def submit(input_url: str, output_url: str, *, job: JobSettings, broker_url: str,
           state_url: str | None = None, batch_images: int = DEFAULT_BATCH_IMAGES,
           force: bool = False, job_id: str | None = None, keys: Iterable[str] | None = None,
           summary_prefix: str = "", on_batch: Callable[[int], None] | None = None,
           selection: Selection | None = None, inventory: str | None = None) -> str:
    """Enqueue one job; return its id. ``keys`` (relative to INPUT) replaces the listing;
    ``selection`` (key list, include/exclude) picks from INPUT as ``posebatch run`` does;
    ``inventory`` (an S3 Inventory report, ``producer.inventory``) replaces the listing too,
    with every object's version.

    A submission that fails leaves no phantom job: before anything is queued the job is
    forgotten; after that it is marked ``abandoned`` (with the error), so `wait` ends.
    """
    if batch_images < 1:
        raise ConfigError(f"--batch-images: expected >= 1, got {batch_images}")
    store = JobStore.from_url(state_url or broker_url)
    store.ping()  # a wrong Redis URL or password is said first, before any storage check
    src, dst = open_storage(input_url), open_storage(output_url)
    if not force:  # refuse early, before anything is enqueued
        check_output(dst, manifest(job))
    job_id = job_id or new_job_id()
    meta = {"input": src.url, "output": dst.url, "settings": job.to_dict(), "force": force,
            "summary_prefix": summary_prefix}
    with contextlib.ExitStack() as stack:
        listed = keys is None and (selection is None or selection.keys is None)
        if inventory and not listed:
            raise ConfigError("--inventory replaces the listing: it cannot be combined with "
                              "a key list (--keys-from)")
        if not listed:
            todo: Iterator[tuple[str, str]] = ((k, NEW) for k in (
                keys if keys is not None else select_keys(src, selection)))
        else:
            inputs = stack.enter_context(tempfile.NamedTemporaryFile(
                "w", encoding="utf-8", newline="", prefix="posebatch-inputs-", suffix=".csv"))
            inputs.write("key,etag,bytes\n")
            objects = inventory_objects(inventory, src) if inventory else None
            if not force and has_tables(dst):  # a rerun: submit only what is new
                plan = stack.enter_context(rerun_plan(src, dst, selection, objects))
            else:
                plan = ((info, NEW) for info in listed_objects(src, selection,
                                                               objects=objects))
            todo = _noted(plan, inputs)
        listing = check_reachable(src, dst, job_id, todo, meta)
        store.create(job_id, meta)
        sent = {"images": 0, "batches": 0}
        try:
            _enqueue(store, job_id, meta, listing, broker_url, batch_images, on_batch, sent)
            if listed:
                inputs.flush()  # the versions the finalize puts into the count table
                dst.upload(f"{JOBS_FOLDER}{job_id}/{INPUTS_NAME}", inputs.name, "text/csv")
        except BaseException as err:
            _failed(store, job_id, err, sent)
            raise
    store.mark_submitted(job_id, sent["images"], sent["batches"])
    if sent["images"] == 0:
        write_aggregates(store, job_id)
    else:
        maybe_finalize(store, job_id)  # the workers may all have finished before we got here
    return job_id


def _noted(plan: Iterable[tuple[ObjectInfo, str]], inputs: Any) -> Iterator[tuple[str, str]]:
    """(key, why) of ``plan``, each object's version written to ``inputs`` on the way."""
    for info, why in plan:
        inputs.write(inputs_line(info))
        yield info.key, why


def _failed(store: JobStore, job_id: str, err: BaseException, sent: dict[str, int]) -> None:
    """Leave no phantom job: forgotten before anything is queued, else marked abandoned."""
    if sent["batches"] == 0:
        store.discard(job_id)
    else:
        store.abandon(job_id, f"submission stopped after {sent['batches']} batches "
                      f"({sent['images']} images): {err}; run the same submit again (images "
                      "with results are skipped)")


def _enqueue(store: JobStore, job_id: str, meta: dict[str, Any],
             listing: Iterable[tuple[str, str]], broker_url: str, batch_images: int,
             on_batch: Callable[[int], None] | None, sent: dict[str, int]) -> None:
    """Queue the keys of ``listing`` in batches; ``changed`` ones (replaced since their result
    was written) in forced batches after the others. ``sent`` counts images and batches."""
    app = make_app(broker_url)
    high_water = from_env(ClusterSettings).queue_high_water
    broker = connect(broker_url)
    replaced: list[str] = []

    def plain() -> Iterator[str]:
        for key, why in listing:
            if why == CHANGED:
                replaced.append(key)  # O(changed) in memory: queued once the listing ends
            else:
                yield key

    def send(producer: Any, keys: Iterable[str], prefix: str) -> None:
        for group in chunked(chunked(keys, batch_images), ENQUEUE_GROUP):
            backpressure(broker, high_water,
                         on_wait=None if on_batch is None else lambda: on_batch(0))
            ids = {f"{prefix}{sent['batches'] + i:08d}": batch
                   for i, batch in enumerate(group)}
            store.add_batches(job_id, ids)  # one round trip for the group's key lists
            for batch_id in ids:
                send_batch(app, producer, job_id, batch_id, meta)
            sent["batches"] += len(group)
            for batch in group:
                sent["images"] += len(batch)
                if on_batch:
                    on_batch(len(batch))

    with broker_errors(), app.producer_or_acquire() as producer:
        send(producer, plain(), "")
        send(producer, replaced, FORCED_BATCH)

