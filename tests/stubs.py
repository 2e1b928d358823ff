"""In-memory stand-ins for unit tests of one policy (as dramatiq's StubBroker is for brokers).

Only for tests of ``workers.policy``; every test that says the cluster works uses real Redis.
"""

from __future__ import annotations

from collections import Counter

from posebatch.errors import StateUnavailable
from posebatch.records import Record


class MemoryJobState:
    """The ``workers.policy.JobState`` protocol over dicts; ``down`` makes every call fail."""

    def __init__(self, jobs: set[str] = frozenset({"job"}), total: int | None = None) -> None:
        self.jobs = set(jobs)
        self.records: dict[str, dict[str, Record]] = {j: {} for j in self.jobs}
        self.deliveries: Counter[tuple[str, str]] = Counter()
        self.total = total
        self.finalized = 0
        self.waiting = ""
        self.down = 0
        """How many calls still fail with StateUnavailable (an outage), -1 for forever."""

    def _call(self) -> None:
        if self.down:
            self.down -= 1 if self.down > 0 else 0
            raise StateUnavailable("stub Redis is down")

    def has_job(self, job_id: str) -> bool:
        self._call()
        return job_id in self.jobs

    def count_delivery(self, job_id: str, batch_id: str) -> int:
        self._call()
        self.deliveries[job_id, batch_id] += 1
        return self.deliveries[job_id, batch_id]

    def has_record(self, job_id: str, keys: list[str]) -> list[bool]:
        self._call()
        return [k in self.records[job_id] for k in keys]

    def add_records(self, job_id: str, records: list[Record],
                    batch_id: str | None = None) -> bool:
        self._call()
        if job_id not in self.jobs:
            return False
        self.records[job_id].update((r.key, r) for r in records)
        return True

    def note_waiting(self, job_id: str, why: str) -> None:
        self._call()
        self.waiting = why

    def maybe_finalize(self, job_id: str) -> bool:
        self._call()
        if self.total is not None and len(self.records[job_id]) >= self.total:
            self.finalized += 1
            return True
        return False
