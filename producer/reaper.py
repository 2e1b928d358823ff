"""Requeue batches that vanished: kombu's gap, closed from the job state.

A Redis transport worker takes a message off the queue (BRPOP) and only then copies it into the
``unacked`` hash; a machine that dies between the two loses the message for good, and the job
would stop short of its total forever. The job state keeps each outstanding batch's keys
(``JobStore.add_batches``) until the batch is recorded, and task ids are ``<job>.<batch>``, so a
batch that is outstanding but neither queued nor held by any worker is lost. It is queued again
once it has been missing on two looks some seconds apart (a message moving between the queue
and ``unacked`` is briefly in neither). Running a batch twice is harmless: records are
idempotent and done images are skipped.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from posebatch.jobstate import JobStore, connect, redis_errors
from posebatch.queue import QUEUE, broker_errors, make_app
from producer.submit import send_batch

log = logging.getLogger(__name__)

SCAN_LIMIT = 20_000
"""Queue length beyond which a look is skipped: a deep queue means the job is waiting its turn,
and its lost batches will be found once the queue is shorter."""
PAGE = 1000


def _task_id(raw: bytes, unacked: bool = False) -> str | None:
    """The Celery task id of a raw queue entry (or ``unacked`` entry); None for anything that
    is not a Celery message of protocol 2."""
    try:
        payload = json.loads(raw)
        if unacked:
            payload = payload[0]
        tid = (payload.get("headers") or {}).get("id")
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        return None
    return tid if isinstance(tid, str) else None


def visible_task_ids(r: Any, prefix: str, queue: str = QUEUE,
                     unacked: str = "unacked") -> set[str] | None:
    """Task ids starting with ``prefix`` that are queued or held by a worker; None when the
    queue is too long to look through."""
    length = r.llen(queue)
    if length > SCAN_LIMIT:
        return None
    seen: set[str] = set()
    for start in range(0, length, PAGE):
        for raw in r.lrange(queue, start, start + PAGE - 1):
            tid = _task_id(raw)
            if tid and tid.startswith(prefix):
                seen.add(tid)
    for raw in r.hvals(unacked):
        tid = _task_id(raw, unacked=True)
        if tid and tid.startswith(prefix):
            seen.add(tid)
    return seen


class Reaper:
    """Remembers which batches were missing at the last look; requeues those still missing
    ``grace`` seconds later. One instance per watching process (``wait``, the control worker)."""

    def __init__(self, store: JobStore, broker_url: str, grace: float = 5.0) -> None:
        self.store = store
        self.broker_url = broker_url
        self.broker = connect(broker_url)
        self.grace = grace
        self.missing: dict[tuple[str, str], float] = {}

    def look(self, job_id: str, now: float | None = None) -> list[str]:
        """One look at a submitted, running job; returns the batch ids queued again."""
        now = time.monotonic() if now is None else now
        pending = self.store.pending_batches(job_id)
        if not pending:
            return []
        with redis_errors():
            visible = visible_task_ids(self.broker, f"{job_id}.")
        if visible is None:
            return []
        missing = {b for b in pending if f"{job_id}.{b}" not in visible}
        for key in [k for k in self.missing if k[0] == job_id and k[1] not in missing]:
            del self.missing[key]  # it came back (or was recorded)
        due = []
        for batch_id in sorted(missing):
            first = self.missing.setdefault((job_id, batch_id), now)
            if now - first >= self.grace:
                due.append(batch_id)
        if due:
            self._requeue(job_id, due)
        return due

    def _requeue(self, job_id: str, batch_ids: list[str]) -> None:
        meta = self.store.meta(job_id)
        if meta is None:
            return
        app = make_app(self.broker_url)
        with broker_errors(), app.producer_or_acquire() as producer:
            for batch_id in batch_ids:
                send_batch(app, producer, job_id, batch_id, meta)
                self.missing.pop((job_id, batch_id), None)
        log.warning("job %s: %d batches were neither queued nor held by a worker (lost with "
                    "a machine); queued them again: %s", job_id, len(batch_ids),
                    ", ".join(batch_ids[:10]))
