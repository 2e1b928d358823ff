"""``posebatch watch --events QUEUE``: a drop folder fed by S3 event notifications, in O(new).

Why events: a polling watcher lists the whole folder each round; with 10M old objects that is
10,000 LISTs (25-29 min) before one new image is seen. The AWS way is for the bucket to send an
``s3:ObjectCreated:*`` notification per upload into an SQS queue; this module long-polls that
queue, so each new image costs one message and no LIST.

What it guarantees:

- **Nothing lost to a crash.** Messages are deleted only after the job holding their images is
  enqueued (and the versions recorded); a crash in between re-delivers them after the
  visibility timeout (``VISIBILITY_SECONDS``).
- **One burst, one job.** Images whose events arrive within ``window`` seconds of the first one
  go into one job (up to ``max_job_images``), not one job per image.
- **At-least-once delivery deduplicated.** SQS delivers at least once and S3 may send an event
  twice: each submitted (key, ETag) is kept in Redis for ``dedup_ttl`` seconds; an event for a
  version already submitted is dropped. A re-upload (new ETag) is submitted again with
  ``force`` (its old result replaced), as the polling watcher does.
- **Lost events caught.** Notifications can be off for a while, a message can expire or be
  deleted by hand: every ``reconcile_every`` seconds :func:`producer.watch.poll_once` runs (the
  polling watcher's listing and cursor). Events write the versions they submit into the same
  versions hash the poll reads, so it resubmits nothing the events already did.

Redis state (all named after INPUT and OUTPUT, like the polling watcher's): ``...:events``
(key -> version of each image submitted from an event) and ``...:evtimes`` (key -> when),
trimmed to the last ``dedup_ttl`` seconds at every flush: ~370 B per image of that window with
30-byte keys, the poll's versions entry included (measured, 100k records). The trim also
drops the version from the poll's hash when it is still the one the event wrote; so
``dedup_ttl`` must outlast the poll's own look-back (``settle`` plus twice the reconciliation
period), or a reconciliation would take the image for a re-upload.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from posebatch.errors import ConfigError, RetryableError
from posebatch.jobstate import connect, redis_errors
from posebatch.keys import is_image_key, result_key
from posebatch.s3storage import S3Storage
from posebatch.settings import DEFAULT_BATCH_IMAGES, JobSettings
from posebatch.storage import ObjectInfo, open_storage
from producer.submit import chunked, submit
from producer.watch import SETTLE_SECONDS, STATE_TTL, cursor_key, poll_once, versions_key

log = logging.getLogger(__name__)

WINDOW_SECONDS = 2.0
"""Events arriving within this long of the first one of a burst become one job."""
RECONCILE_SECONDS = 3600.0
"""How often the full listing runs to catch events that never came (0: never)."""
DEDUP_TTL = 6 * 3600
"""How long a submitted (key, ETag) is remembered: a re-delivery within it is dropped."""
VISIBILITY_SECONDS = 300
"""A received message is hidden this long; deleted once its job is queued, else re-delivered."""
MAX_WAIT = 20
"""SQS's longest long poll (seconds)."""
HEAD_THREADS = 8
"""Concurrent HEADs for keys not remembered (within botocore's pool of 10)."""
_TRIM = """
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, k in ipairs(old) do
  local v = redis.call('HGET', KEYS[2], k)
  if v and redis.call('HGET', KEYS[3], k) == v then redis.call('HDEL', KEYS[3], k) end
  redis.call('HDEL', KEYS[2], k)
  redis.call('ZREM', KEYS[1], k)
end
return #old
"""


@dataclass(frozen=True)
class Created:
    """One ObjectCreated record: ``key`` relative to INPUT."""

    key: str
    etag: str
    size: int
    sequencer: str = ""

    @property
    def version(self) -> str:
        """The same string a listing gives (``ObjectInfo.version``): events and polls agree."""
        return ObjectInfo(self.key, self.etag, self.size, 0.0).version

    def later_than(self, other: Created) -> bool:
        """S3's ``sequencer`` orders events of one key (hex, compared at equal length)."""
        width = max(len(self.sequencer), len(other.sequencer))
        return self.sequencer.rjust(width, "0") >= other.sequencer.rjust(width, "0")


