"""The end of a job: when it is done, who writes its tables, and what its state keeps then.

Why apart from the store: ``posebatch.jobstate`` only stores (records, batches, locks, the job
hash) and knows nothing of tables; this is the policy that reads the store and calls
``posebatch.finalize`` (the job's own tables, into the output's root through
``posebatch.roottables`` under the output's lock), as dramatiq's results middleware decides what
its Redis backend stores. Every process that may see a job complete calls ``maybe_finalize``:
the worker of its last batch, `wait`, the control worker's watchdog, `submit` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from posebatch.errors import StorageNotFound
from posebatch.jobstate import JobStore, now_iso, redis_errors
from posebatch.records import Record


def maybe_finalize(store: JobStore, job_id: str) -> bool:
    """Write the aggregates if every image of a fully submitted job has a record; True once the
    job is done.

    Safe to call from any process, any number of times: a lock makes one writer at a time,
    and the output is a pure function of the records, so writing it twice is harmless.
    The lock holds a token and is renewed while the finalizer streams (``FINALIZE_LOCK
    _SECONDS`` without a renewal frees it): a finalizer killed by the OOM killer is retried
    by the next caller (`wait`, the control worker's watchdog, a late batch) within that
    time, and a slow one never has its lock deleted by another (compare-and-delete).
    """
    with redis_errors():
        p = store.progress(job_id)
        if p is None or not p.submitted or p.total is None or p.done < p.total:
            return False
        if p.state == "done":
            return True
        lock = store.finalize_lock(job_id)
        if not lock.acquire():
            return False
        try:
            counted: dict[str, int] = {}
            try:
                write_aggregates(store, job_id, on_progress=lock.check, counted=counted)
            except StorageNotFound as err:  # the output bucket is gone: waiting will not help
                store.abandon(job_id, f"its tables cannot be written: {err}")
                raise
            lock.renew()  # still the owner: only then say done
            # A finalizer killed between the tables and this leaves the job "running" with all
            # its records: the next caller finalizes it again (the tables are a pure function
            # of them).
            store.mark_done(job_id, counted["images"], counted["failed"])
            return True
        finally:
            lock.release()


def write_aggregates(store: JobStore, job_id: str,
                     on_progress: Callable[[], None] = lambda: None,
                     counted: dict[str, int] | None = None) -> dict[str, Any]:
    """Write the job's tables from its records; return the summary. ``counted`` receives
    this job's own ``images`` and ``failed`` (the root summary may cover earlier jobs):
    what the job hash keeps once the records are dropped."""
    from posebatch.finalize import INPUTS_NAME, finalize
    from posebatch.storage import open_storage

    with redis_errors():
        meta = store.meta(job_id) or {}
        dst = open_storage(meta["output"])
        run = store.run_info(job_id)
        summary_meta = {"job_id": job_id, "input": meta.get("input"),
                        "output": meta.get("output"), "created": run.created,
                        "finished": now_iso(), "model": run.model, "runners": run.runners,
                        "settings": meta.get("settings")}
        prefix = meta.get("summary_prefix", "").replace("{job_id}", job_id)
        src = open_storage(meta["input"]) if meta.get("input") else None
        # Several jobs may write into one output (other input folders, reruns): each job's
        # own tables go to _jobs/<job id>/ and into the root's index, under the output's lock
        # (posebatch.roottables: the root's rows are the base and those tables, merged).
        batch_failed = False
        counted = {} if counted is None else counted
        counted.update(images=0, failed=0)

        def watched(records: Iterator[Record]) -> Iterator[Record]:
            nonlocal batch_failed
            for r in records:
                counted["images"] += 1
                if not r.ok:
                    counted["failed"] += 1
                batch_failed = batch_failed or r.batch_failure
                yield r

        summary = finalize(dst, watched(store.records(job_id)), summary_meta, prefix,
                           merge_root=not prefix, on_progress=on_progress, src=src,
                           inputs_key=f"_jobs/{job_id}/{INPUTS_NAME}",
                           tables_lock=lambda: store.output_lock(dst.url, on_progress))
        # A --force job that changed model or settings marked the output unfinished; clear the
        # mark only when no image may still hold an old result (a batch that failed for good
        # leaves its images' old results: then it stays marked).
        if meta.get("force") and run.model and not batch_failed:
            from posebatch.manifest import complete_output

            complete_output(dst, {"model_sha256": run.model.get("sha256"),
                                  "model_name": run.model.get("name"),
                                  "settings": meta.get("settings")})
        return summary
