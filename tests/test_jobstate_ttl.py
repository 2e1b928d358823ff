"""Redis stays bounded: a finished job's keys expire, `jobs prune` removes them now, and a failed
submission leaves no phantom job. Real redis-server, real local output."""

from __future__ import annotations

import uuid

import pytest

from posebatch.jobend import maybe_finalize
from posebatch.jobstate import PREFIX, JobStore
from posebatch.records import Record
from posebatch.testing.cluster import run_cli


@pytest.fixture
def store(redis_server, monkeypatch) -> JobStore:
    redis_server.start()
    client = redis_server.client()
    client.flushall()
    monkeypatch.setenv("POSEBATCH_JOB_RETENTION", "3600")
    return JobStore(client)


def job_keys(store: JobStore, job_id: str) -> list[bytes]:
    return sorted(store.r.scan_iter(f"{PREFIX}:job:{job_id}*"))


def finished_job(store: JobStore, out, job_id: str | None = None) -> str:
    job_id = job_id or f"j-{uuid.uuid4().hex[:8]}"
    store.create(job_id, {"input": "in/", "output": str(out), "settings": {}})
    store.count_delivery(job_id, "00000000")
    store.note_model(job_id, {"name": "m", "sha256": "0" * 64})
    store.mark_submitted(job_id, 2, 1)
    store.add_records(job_id, [Record("a.jpg", True, None, 1, 1),
                               Record("b.jpg", False, 216201, 0, 0, "not an image")])
    assert maybe_finalize(store, job_id)
    return job_id


def test_every_key_of_a_finished_job_expires_after_the_retention(store, tmp_path):
    job_id = finished_job(store, tmp_path)
    keys = job_keys(store, job_id)
    # Only the job hash (its counts for `status`): the records are in _counts.csv now.
    assert {k.decode().rsplit(job_id, 1)[1] for k in keys} == {""}
    assert store.progress(job_id).done == 2 and store.progress(job_id).failed == 1
    ttls = {k: store.r.ttl(k) for k in keys}
    assert all(0 < t <= 3600 for t in ttls.values()), ttls
    # A late duplicate of a batch after the end writes nothing (no new key without expiry).
    assert store.add_records(job_id, [Record("a.jpg", True, None, 1, 1)])
    assert job_keys(store, job_id) == keys
    assert all(store.r.ttl(k) > 0 for k in job_keys(store, job_id))
    assert (tmp_path / "_summary.json").exists()


def test_an_empty_job_expires_too(store, tmp_path):
    store.create("empty", {"input": "in/", "output": str(tmp_path), "settings": {}})
    store.mark_submitted("empty", 0, 0)
    assert all(store.r.ttl(k) > 0 for k in job_keys(store, "empty"))


def test_prune_removes_finished_jobs_and_expired_index_entries_and_keeps_running_ones(
        store, tmp_path, redis_server):
    done = finished_job(store, tmp_path)
    store.create("running", {"input": "in/", "output": str(tmp_path), "settings": {}})
    store.mark_submitted("running", 5, 2)
    store.r.zadd(f"{PREFIX}:jobs", {"expired-long-ago": 1})  # its keys are gone already
    proc = run_cli("jobs", "prune", "--broker", redis_server.url, env={})
    assert sorted(proc.stdout.split()[:2]) == sorted([done, "expired-long-ago"])
    assert job_keys(store, done) == []
    assert store.recent() == ["running"] and store.progress("running") is not None


def test_prune_stale_submitting_removes_jobs_whose_producer_died(store):
    store.create("dead-producer", {"input": "in/", "output": "out/", "settings": {}})
    store.add_batches("dead-producer", {"00000000": ["a.jpg"]})
    store.r.zadd(f"{PREFIX}:jobs", {"dead-producer": 1000.0})  # created long ago
    store.create("listing-now", {"input": "in/", "output": "out/", "settings": {}})
    assert store.prune() == []  # not without the flag: "submitting" may be a live producer
    assert store.prune(stale_submitting=3600) == ["dead-producer"]
    assert job_keys(store, "dead-producer") == [] and store.recent() == ["listing-now"]


def test_prune_older_than_keeps_recent_finished_jobs(store, tmp_path):
    done = finished_job(store, tmp_path)
    assert store.prune(older_than=3600) == []
    assert store.recent() == [done]


def test_recent_drops_ids_whose_state_expired(store):
    store.r.zadd(f"{PREFIX}:jobs", {"gone": 1})
    assert store.recent() == []
    assert store.r.zcard(f"{PREFIX}:jobs") == 0


@pytest.mark.parametrize("record", [
    Record("a/b.jpg", True, None, 3, 2),
    Record("sized.jpg", True, None, 1, 1, width=640, height=480),
    Record("x, y.jpg", False, 216201, 0, 0, "not JPEG, PNG or BMP: 'x, y'"),
    Record("straße café.jpg", False, 282000, 0, 0, ""),
])
def test_records_are_stored_compactly_and_read_back_exactly(store, record):
    store.create("c", {"input": "in/", "output": "out/", "settings": {}})
    store.add_records("c", [record])
    raw = store.r.hget(f"{PREFIX}:job:c:records", record.key)
    assert record.key.encode() not in raw and len(raw) <= 12 + len(record.error_msg.encode())
    assert list(store.records("c")) == [record]
