"""A job's state in Redis: its parameters, one record per image, its batches and its locks.

A store that only stores: the Redis keys, their encodings and the atomic operations on them.
When a job is done, who writes its tables and what it then keeps is the end-of-job policy,
``posebatch.jobend`` (as dramatiq keeps its Redis result backend apart from the middleware that
decides what to store). (The output manifest, in the output storage, is
``posebatch.manifest``.) Redis errors are translated here, at the boundary, into the project's
errors (``StateUnavailable`` to retry, ``StateAuthError`` to fix the URL), so no caller imports
redis to catch them.


Why per-image records in a hash: a batch may run twice (redelivery, retry, re-submission). HSET of
the same field is idempotent, so ``HLEN`` is the exact number of images done and the aggregates,
recomputed from the hash when the job completes, count every image exactly once. No chord, no
counters that a redelivered batch would bump twice.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

import redis

from posebatch.errors import StateAuthError, StateFull, StateUnavailable
from posebatch.locks import RenewedLock
from posebatch.records import Record, legacy_batch_failure

PREFIX = "posebatch"
FINALIZE_LOCK_SECONDS = 120
"""The term of a job's finalize lock and of an output's tables lock: a holder killed (the OOM
killer) frees it within this time; a live one has it renewed by a timer (``posebatch.locks``)."""
JOB_PARTS = ("", "records", "failed", "deliveries", "finalizing", "batches")
"""Every Redis key of a job (``posebatch:job:<id>`` plus these suffixes): what expires and what
``jobs prune`` deletes. A new per-job key must be added here (tests/test_jobstate_ttl.py checks
that every key a finished job leaves behind has an expiry)."""
IN_FLIGHT_PARTS = ("records", "failed", "deliveries", "batches")
"""The keys a job needs only while it runs: deleted once its tables are written (the records are
in ``_counts.csv`` then), so Redis holds what is in flight plus one small hash per finished job,
not ~75 bytes per image for ``job_retention`` (0.75 GB a night at 10M images)."""
INDEX_SWEEP = 200
"""Index entries older than the retention checked per ``create``: expired ones are dropped, so
the jobs index stays the size of the live jobs whatever the number ever submitted."""


_P = ParamSpec("_P")
_T = TypeVar("_T")


def strip_urls(text: str) -> str:
    """Messages may quote the URL, and the URL may hold a password."""
    return re.sub(r"(rediss?|amqps?)://[^\s]*", r"\1://…", text)


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate redis-py errors into the project's (never with the URL: it may hold a password)."""
    try:
        yield
    except redis.exceptions.AuthenticationError as err:
        raise StateAuthError(
            "Redis refused the credentials; check the password in POSEBATCH_BROKER_URL / "
            "--broker (redis://:PASSWORD@host:port/db)") from err
    except (redis.exceptions.OutOfMemoryError, redis.exceptions.ExecAbortError) as err:
        raise StateFull(f"Redis is full: {REDIS_FULL_HINT}") from err
    except redis.exceptions.ResponseError as err:
        if "NOAUTH" in str(err) or "WRONGPASS" in str(err):
            raise StateAuthError(
                "Redis wants a password; put it in POSEBATCH_BROKER_URL / --broker "
                "(redis://:PASSWORD@host:port/db)") from err
        raise
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
        raise StateUnavailable(f"cannot reach the broker/Redis ({type(err).__name__}: "
                               f"{strip_urls(str(err))}); is it running?") from err


REDIS_FULL_HINT = ("it reached maxmemory and refuses writes (policy noeviction). Workers wait "
                   "and go on by themselves once it takes writes again; nothing is lost. Free "
                   "memory (`redis-cli --bigkeys`; finished jobs' state expires with "
                   "POSEBATCH_JOB_RETENTION) or raise maxmemory")


def translated(method: Callable[_P, _T]) -> Callable[_P, _T]:
    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        with redis_errors():
            return method(*args, **kwargs)

    return wrapper


_COUNT_DELIVERY = redis.Redis().register_script(
    # A late duplicate of a batch of a finished job must not create a deliveries hash anew
    # (it would have no expiry): 0 then, and nothing written.
    "if redis.call('hget', KEYS[1], 'state') == 'done' then return 0 end "
    "return redis.call('hincrby', KEYS[2], ARGV[1], 1)")


