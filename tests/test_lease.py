"""The lease's assumptions about kombu's Redis transport, checked against a real redis-server.

workers/lease.py re-scores deliveries in kombu's ``unacked_index`` sorted set. If a kombu
upgrade renamed the key, changed the members or the score, or stopped restoring by score, the
lease would silently stop working (batches of a live worker run twice after 60 s): these tests
fail first.
"""

from __future__ import annotations

import time
import uuid

import pytest
from kombu import Connection

from posebatch.lease import index_key, renew


@pytest.fixture
def broker(redis_server):
    redis_server.start()
    client = redis_server.client()
    client.flushall()
    return redis_server.url, client


def deliver(url: str, queue: str, visibility_timeout: int = 60, options: dict | None = None):
    """Publish one message and take it without acknowledging it, as a worker does."""
    conn = Connection(url, transport_options=options or {"visibility_timeout": visibility_timeout})
    q = conn.SimpleQueue(queue)
    q.put({"x": 1})
    message = q.get(timeout=5)
    return conn, q, message


def test_a_delivery_is_scored_by_time_under_its_tag_in_unacked_index(broker):
    url, r = broker
    conn, q, message = deliver(url, f"q-{uuid.uuid4().hex[:6]}")
    try:
        key = index_key({})
        assert key == "unacked_index"
        score = r.zscore(key, message.delivery_tag)
        assert score is not None and abs(score - time.time()) < 5
        assert r.hexists("unacked", message.delivery_tag)
    finally:
        q.close()
        conn.release()


def test_renew_moves_the_score_and_never_re_adds_an_acknowledged_delivery(broker):
    url, r = broker
    conn, q, message = deliver(url, f"q-{uuid.uuid4().hex[:6]}")
    try:
        later = time.time() + 1000
        assert renew(r, "unacked_index", [message.delivery_tag], now=later) == 1
        assert r.zscore("unacked_index", message.delivery_tag) == pytest.approx(later)
        message.ack()
        assert r.zscore("unacked_index", message.delivery_tag) is None
        assert renew(r, "unacked_index", [message.delivery_tag]) == 0
        assert r.zscore("unacked_index", message.delivery_tag) is None
    finally:
        q.close()
        conn.release()


def test_kombu_restores_by_score_so_a_renewed_delivery_stays_and_a_stale_one_returns(broker):
    url, r = broker
    queue = f"q-{uuid.uuid4().hex[:6]}"
    conn, q, message = deliver(url, queue, visibility_timeout=10)
    try:
        qos = q.consumer.channel.qos
        renew(r, "unacked_index", [message.delivery_tag], now=time.time() + 5)
        qos.restore_visible(num=10, interval=1)
        assert r.llen(queue) == 0  # renewed: still held
        renew(r, "unacked_index", [message.delivery_tag], now=time.time() - 11)
        qos.restore_visible(num=10, interval=1)
        assert r.llen(queue) == 1  # lease expired: back in the queue for another worker
        assert r.zscore("unacked_index", message.delivery_tag) is None
    finally:
        q.close()
        conn.release()


def test_global_keyprefix_is_applied_like_kombu_does():
    assert index_key({"global_keyprefix": "pb:"}) == "pb:unacked_index"
    assert index_key({"unacked_index_key": "ui"}) == "ui"


def test_the_worker_app_registers_the_lease_with_the_configured_timing(monkeypatch):
    from posebatch.lease import LEASE_RENEW_CONF, LeaseRenewal
    from posebatch.queue import make_app

    monkeypatch.setenv("POSEBATCH_VISIBILITY_TIMEOUT", "40")
    app = make_app("redis://127.0.0.1:1/0")
    assert app.conf.broker_transport_options["visibility_timeout"] == 40
    assert app.conf[LEASE_RENEW_CONF] == 10
    assert LeaseRenewal in app.steps["consumer"]
    monkeypatch.setenv("POSEBATCH_VISIBILITY_TIMEOUT", "")
    assert make_app("redis://127.0.0.1:1/0").conf.broker_transport_options[
        "visibility_timeout"] == 60


@pytest.mark.parametrize(("env", "message"), [
    ({"POSEBATCH_VISIBILITY_TIMEOUT": "1"}, "visibility_timeout"),
    ({"POSEBATCH_VISIBILITY_TIMEOUT": "10", "POSEBATCH_LEASE_RENEW": "6"}, "lease_renew"),
    ({"POSEBATCH_JOB_RETENTION": "5"}, "job_retention"),
])
def test_cluster_settings_out_of_bounds_are_refused(env, message):
    from posebatch.errors import ConfigError
    from posebatch.settings import ClusterSettings, from_env

    with pytest.raises(ConfigError, match=message):
        from_env(ClusterSettings, env=env)


def test_a_delivery_on_a_full_redis_waits_to_be_recorded_instead_of_being_lost(broker):
    """A consumer took the message off the queue when Redis was full: recording it as
    unacknowledged was refused and the message was gone. Now the record waits for memory."""
    import threading

    from posebatch.lease import hold_deliveries_while_full

    hold_deliveries_while_full()
    url, r = broker
    queue = f"q-{uuid.uuid4().hex[:6]}"
    conn = Connection(url)
    q = conn.SimpleQueue(queue)
    q.put({"x": 1})
    got: list = []
    r.config_set("maxmemory", "1")  # every write refused; BRPOP still pops
    try:
        taker = threading.Thread(target=lambda: got.append(q.get(timeout=10)), daemon=True)
        taker.start()
        time.sleep(2.5)
        assert not got and r.llen(queue) == 0  # popped, and held while Redis is full
    finally:
        r.config_set("maxmemory", "0")
    taker.join(10)
    try:
        assert got and got[0].payload == {"x": 1}
        assert r.hexists("unacked", got[0].delivery_tag)  # recorded: a lost worker returns it
    finally:
        q.close()
        conn.release()


def test_a_sweep_lock_left_by_a_killed_worker_delays_recovery_seconds_not_minutes(
        broker, monkeypatch):
    """A worker SIGKILLed inside a sweep leaves kombu's ``unacked_mutex`` behind; no worker can
    restore anything until it expires (kombu's default: 300 s). The app sets it to two sweep
    intervals; here, with the fault tests' 6 s timeout, 2 s."""
    from posebatch.queue import make_app

    url, r = broker
    monkeypatch.setenv("POSEBATCH_VISIBILITY_TIMEOUT", "6")
    options = make_app(url).conf.broker_transport_options
    assert options["unacked_mutex_expire"] == 2
    queue = f"q-{uuid.uuid4().hex[:6]}"
    conn, q, message = deliver(url, queue, options=dict(options))
    try:
        qos = q.consumer.channel.qos
        assert qos.unacked_mutex_expire == 2  # kombu read the option (its default: 300)
        renew(r, "unacked_index", [message.delivery_tag], now=time.time() - 7)  # timed out
        dead = r.lock(qos.unacked_mutex_key, timeout=qos.unacked_mutex_expire)
        assert dead.acquire(blocking=False)  # the killed worker's sweep, never released
        qos.restore_visible(num=10, interval=1)
        assert r.llen(queue) == 0  # held: this sweep had to skip
        deadline = time.monotonic() + 10
        while r.llen(queue) == 0 and time.monotonic() < deadline:
            time.sleep(0.25)
            qos.restore_visible(num=10, interval=1)
        assert r.llen(queue) == 1  # restored once the dead worker's lock ran out
    finally:
        q.close()
        conn.release()
