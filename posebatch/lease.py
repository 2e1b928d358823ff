"""Leases on the batches a worker holds: a live worker keeps them, a dead machine loses them.

Why: kombu's Redis transport emulates acknowledgements. A delivered message is copied into the
``unacked`` hash and scored by delivery time in the ``unacked_index`` sorted set; every worker
periodically puts entries older than the visibility timeout back in the queue. With a plain
timeout one must choose between a slow recovery (a timeout above the longest batch: hours) and
batches run twice (a short one). Here the worker's main process re-scores the deliveries it
still holds every ``lease_renew_seconds`` (``ZADD XX``: an entry acknowledged meanwhile is not
re-added), so a short visibility timeout only expires for a worker that stopped renewing: a
machine that vanished, or a main process frozen for longer than the timeout (its batch then runs
again elsewhere, which idempotent records make harmless).

What this relies on in kombu (pinned in pyproject.toml, checked by tests/test_lease.py against a
real Redis): the key names ``unacked_index`` (plus ``global_keyprefix``), members = delivery
tags = ``Message.delivery_tag``, scores = ``time.time()`` at delivery, and ``restore_visible``
comparing those scores with ``time() - visibility_timeout``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import redis
from celery import bootsteps

log = logging.getLogger(__name__)

UNACKED_INDEX = "unacked_index"  # kombu.transport.redis.Channel.unacked_index_key
LEASE_RENEW_CONF = "posebatch_lease_renew"  # app.conf key: seconds between renewals, 0 = off


def index_key(transport_options: dict[str, Any]) -> str:
    """The sorted set kombu scores deliveries in, with the same options kombu reads."""
    return (transport_options.get("global_keyprefix", "")
            + transport_options.get("unacked_index_key", UNACKED_INDEX))


def renew(client: redis.Redis, key: str, tags: Iterable[str], now: float | None = None) -> int:
    """Re-score the deliveries ``tags`` that are still unacknowledged; return how many."""
    tags = list(tags)
    if not tags:
        return 0
    stamp = time.time() if now is None else now
    # XX: never re-add a delivery acknowledged (removed) since we listed it; CH: count updates.
    return int(client.zadd(key, dict.fromkeys(tags, stamp), xx=True, ch=True))


def held_delivery_tags() -> list[str]:
    """Delivery tags of every message this worker holds: running, waiting for a pool process,
    or waiting for a retry countdown (``celery.worker.state.requests`` holds all three)."""
    from celery.worker import state

    tags = []
    for request in list(state.requests.values()):
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag is not None:
            tags.append(tag)
    return tags


FULL_POLL_S = 1.0
FULL_LOG_S = 30.0


def hold_deliveries_while_full() -> None:
    """Make kombu's Redis ``QoS.append`` wait out a full Redis instead of losing the message.

    Why: the consumer takes a message off the queue (BRPOP, allowed on a full Redis: it frees
    memory) and then records it as unacknowledged (ZADD ``unacked_index`` + HSET ``unacked``).
    At ``maxmemory`` with ``noeviction`` that write is refused with OutOfMemoryError: the
    consumer stopped, the worker exited, and the message, off the queue and in no unacked hash,
    was gone (seen in tests/test_faults.py's full-Redis test). Here the write is retried every
    second until Redis takes writes again, the message held in memory meanwhile; the timers
    (lease renewals) wait too, which at worst lets a lease lapse and the batch run twice.
    Relies on ``kombu.transport.redis.QoS.append(message, delivery_tag)`` (kombu pinned).
    """
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.QoS.append
    if getattr(original, "_posebatch_patient", False):
        return

    def append(self: Any, message: Any, delivery_tag: Any) -> Any:
        told = 0.0
        while True:
            try:
                return original(self, message, delivery_tag)
            except (redis.exceptions.OutOfMemoryError, redis.exceptions.ExecAbortError) as err:
                if time.monotonic() - told >= FULL_LOG_S:
                    log.error("Redis is full (%s): a delivered batch waits to be recorded "
                              "(checking every %.0f s); free memory or raise maxmemory", err,
                              FULL_POLL_S)
                    told = time.monotonic()
                time.sleep(FULL_POLL_S)

    append._posebatch_patient = True  # type: ignore[attr-defined]
    kombu_redis.QoS.append = append


class LeaseRenewal(bootsteps.StartStopStep):
    """Consumer bootstep: a timer in the worker's main process renewing its held deliveries.

    In the main process (never a pool child): it owns the broker connection and the request
    registry, and it is what dies with the machine. A Redis error is logged and retried at the
    next tick; missing a renewal or two only shortens the lease.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        self.tref = None
        self.client: redis.Redis | None = None
        self.key = UNACKED_INDEX
        self.renewed = 0

    def start(self, c: Any) -> None:
        from posebatch.jobstate import connect

        if c.app.conf.broker_url.startswith(("redis://", "rediss://")):
            hold_deliveries_while_full()
        opts = c.app.conf.broker_transport_options or {}
        interval = float(c.app.conf.get(LEASE_RENEW_CONF) or 0)
        if interval <= 0 or not c.app.conf.broker_url.startswith(("redis://", "rediss://")):
            return
        self.key = index_key(opts)
        self.client = connect(c.app.conf.broker_url)
        self.tref = c.timer.call_repeatedly(interval, self.tick, priority=10)
        log.info("lease: renewing held batches every %g s (visibility timeout %s s)",
                 interval, opts.get("visibility_timeout"))

    def tick(self) -> int:
        try:
            n = renew(self.client, self.key, held_delivery_tags())
        except redis.RedisError as err:
            log.warning("lease: could not renew held batches (%s); next try in one interval",
                        err)
            return 0
        self.renewed += n
        log.debug("lease: renewed %d held batches", n)
        return n

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
