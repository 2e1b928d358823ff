"""The reaper requeues a batch only when it is outstanding, not queued, not held by a worker, and
stays so for the grace period (real redis-server, real kombu messages)."""

from __future__ import annotations

import json

import pytest
from kombu import Connection

from posebatch.jobstate import JobStore
from posebatch.queue import QUEUE, make_app
from producer.reaper import Reaper
from producer.submit import send_batch

META = {"input": "in/", "output": "out/", "settings": {}, "force": False}


@pytest.fixture
def setup(redis_server):
    redis_server.start()
    r = redis_server.client()
    r.flushall()
    store = JobStore(r)
    store.create("j", META)
    store.add_batches("j", {f"{i:08d}": [f"{i}.jpg"] for i in range(3)})
    store.mark_submitted("j", 3, 3)
    app = make_app(redis_server.url)
    with app.producer_or_acquire() as producer:
        for i in range(3):
            send_batch(app, producer, "j", f"{i:08d}", META)
    return redis_server.url, r, store


def queued_ids(r) -> list[str]:
    return sorted(json.loads(m)["headers"]["id"] for m in r.lrange(QUEUE, 0, -1))


def test_queued_held_and_recorded_batches_are_left_alone_a_vanished_one_comes_back(setup):
    url, r, store = setup
    assert json.loads(r.lrange(QUEUE, 0, 0)[0])["headers"]["id"].startswith("j.")
    assert len(r.lindex(QUEUE, 0)) < 1500  # the message carries no key list
    # A worker holds one (taken without acknowledgement: in kombu's `unacked`).
    conn = Connection(url)
    held = conn.SimpleQueue(QUEUE).get(timeout=5)
    held_id = held.headers["id"]
    # One is recorded, one vanishes (popped by a machine that died before kombu noted it).
    recorded = "00000001" if held_id != "j.00000001" else "00000002"
    store.add_records("j", [], recorded)
    for m in r.lrange(QUEUE, 0, -1):
        r.lrem(QUEUE, 1, m)
    lost = ({"j.00000000", "j.00000001", "j.00000002"} - {held_id, f"j.{recorded}"}).pop()
    reaper = Reaper(store, url, grace=5)
    assert reaper.look("j", now=100.0) == []  # missing once: maybe in transit
    assert reaper.look("j", now=104.0) == []  # not yet past the grace
    assert reaper.look("j", now=105.0) == [lost.split(".")[1]]
    assert queued_ids(r) == [lost]
    assert reaper.look("j", now=200.0) == []  # queued now: left alone
    assert store.batch_keys("j", lost.split(".")[1]) is not None
    conn.release()


def test_a_queue_too_long_to_look_through_is_not_looked_through(setup, monkeypatch):
    url, r, store = setup
    monkeypatch.setattr("producer.reaper.SCAN_LIMIT", 2)
    r.delete(QUEUE)
    r.rpush(QUEUE, *[b"{}"] * 3)
    reaper = Reaper(store, url, grace=0)
    assert reaper.look("j", now=1.0) == []


def test_foreign_messages_in_the_queue_are_ignored(setup):
    url, r, store = setup
    r.lpush(QUEUE, b"not json", b"[1, 2]", b'{"headers": null}')
    reaper = Reaper(store, url, grace=0)
    assert reaper.look("j", now=1.0) == []  # ours are all still queued
