"""The streamed finalize equals the in-memory aggregates byte for byte, uploads big tables in
parts, and its lock survives a dead or slow finalizer. Real redis-server and SeaweedFS."""

from __future__ import annotations

import random
import time

import pytest

from posebatch import jobend
from posebatch.aggregate import counts_csv, summarize, summary_json
from posebatch.finalize import external_sort, finalize
from posebatch.jobend import maybe_finalize
from posebatch.jobstate import PREFIX, JobStore
from posebatch.records import Record
from posebatch.storage import open_storage


def some_records(n: int) -> list[Record]:
    rng = random.Random(5)
    recs = [Record(f"d{rng.randrange(9)}/img {i:05d}, ü.jpg", True, None, i % 5, i % 3)
            if i % 7 else Record(f"bad/{i}.png", False, 216201, 0, 0, "not JPEG, PNG or BMP")
            for i in range(n)]
    rng.shuffle(recs)
    return recs


def test_external_sort_spills_runs_and_merges_them_in_key_order(tmp_path):
    recs = some_records(1000)
    out = list(external_sort(recs, tmp_path, chunk=64))
    assert out == sorted(recs, key=lambda r: r.key)
    assert len(list(tmp_path.glob("run-*.jsonl"))) == 16


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_streamed_tables_equal_the_in_memory_ones(where, tmp_path, bucket, monkeypatch):
    monkeypatch.setattr("posebatch.finalize.CHUNK", 100)
    url = f"s3://{bucket}/out/" if where == "s3" else str(tmp_path / "out")
    dst = open_storage(url)
    recs = some_records(1000)
    meta = {"job_id": "j1"}
    summary = finalize(dst, iter(recs), meta, "", merge_root=False)
    assert dst.read("_counts.csv") == counts_csv(recs)
    assert dst.read("_summary.json") == summary_json(summarize(recs, meta)) == \
        summary_json(summary)


def test_a_big_table_is_uploaded_in_parts(bucket, tmp_path, s3_server):
    path = tmp_path / "big.csv"
    path.write_bytes(random.Random(1).randbytes(20 * 2**20))
    dst = open_storage(f"s3://{bucket}/out/")
    dst.upload("_counts.csv", str(path), "text/csv")
    head = s3_server.client().head_object(Bucket=bucket, Key="out/_counts.csv")
    assert head["ETag"].strip('"').endswith("-2")  # a multipart upload of two parts
    dst.download("_counts.csv", str(tmp_path / "back"))
    assert (tmp_path / "back").read_bytes() == path.read_bytes()


@pytest.fixture
def store(redis_server, tmp_path) -> JobStore:
    redis_server.start()
    s = JobStore(redis_server.client())
    s.r.flushall()
    s.create("j", {"input": "in/", "output": str(tmp_path / "out"), "settings": {}})
    s.mark_submitted("j", 2, 1)
    s.add_records("j", [Record("a.jpg", True, None, 1, 1), Record("b.jpg", True, None, 0, 0)])
    return s


def test_a_finalizer_that_died_holding_the_lock_is_retried_once_the_lock_expires(store):
    lock = f"{PREFIX}:job:j:finalizing"
    store.r.set(lock, "token-of-a-finalizer-killed-by-the-oom-killer", ex=1)
    assert maybe_finalize(store, "j") is False  # held: someone may be writing
    deadline = time.monotonic() + 10
    while store.r.exists(lock) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert maybe_finalize(store, "j") is True
    assert store.progress("j").state == "done"


def test_a_slow_finalizer_never_deletes_the_lock_of_the_one_that_took_over(store,
                                                                           monkeypatch):
    lock = f"{PREFIX}:job:j:finalizing"
    real = jobend.write_aggregates

    def slow(s, job_id, on_progress, **kwargs):
        store.r.set(lock, "the-next-finalizer")  # ours expired meanwhile; another took it
        return real(s, job_id, on_progress, **kwargs)

    monkeypatch.setattr(jobend, "write_aggregates", slow)
    from posebatch.errors import StateUnavailable

    with pytest.raises(StateUnavailable, match="lock was lost"):
        maybe_finalize(store, "j")
    assert store.r.get(lock) == b"the-next-finalizer"  # not deleted by the slow one
    assert store.progress("j").state == "running"  # and it did not claim "done"
