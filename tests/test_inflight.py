"""Redis holds only what is in flight (issue 22, item 3): once a job's tables are written its
records, failed set, delivery counts and batches are gone; the job hash keeps the counts
`status` and `wait` show, with the retention as its expiry. Real redis-server, SeaweedFS and a
real worker process; the watcher's versions kept for recent uploads only (real redis-server,
a real folder)."""

from __future__ import annotations

import time

import pytest

from posebatch.jobstate import PREFIX, JobStore
from posebatch.settings import JobSettings
from posebatch.testing.cluster import WorkerProcess, run_cli
from producer.watch import poll_once, versions_key
from tests.images import jpeg


def job_keys(r, job_id: str) -> list[str]:
    return sorted(k.decode() for k in r.scan_iter(f"{PREFIX}:job:{job_id}*"))


@pytest.mark.cluster
def test_a_finished_job_leaves_only_its_summary_hash_and_status_wait_report_work(
        redis_server, s3_server, bucket, tmp_path):
    redis_server.start()
    r = redis_server.client()
    r.flushall()
    client = s3_server.client()
    for i in range(5):
        client.put_object(Bucket=bucket, Key=f"in/{i}.jpg", Body=jpeg(64, 48))
    client.put_object(Bucket=bucket, Key="in/bad.jpg", Body=b"not an image at all")
    env = {**s3_server.env(), "POSEBATCH_BROKER_URL": redis_server.url,
           "POSEBATCH_JOB_RETENTION": "3600"}
    worker = WorkerProcess(tmp_path, env)
    worker.start()
    try:
        out = f"s3://{bucket}/out/"
        job = run_cli("submit", f"s3://{bucket}/in/", "--out", out, "--batch-images", "2",
                      env=env).stdout.split()[-1]
        waited = run_cli("wait", job, "--timeout", "180", "--no-progress", env=env, check=False)
        assert waited.returncode == 1, waited.stderr  # the bad file failed: wait says so
        assert "6/6 images done, 1 failed" in waited.stdout
    finally:
        worker.stop()
    assert job_keys(r, job) == [f"{PREFIX}:job:{job}"]
    assert 0 < r.ttl(f"{PREFIX}:job:{job}") <= 3600
    assert JobStore(r).batch_starts(job) == {1: 3}  # what the deliveries hash said, kept small
    status = run_cli("status", job, env=env).stdout
    assert f"job {job}: done; 6/6 images done, 1 failed" in status
    again = run_cli("wait", job, "--timeout", "10", "--no-progress", env=env, check=False)
    assert again.returncode == 1 and "6/6 images done, 1 failed" in again.stdout
    report = run_cli("report", out, "--to", str(tmp_path / "report"), env=env)
    assert report.returncode == 0 and (tmp_path / "report" / "index.html").exists()
    # A late duplicate of one of its batches creates nothing (no key without an expiry).
    store = JobStore(r)
    assert store.count_delivery(job, "00000000") == 0
    assert store.batch_keys(job, "00000000") is None
    assert job_keys(r, job) == [f"{PREFIX}:job:{job}"]


def test_the_jobs_index_drops_expired_ids_at_each_new_job(redis_server, monkeypatch):
    redis_server.start()
    r = redis_server.client()
    r.flushall()
    monkeypatch.setenv("POSEBATCH_JOB_RETENTION", "3600")
    store = JobStore(r)
    old = time.time() - 7200
    r.zadd(f"{PREFIX}:jobs", {f"gone-{i}": old for i in range(50)})
    r.zadd(f"{PREFIX}:jobs", {"long-running": old})
    r.hset(f"{PREFIX}:job:long-running", "state", "running")
    store.create("new", {"input": "in/", "output": "out/", "settings": {}})
    assert sorted(m.decode() for m in r.zrange(f"{PREFIX}:jobs", 0, -1)) == [
        "long-running", "new"]


def put(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_the_watcher_keeps_versions_of_recent_uploads_only(redis_server, tmp_path):
    """Versions of objects older than the settle time are dropped and never looked up again; a
    re-upload of such an image is still reprocessed (its result exists: force), a new one too."""
    redis_server.start()
    r = redis_server.client()
    r.flushall()
    drop, out = tmp_path / "drop", tmp_path / "out"
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        put(drop / name, jpeg(32, 24))
    out.mkdir()
    kw = {"job": JobSettings(), "broker_url": redis_server.url, "settle": 1.0}
    versions = versions_key(str(drop), str(out))

    def hmgets() -> int:
        return int(r.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0))

    time.sleep(1.2)
    assert len(poll_once(str(drop), str(out), **kw)) == 1  # all three, new
    assert r.hlen(versions) == 0  # older than the settle time: no later poll looks them up
    before = hmgets()
    assert poll_once(str(drop), str(out), **kw) == []
    assert hmgets() == before  # nothing old was looked up in Redis
    for name in ("a.jpg", "b.jpg", "c.jpg"):  # as if a worker had processed them
        put(out / f"{name}.json", b"{}")
    put(drop / "a.jpg", jpeg(40, 30))  # replaced under the same name
    put(drop / "d.jpg", jpeg(32, 24))  # new
    jobs = poll_once(str(drop), str(out), **kw)
    assert len(jobs) == 2
    store = JobStore(r)
    metas = {tuple(store.batch_keys(j, "00000000")): store.meta(j)["force"] for j in jobs}
    assert metas == {("d.jpg",): False, ("a.jpg",): True}
    assert r.hlen(versions) == 2  # recent: kept until they are older than the settle time
    assert poll_once(str(drop), str(out), **kw) == []  # each submitted once
    time.sleep(1.2)
    assert poll_once(str(drop), str(out), **kw) == []
    assert r.hlen(versions) == 0
    assert all(r.ttl(k) > 0 for k in r.scan_iter(f"{PREFIX}:watch:*"))