def pack(record: Record) -> str:
    """A record as its hash value, without the key (the field name is the key): ``"2,1"``
    (persons, valid persons), ``"E216201,<message>"`` (a failed image) or ``"B282000,<message>"``
    (an image of a batch that failed as a whole: ``Record.batch_failure``). 3-60 bytes instead
    of ~100 of JSON with the key repeated: at 10M images that is ~1 GB of Redis less per job."""
    if record.ok:
        size = "" if record.width is None else f",{record.width},{record.height}"
        return f"{record.person_num},{record.valid_persons}{size}"
    scope = "B" if record.batch_failure else "E"
    return f"{scope}{record.error_code},{record.error_msg}"


def unpack(key: str, value: str) -> Record:
    if value.startswith("{"):  # written by an older version: JSON with the key inside
        return Record.from_json(value)
    if value[:1] in ("E", "B"):
        code, msg = value[1:].split(",", 1)
        error_code = int(code) if code else None
        # "E" from a worker older than the flag may still be a batch's failure (rolling upgrade)
        batch = value[0] == "B" or legacy_batch_failure(error_code, msg)
        return Record(key, False, error_code, 0, 0, msg, batch_failure=batch)
    fields = [int(v) for v in value.split(",")]
    width, height = (fields[2], fields[3]) if len(fields) == 4 else (None, None)
    return Record(key, True, None, fields[0], fields[1], width=width, height=height)


def new_job_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def connect(url: str) -> redis.Redis:
    """A client for ``redis://`` or ``rediss://`` URLs (password in the URL or REDIS_PASSWORD)."""
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10,
                                health_check_interval=30, retry_on_timeout=True)


@dataclass(frozen=True)
class RunInfo:
    """How a job ran, as its hash records it: for its summary."""

    created: str
    model: dict[str, str] | None
    """The model of the first worker that ran a batch (``note_model``); None: none ran."""
    runners: list[str]
    """Backend/precision/device labels of the workers that ran its batches (``note_runner``)."""


@dataclass(frozen=True)
class JobProgress:
    job_id: str
    state: str
    total: int | None
    done: int
    failed: int
    submitted: bool
    created: str
    started_at: float | None
    updated_at: float | None
    """When the last image was recorded: a running job with no progress for long has stalled."""
    finished: str | None
    output: str
    error: str | None = None
    """Why a job was abandoned (its submission failed part way)."""
    waiting: str | None = None
    """Why a running job is not moving (a storage outage its batches are waiting out)."""

    @property
    def rate(self) -> float:
        if not self.started_at or not self.done:
            return 0.0
        # A finished job's rate is frozen at its last record, not diluted by the time since.
        end = self.updated_at if self.state == "done" and self.updated_at else time.time()
        return self.done / max(end - self.started_at, 1e-3)