def parse_message(body: str, bucket: str, prefix: str) -> list[Created] | None:
    """The images a message announces below ``s3://bucket/prefix``; [] for a test event, a
    removal or keys elsewhere; None when the body is no S3 event at all (logged by the caller).

    Accepts the S3 event JSON as the bucket sends it, also wrapped in an SNS notification
    (bucket -> SNS topic -> SQS queue). Keys arrive URL-encoded (a space as ``+``)."""
    try:
        doc = json.loads(body)
        if isinstance(doc, dict) and doc.get("Type") == "Notification" and "Message" in doc:
            doc = json.loads(doc["Message"])  # via SNS
    except (TypeError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    if doc.get("Event") == "s3:TestEvent":  # sent once when the notification is configured
        return []
    records = doc.get("Records")
    if not isinstance(records, list):
        return None
    out = []
    for rec in records:
        try:
            if not str(rec.get("eventName", "")).startswith("ObjectCreated:"):
                continue  # ObjectRemoved and the rest: nothing to process
            s3 = rec["s3"]
            if s3["bucket"]["name"] != bucket:
                continue
            obj = s3["object"]
            full = unquote_plus(obj["key"])
            etag = str(obj.get("eTag") or obj.get("etag") or "").strip('"')
            size = int(obj.get("size", 0))
            sequencer = str(obj.get("sequencer", ""))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if not full.startswith(prefix):
            continue
        key = full[len(prefix):]
        if key and is_image_key(key):
            out.append(Created(key, etag, size, sequencer))
    return out


@contextlib.contextmanager
def sqs_errors(queue_url: str) -> Iterator[None]:
    """botocore's errors as the project's: a queue that is gone or refused is the user's to fix
    (exit 3); anything else (network, throttling past the retries) is transient."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        if "NonExistentQueue" in code or code in ("AccessDenied", "AccessDeniedException",
                                                  "InvalidClientTokenId"):
            raise ConfigError(f"SQS queue {queue_url}: {err}; check the queue and that these "
                              "credentials may receive and delete its messages") from err
        raise RetryableError(f"SQS queue {queue_url}: {err}") from err
    except BotoCoreError as err:
        raise RetryableError(f"SQS queue {queue_url}: {err}") from err


def open_queue(spec: str, client: Any = None) -> tuple[Any, str]:
    """(SQS client, queue URL) for ``spec``: a queue URL (``https://sqs...``), ``sqs://NAME``
    or a plain name. The client is configured the standard way (AWS_* variables, including
    AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_SQS)."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    if client is None:
        client = boto3.session.Session().client("sqs", config=Config(
            retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5,
            read_timeout=MAX_WAIT + 10))
    if spec.startswith(("https://", "http://")):
        return client, spec
    name = spec[len("sqs://"):] if spec.startswith("sqs://") else spec
    if not name or "/" in name:
        raise ConfigError(f"--events {spec!r}: expected a queue URL (https://sqs.REGION."
                          "amazonaws.com/ACCOUNT/NAME), sqs://NAME or NAME")
    try:
        return client, client.get_queue_url(QueueName=name)["QueueUrl"]
    except (ClientError, BotoCoreError) as err:
        raise ConfigError(f"--events {spec!r}: cannot find SQS queue {name!r} ({err}); create "
                          "it and point the bucket's ObjectCreated notifications at it "
                          "(README: watch)") from err


class EventIntake:
    """Receives S3 events from one queue and submits their images for one INPUT/OUTPUT pair."""

    def __init__(self, input_url: str, output_url: str, queue: str, *, job: JobSettings,
                 broker_url: str, state_url: str | None = None,
                 batch_images: int = DEFAULT_BATCH_IMAGES, window: float = WINDOW_SECONDS,
                 dedup_ttl: float = DEDUP_TTL, max_job_images: int = 10_000,
                 visibility: int = VISIBILITY_SECONDS, sqs: Any = None) -> None:
        src = open_storage(input_url)
        if not isinstance(src, S3Storage):
            raise ConfigError(f"--events needs an s3:// INPUT (its bucket sends the "
                              f"notifications); got {input_url!r}")
        self.src, self.dst = src, open_storage(output_url)
        self.sqs, self.queue_url = open_queue(queue, sqs)
        self.job, self.broker_url, self.state_url = job, broker_url, state_url
        self.batch_images, self.window, self.dedup_ttl = batch_images, window, dedup_ttl
        self.max_job_images, self.visibility = max_job_images, visibility
        self.r = connect(state_url or broker_url)
        self.versions = versions_key(self.src.url, self.dst.url)
        base = self.versions[: -len(":versions")]
        self.events, self.times = base + ":events", base + ":evtimes"
        self.trim = self.r.register_script(_TRIM)
        self.pending: dict[str, Created] = {}
        self.handles: list[str] = []
        self.opened: float | None = None

    # -- receiving ---------------------------------------------------------------------------

    def receive(self, wait: int) -> int:
        """One ReceiveMessage (long poll of ``wait`` s); returns how many messages came."""
        with sqs_errors(self.queue_url):
            reply = self.sqs.receive_message(
                QueueUrl=self.queue_url, MaxNumberOfMessages=10,
                WaitTimeSeconds=max(0, min(MAX_WAIT, wait)), VisibilityTimeout=self.visibility)
        messages = reply.get("Messages", [])
        self.delete([m["ReceiptHandle"] for m in messages if not self.take(m)])
        return len(messages)

    def take(self, message: dict[str, Any]) -> bool:
        """Hold a message that announces images (the window opens at the first one); False
        for one with nothing to submit (a test event, a removal, OUTPUT's own writes in the
        same bucket): deleted at once, so it neither waits nor opens a window."""
        created = parse_message(message.get("Body", ""), self.src.bucket, self.src.prefix)
        if created is None:
            log.warning("ignoring a message that is no S3 event notification: %.200s",
                        message.get("Body", ""))
        if not created:
            return False
        for c in created:
            old = self.pending.get(c.key)
            if old is None or c.later_than(old):
                self.pending[c.key] = c
        self.handles.append(message["ReceiptHandle"])
        if self.opened is None:
            self.opened = time.monotonic()
        return True

    def due(self) -> bool:
        return self.opened is not None and (
            time.monotonic() >= self.opened + self.window
            or len(self.pending) >= self.max_job_images)

    def wait_seconds(self) -> float:
        """How long the next receive may wait: a long poll while no window is open, else
        what is left of the window."""
        if self.opened is None:
            return float(MAX_WAIT)
        return max(0.0, self.opened + self.window - time.monotonic())

    # -- submitting --------------------------------------------------------------------------

    def classify(self, items: list[Created]) -> dict[str, list[Created]]:
        """``new`` / ``changed`` (a re-upload: forced); duplicates left out."""
        keys = [c.key for c in items]
        with redis_errors():
            by_event = self.r.hmget(self.events, keys)
            by_poll = self.r.hmget(self.versions, keys)
        out: dict[str, list[Created]] = {"new": [], "changed": []}
        unknown = []
        for c, ev, poll in zip(items, by_event, by_poll, strict=True):
            known = {v.decode() for v in (ev, poll) if v is not None}
            if c.version in known:
                continue  # this very version was submitted already
            if known:
                out["changed"].append(c)  # replaced since it was submitted: force
            else:
                unknown.append(c)
        # A key not remembered with a result: replaced after its version expired (force).
        # One HEAD per new image, HEAD_THREADS at a time (a burst of 10k: ~4 s, not 30 s).
        with ThreadPoolExecutor(HEAD_THREADS) as pool:
            had = list(pool.map(lambda c: self.dst.exists(
                result_key(c.key, self.job.result_layout)), unknown))
        for c, exists in zip(unknown, had, strict=True):
            out["changed" if exists else "new"].append(c)
        return out

    def flush(self) -> list[str]:
        """Submit what the window gathered, record it, then delete its messages."""
        items = list(self.pending.values())
        self.pending, self.opened = {}, None
        jobs = []
        try:  # self.handles stays set until the end: SIGTERM meanwhile waits for this flush
            self.expire()  # what has outlived dedup_ttl counts as unknown below
            for what, group in self.classify(items).items() if items else ():
                if not group:
                    continue
                job_id = submit(self.src.url, self.dst.url, job=self.job,
                                broker_url=self.broker_url, state_url=self.state_url,
                                batch_images=self.batch_images, keys=[c.key for c in group],
                                force=what == "changed", summary_prefix="_jobs/{job_id}/")
                self.record(group)  # only after the job is queued: a crash re-delivers
                log.warning("job %s: %d %s images from events", job_id, len(group), what)
                jobs.append(job_id)
            self.delete(self.handles)
        finally:  # on an error the messages come back after the visibility timeout
            self.handles = []
        return jobs

    def record(self, group: list[Created]) -> None:
        now = time.time()
        with redis_errors():
            pipe = self.r.pipeline()
            for chunk in chunked(group, 500):
                mapping = {c.key: c.version for c in chunk}
                pipe.hset(self.events, mapping=mapping)
                pipe.hset(self.versions, mapping=mapping)  # the reconciliation's view too
                pipe.zadd(self.times, {c.key: now for c in chunk})
            for name in (self.events, self.times, self.versions):
                pipe.expire(name, STATE_TTL)
            pipe.execute()

    def expire(self) -> int:
        """Forget (key, version) pairs submitted more than ``dedup_ttl`` seconds ago."""
        dropped = 0
        with redis_errors():
            while n := int(self.trim(keys=[self.times, self.events, self.versions],
                                     args=[time.time() - self.dedup_ttl, 1000])):
                dropped += n
                if n < 1000:
                    break
        return dropped

    def delete(self, handles: list[str]) -> None:
        for chunk in chunked(handles, 10):
            with sqs_errors(self.queue_url):
                reply = self.sqs.delete_message_batch(QueueUrl=self.queue_url, Entries=[
                    {"Id": str(i), "ReceiptHandle": h} for i, h in enumerate(chunk)])
            for failed in reply.get("Failed", ()):  # re-delivered later: dedup drops it then
                log.warning("SQS kept message %s: %s", failed.get("Id"), failed.get("Message"))

    # -- loops -------------------------------------------------------------------------------

    def drain(self) -> list[str]:
        """Everything in the queue now (until a receive comes back empty), then flushed."""
        jobs = []
        while self.receive(1):
            if self.due():
                jobs += self.flush()
        if self.handles:
            jobs += self.flush()
        return jobs

    def run(self, stop: threading.Event) -> Iterator[str]:
        """Job ids as they are created, until ``stop`` is set."""
        while not stop.is_set():
            wait = self.wait_seconds()
            if wait >= 1:  # WaitTimeSeconds is whole seconds: the rest of a window is slept
                self.receive(int(wait))
            else:
                stop.wait(wait)
            if self.due():
                yield from self.flush()
        if self.handles:
            yield from self.flush()


def reconcile_due(r: Any, input_url: str, output_url: str, every: float) -> float:
    """Seconds until the next reconciliation (<= 0: now); the poll's cursor says when the last
    one started, so a restarted watcher does not relist at once."""
    src, dst = open_storage(input_url), open_storage(output_url)
    with redis_errors():
        raw = r.get(cursor_key(src.url, dst.url))
    return 0.0 if raw is None else float(raw) + every - time.time()


def watch_events(input_url: str, output_url: str, queue: str, *, job: JobSettings,
                 broker_url: str, state_url: str | None = None,
                 batch_images: int = DEFAULT_BATCH_IMAGES, window: float = WINDOW_SECONDS,
                 reconcile_every: float = RECONCILE_SECONDS, dedup_ttl: float = DEDUP_TTL,
                 settle: float = SETTLE_SECONDS, once: bool = False,
                 emit: Callable[[str], None] = print,
                 stop: threading.Event | None = None, on_sigterm: bool = False) -> None:
    """Submit images as their events arrive; reconcile by listing every ``reconcile_every``
    seconds (in a thread, so a long listing never holds up events). ``once``: drain the queue,
    reconcile if due, return. Each job id goes to ``emit``. ``on_sigterm`` (the CLI): SIGTERM
    submits an open window first (its receives are short: at most the window), or exits at
    once when nothing is held (not waiting out a 20 s long poll: ``docker stop`` gives 10 s)."""
    if reconcile_every and dedup_ttl < settle + 2 * reconcile_every:
        raise ConfigError(f"--dedup-ttl {dedup_ttl:g} is shorter than the reconciliation's "
                          f"look-back (settle {settle:g} s + 2 x --reconcile-every "
                          f"{reconcile_every:g} s = {settle + 2 * reconcile_every:g} s): a "
                          "reconciliation would resubmit images; raise it")
    intake = EventIntake(input_url, output_url, queue, job=job, broker_url=broker_url,
                         state_url=state_url, batch_images=batch_images, window=window,
                         dedup_ttl=dedup_ttl)
    poll_args = {"job": job, "broker_url": broker_url, "state_url": state_url,
                 "batch_images": batch_images, "settle": settle}

    def reconcile() -> None:
        log.warning("reconciliation: listing %s for images no event announced", input_url)
        for job_id in poll_once(input_url, output_url, **poll_args):
            log.warning("reconciliation: job %s", job_id)
            emit(job_id)

    if once:
        for job_id in intake.drain():
            emit(job_id)
        if reconcile_every and reconcile_due(intake.r, input_url, output_url,
                                             reconcile_every) <= 0:
            reconcile()
        return
    if stop is None:
        stop = threading.Event()
    if on_sigterm:
        def terminate(_signum: int, _frame: Any) -> None:
            stop.set()
            if not intake.handles:  # nothing held; a message in flight comes back later
                raise SystemExit(0)

        signal.signal(signal.SIGTERM, terminate)

    def reconciler() -> None:
        while True:
            try:
                delay = reconcile_due(intake.r, input_url, output_url, reconcile_every)
                if delay <= 0:
                    reconcile()
                    continue
            except Exception:  # noqa: BLE001 - logged; events go on, a later round retries
                delay = min(reconcile_every, 60.0)
                log.exception("reconciliation failed; retrying in %g s", delay)
            if stop.wait(delay):
                return

    thread = None
    if reconcile_every:
        thread = threading.Thread(target=reconciler, name="reconcile", daemon=True)
        thread.start()
    try:
        for job_id in intake.run(stop):
            emit(job_id)
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=5)