class JobStore:
    """Reads and writes the Redis keys of jobs; one instance per process is enough. It decides
    nothing about a job's end: ``posebatch.jobend`` reads it, writes the tables and calls
    ``mark_done``."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self.last_lock: RenewedLock | None = None
        """The last finalize lock handed out, and the last output lock held (for tests and
        benches: how often they were renewed)."""
        self.last_output_lock: RenewedLock | None = None

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(connect(url))

    def _k(self, job_id: str, *parts: str) -> str:
        return ":".join((PREFIX, "job", job_id, *parts))

    def _job_keys(self, job_id: str) -> list[str]:
        return [self._k(job_id, *([part] if part else [])) for part in JOB_PARTS]

    def _retention(self) -> int:
        from posebatch.settings import ClusterSettings, from_env

        return from_env(ClusterSettings).job_retention

    def _expire(self, job_id: str, seconds: int | None = None) -> None:
        """Give every key of a finished job an expiry: Redis holds what running jobs need plus
        ``job_retention`` of history, never an ever-growing archive (results are in storage)."""
        ttl = self._retention() if seconds is None else seconds
        pipe = self.r.pipeline(transaction=False)
        for key in self._job_keys(job_id):
            pipe.expire(key, ttl)
        pipe.execute()

    # -- producer side -------------------------------------------------------------------
    @translated
    def create(self, job_id: str, meta: dict[str, Any]) -> None:
        fields = {"meta": json.dumps(meta), "created": now_iso(), "submitted": 0,
                  "state": "submitting"}
        pipe = self.r.pipeline()
        pipe.hset(self._k(job_id), mapping=fields)
        pipe.zadd(f"{PREFIX}:jobs", {job_id: time.time()})
        pipe.execute()
        self.sweep_index()

    @translated
    def sweep_index(self, limit: int = INDEX_SWEEP) -> int:
        """Drop from the jobs index up to ``limit`` ids older than the retention whose state has
        expired; return how many. Why at each ``create``: the index has no expiry of its own
        (a sorted set cannot expire members), and a service submitting every few minutes for
        months would otherwise grow it without end; a bounded sweep per new job keeps it the
        size of the jobs still in Redis."""
        old = self.r.zrangebyscore(f"{PREFIX}:jobs", "-inf", time.time() - self._retention(),
                                   start=0, num=limit)
        if not old:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for raw in old:
            pipe.exists(self._k(raw.decode()))
        gone = [raw for raw, alive in zip(old, pipe.execute(), strict=True) if not alive]
        if gone:
            self.r.zrem(f"{PREFIX}:jobs", *gone)
        return len(gone)

    @translated
    def mark_submitted(self, job_id: str, total: int, batches: int) -> None:
        self.r.hset(self._k(job_id), mapping={"submitted": 1, "total": total, "batches": batches,
                                              "state": "running" if total else "done"})
        if not total:
            self.r.hset(self._k(job_id), "finished", now_iso())
            self._expire(job_id)

    @translated
    def add_batches(self, job_id: str, batches: dict[str, list[str]]) -> None:
        """Keep the keys of queued batches until each is recorded (``batches`` hash, batch id ->
        JSON list of keys). Why here and not only in the message: the message then carries no
        key list (a few hundred bytes whatever the batch size), and a batch whose message was
        lost (kombu's gap: popped in the last instant before a machine died) can be queued again
        from here (``producer.reaper``). The hash holds only what is still outstanding."""
        if batches:
            self.r.hset(self._k(job_id, "batches"),
                        mapping={b: json.dumps(keys, ensure_ascii=False)
                                 for b, keys in batches.items()})

    @translated
    def batch_keys(self, job_id: str, batch_id: str) -> list[str] | None:
        """The keys of a batch not recorded yet; None once it is (or the job is gone)."""
        raw = self.r.hget(self._k(job_id, "batches"), batch_id)
        return None if raw is None else json.loads(raw)

    @translated
    def pending_batches(self, job_id: str) -> set[str]:
        return {b.decode() for b in self.r.hkeys(self._k(job_id, "batches"))}

    @translated
    def discard(self, job_id: str) -> None:
        """Forget a job that never got to the queue (its submit failed): no phantom job that
        `status` would show as submitting forever."""
        pipe = self.r.pipeline()
        pipe.delete(*self._job_keys(job_id))
        pipe.zrem(f"{PREFIX}:jobs", job_id)
        pipe.execute()

    @translated
    def abandon(self, job_id: str, reason: str) -> None:
        """A submission that failed after queuing some batches, or a job whose output is gone:
        `wait` and `status` say so and why (exit 3), instead of "submitting" or "running"
        forever; the state expires like a finished job's."""
        self.r.hset(self._k(job_id), mapping={"state": "abandoned", "error": reason,
                                              "finished": now_iso()})
        self._expire(job_id)

    @translated
    def prune(self, older_than: float = 0.0,
              stale_submitting: float | None = None) -> list[str]:
        """Delete the state of jobs finished more than ``older_than`` seconds ago, and drop ids
        whose state has expired from the job index; return the ids removed. Running jobs are
        never touched; with ``stale_submitting``, jobs still "submitting" that many seconds
        after their creation are (their producer died: such a job never finalizes, so its keys
        would never expire)."""
        removed = []
        cutoff = time.time() - older_than
        for raw, score in self.r.zrange(f"{PREFIX}:jobs", 0, -1, withscores=True):
            job_id = raw.decode()
            state, finished = self.r.hmget(self._k(job_id), "state", "finished")
            if state is None:
                gone = True  # expired (or lost): only the index entry is left
            elif state in (b"done", b"abandoned") and finished is not None:
                ended = datetime.fromisoformat(finished.decode()).timestamp()
                gone = ended <= cutoff
            elif state == b"submitting" and stale_submitting is not None:
                gone = score <= time.time() - stale_submitting
            else:
                gone = False
            if gone:
                self.discard(job_id)
                removed.append(job_id)
        return removed

    @translated
    def exists(self, job_id: str) -> bool:
        return bool(self.r.exists(self._k(job_id)))

    @translated
    def has_job(self, job_id: str) -> bool:
        """Whether the job was created here (its parameters are on record). False after a Redis
        restart without persistence: workers must then not recreate a headless job."""
        return bool(self.r.hexists(self._k(job_id), "meta"))

    @translated
    def meta(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.hget(self._k(job_id), "meta")
        return json.loads(raw) if raw else None

    @translated
    def recent(self, limit: int = 20) -> list[str]:
        """The newest jobs whose state is still here; ids whose state expired are dropped from
        the index on the way (the index itself has no expiry)."""
        ids = [j.decode() for j in self.r.zrevrange(f"{PREFIX}:jobs", 0, limit - 1)]
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.exists(self._k(job_id))
        alive = pipe.execute() if ids else []
        gone = [j for j, a in zip(ids, alive, strict=True) if not a]
        if gone:
            self.r.zrem(f"{PREFIX}:jobs", *gone)
        return [j for j, a in zip(ids, alive, strict=True) if a]

    @translated
    def ping(self) -> None:
        self.r.ping()

    @translated
    def server_started(self) -> float | None:
        """When this Redis server started (``INFO server``), to tell a lost state from a
        mistyped id; None if the server does not say."""
        uptime = self.r.info("server").get("uptime_in_seconds")
        return None if uptime is None else time.time() - float(uptime)

    # -- worker side ---------------------------------------------------------------------
    @translated
    def add_records(self, job_id: str, records: Iterable[Record],
                    batch_id: str | None = None) -> bool:
        """Record images; False (nothing written) when the job itself is gone from Redis.

        Why the check: after a restart without persistence, a batch that was running would
        otherwise recreate a job hash with records but no parameters or total, which `status`
        shows as forever "submitting" instead of saying the state was lost.
        """
        records = list(records)
        has_meta, state = self.r.hmget(self._k(job_id), "meta", "state")
        if has_meta is None:
            return False
        if state == b"done":
            # A late duplicate of a batch (redelivered after the job was finalized) would only
            # rewrite the same records, and a set it created anew would have no expiry.
            return True
        if not records:
            if batch_id is not None:
                self.r.hdel(self._k(job_id, "batches"), batch_id)
            return True
        pipe = self.r.pipeline()
        pipe.hsetnx(self._k(job_id), "started_at", time.time())
        pipe.hset(self._k(job_id), "updated_at", time.time())
        pipe.hdel(self._k(job_id), "waiting", "waiting_since")
        if batch_id is not None:
            pipe.hdel(self._k(job_id, "batches"), batch_id)  # recorded: no longer outstanding
        pipe.hset(self._k(job_id, "records"), mapping={r.key: pack(r) for r in records})
        failed = [r.key for r in records if not r.ok]
        ok = [r.key for r in records if r.ok]
        if failed:
            pipe.sadd(self._k(job_id, "failed"), *failed)
        if ok:
            pipe.srem(self._k(job_id, "failed"), *ok)
        pipe.execute()
        return True

    @translated
    def note_waiting(self, job_id: str, why: str) -> None:
        """Say in the job's status why it is not moving (a storage outage being waited out);
        cleared by the next recorded batch."""
        self.r.hset(self._k(job_id), mapping={"waiting": why, "waiting_since": time.time()})

    @translated
    def has_record(self, job_id: str, keys: list[str]) -> list[bool]:
        vals = self.r.hmget(self._k(job_id, "records"), keys)
        return [v is not None for v in vals]

    @translated
    def count_delivery(self, job_id: str, batch_id: str) -> int:
        """How many times a batch has been started, across workers: bounds poison batches
        (0 for a batch of a finished job: nothing is written then)."""
        return int(_COUNT_DELIVERY(keys=[self._k(job_id), self._k(job_id, "deliveries")],
                                   args=[batch_id], client=self.r))

    @translated
    def note_model(self, job_id: str, model: dict[str, str]) -> dict[str, str]:
        """Remember the first worker's model for the summary; return the one on record, so a
        worker running another model can refuse instead of mixing results."""
        self.r.hsetnx(self._k(job_id), "model", json.dumps(model))
        return json.loads(self.r.hget(self._k(job_id), "model"))

    @translated
    def full(self) -> str | None:
        """Why Redis refuses writes now (maxmemory reached under noeviction), or None."""
        info = self.r.info("memory")
        limit, used = int(info.get("maxmemory", 0)), int(info.get("used_memory", 0))
        if limit and used >= limit and info.get("maxmemory_policy") == "noeviction":
            return f"Redis is full ({used} of maxmemory {limit} bytes): {REDIS_FULL_HINT}"
        return None

    @translated
    def note_runner(self, job_id: str, label: str) -> None:
        """Which backend/precision/device ran some of the job's batches (``runners`` in its
        summary): a job left at precision ``auto`` may be computed differently per host."""
        self.r.hset(self._k(job_id), f"runner:{label}", 1)

    def records(self, job_id: str) -> Iterator[Record]:
        with redis_errors():  # a generator: translate while iterating, not only at the call
            for key, raw in self.r.hscan_iter(self._k(job_id, "records"), count=1000):
                yield unpack(key.decode("utf-8", "surrogateescape"),
                             raw.decode("utf-8", "surrogateescape"))

    # -- both ------------------------------------------------------------------------------
    @translated
    def progress(self, job_id: str) -> JobProgress | None:
        # No MULTI: a full Redis refuses a transaction even of reads, and `status` must still
        # answer then (the three reads need no atomicity: counts only grow).
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self._k(job_id))
        pipe.hlen(self._k(job_id, "records"))
        pipe.scard(self._k(job_id, "failed"))
        h, done, failed = pipe.execute()
        if not h:
            return None
        h = {k.decode(): v.decode() for k, v in h.items()}
        if "done_count" in h:  # finished: its records are gone, their counts are kept here
            done, failed = int(h["done_count"]), int(h.get("failed_count", 0))
        meta = json.loads(h.get("meta", "{}"))
        return JobProgress(
            job_id=job_id, state=h.get("state", "?"),
            total=int(h["total"]) if "total" in h else None, done=int(done), failed=int(failed),
            submitted=h.get("submitted") == "1", created=h.get("created", ""),
            started_at=float(h["started_at"]) if "started_at" in h else None,
            updated_at=float(h["updated_at"]) if "updated_at" in h else None,
            finished=h.get("finished"), output=meta.get("output", ""), error=h.get("error"),
            waiting=h.get("waiting"),
        )

    def finalize_lock(self, job_id: str) -> RenewedLock:
        """The job's finalize lock (not acquired yet): one writer of its tables at a time."""
        lock = RenewedLock(self.r, self._k(job_id, "finalizing"), FINALIZE_LOCK_SECONDS)
        self.last_lock = lock
        return lock

    @translated
    def run_info(self, job_id: str) -> RunInfo:
        """What the job's summary says about how it ran (from its hash, not its records)."""
        h = self.r.hgetall(self._k(job_id))
        return RunInfo(
            created=(h.get(b"created") or b"").decode(),
            model=json.loads(h[b"model"]) if h.get(b"model") else None,
            runners=sorted(k.decode()[len("runner:"):] for k in h if k.startswith(b"runner:")))

    @translated
    def mark_done(self, job_id: str, done: int, failed: int) -> None:
        """Say done and drop what only a running job needs, in one transaction: the hash keeps
        the counts ``status`` shows and expires after ``job_retention``; the records (by then in
        ``_counts.csv``), the failed set, delivery counts and outstanding batches go at once."""
        # How often batches ran (1: once; more: redelivered or retried), kept as a histogram of
        # a few bytes instead of one field per batch: what fault analyses and `status` need.
        starts = json.dumps(self._histogram(self.r.hvals(self._k(job_id, "deliveries"))))
        pipe = self.r.pipeline()  # MULTI: never "done" with the records half deleted
        pipe.hset(self._k(job_id), mapping={"state": "done", "finished": now_iso(),
                                            "done_count": done, "failed_count": failed,
                                            "batch_starts": starts})
        pipe.delete(*(self._k(job_id, part) for part in IN_FLIGHT_PARTS))
        pipe.expire(self._k(job_id), self._retention())
        pipe.execute()

    @staticmethod
    def _histogram(values: Iterable[bytes]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for v in values:
            counts[v.decode()] = counts.get(v.decode(), 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))

    @translated
    def batch_starts(self, job_id: str) -> dict[int, int]:
        """How many batches of the job were started how many times ({1: 3120, 2: 4}): from
        the live delivery counts while it runs, from the histogram kept in its hash once done."""
        kept = self.r.hget(self._k(job_id), "batch_starts")
        if kept is not None:
            return {int(k): v for k, v in json.loads(kept).items()}
        return {int(k): v for k, v in self._histogram(
            self.r.hvals(self._k(job_id, "deliveries"))).items()}

    @contextlib.contextmanager
    def output_lock(self, output_url: str, on_wait: Callable[[], None] = lambda: None
                    ) -> Iterator[Callable[[], None]]:
        """Hold the lock of an output's root tables (``roottables``: the index, the base) for
        as long as the block runs, renewed by a timer like the finalize lock, so a compaction of
        any size keeps it; yields its ``check``. Waits while another holds it (a job end into
        the same output, a compaction), calling ``on_wait`` (the caller's own lock check)."""
        digest = hashlib.sha256(output_url.rstrip("/").encode()).hexdigest()[:32]
        lock = RenewedLock(self.r, f"{PREFIX}:output:{digest}:tables", FINALIZE_LOCK_SECONDS)
        with redis_errors():
            while not lock.acquire():
                on_wait()
                time.sleep(0.1)
        self.last_output_lock = lock  # for tests and benches: how often it was renewed
        try:
            yield lock.check
        finally:
            with redis_errors():
                lock.release()
