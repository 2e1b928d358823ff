"""Operator mistakes at submit time (issue 11, rows 9 and 14): refused before anything is queued,
no phantom job left behind, and `status` tells a mistyped id from a lost one. Real redis-server,
real SeaweedFS; no workers (nothing may reach the queue)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from posebatch.errors import StorageError
from posebatch.jobstate import PREFIX, JobStore
from posebatch.queue import QUEUE
from posebatch.settings import JobSettings
from posebatch.testing.cluster import run_cli
from tests.images import jpeg


@pytest.fixture
def env(redis_server, s3_server, bucket):
    redis_server.start()
    redis_server.client().flushall()
    s3_server.client().put_object(Bucket=bucket, Key="in/a.jpg", Body=jpeg(40, 30))
    return {**s3_server.env(), "POSEBATCH_BROKER_URL": redis_server.url}


def nothing_queued_and_no_job(redis_server) -> None:
    r = redis_server.client()
    assert r.llen(QUEUE) == 0
    assert r.zcard(f"{PREFIX}:jobs") == 0
    assert list(r.scan_iter(f"{PREFIX}:job:*")) == []


@pytest.mark.parametrize(("input_", "output", "message"), [
    ("s3://nosuchbucket-in/x/", "s3://{bucket}/out/", "bucket nosuchbucket-in does not exist"),
    ("s3://{bucket}/in/", "s3://nosuchbucket-out/r/", "bucket nosuchbucket-out does not exist"),
], ids=["missing-input-bucket", "missing-output-bucket"])
def test_submit_to_a_missing_bucket_is_refused_before_anything_is_queued(
        env, bucket, redis_server, input_, output, message):
    proc = run_cli("submit", input_.format(bucket=bucket), "--out", output.format(bucket=bucket),
                   env=env, check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert message in proc.stderr and proc.stdout == ""
    nothing_queued_and_no_job(redis_server)
    assert "posebatch status" not in run_cli("status", env=env).stdout  # lists no job


def test_a_good_submit_records_who_wrote_into_the_output(env, bucket, s3_server):
    job_id = run_cli("submit", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out/",
                     env=env).stdout.split()[-1]
    body = s3_server.client().get_object(Bucket=bucket, Key=f"out/_jobs/{job_id}/_job.json")
    assert b'"input": "s3://' in body["Body"].read()


def test_a_submission_failing_before_any_batch_leaves_no_job(env, bucket, redis_server):
    from producer.submit import submit

    def listing():
        yield "a.jpg"
        raise StorageError("S3 list failed: connection reset")

    with pytest.raises(StorageError):
        submit(f"s3://{bucket}/in/", f"s3://{bucket}/out/", job=JobSettings(),
               broker_url=redis_server.url, keys=listing(), job_id="none")
    nothing_queued_and_no_job(redis_server)


def test_a_submission_failing_part_way_is_abandoned_and_wait_ends(env, bucket, redis_server):
    from producer.submit import ENQUEUE_GROUP, submit

    def listing():  # two groups of batches get queued, then the listing breaks
        yield from (f"{i}.jpg" for i in range(2 * ENQUEUE_GROUP + 1))
        raise StorageError("S3 list failed: connection reset")

    with pytest.raises(StorageError):
        submit(f"s3://{bucket}/in/", f"s3://{bucket}/out/", job=JobSettings(),
               broker_url=redis_server.url, batch_images=1, keys=listing(), job_id="half")
    p = JobStore(redis_server.client()).progress("half")
    assert p is not None and p.state == "abandoned"
    assert f"after {2 * ENQUEUE_GROUP} batches" in p.error
    proc = run_cli("wait", "half", "--timeout", "10", env=env, check=False)
    assert proc.returncode == 3 and "abandoned" in proc.stderr and "connection reset" in \
        proc.stderr
    status = run_cli("status", "half", env=env, check=False)  # exit 3: fix, then resubmit
    assert status.returncode == 3 and "abandoned" in status.stdout


def generated_id(when: datetime) -> str:
    return when.strftime("%Y%m%d-%H%M%S-") + "abc123"


@pytest.mark.parametrize(("make_id", "says", "never_says"), [
    # made after the server started: a generated id of this minute, a little ahead (computed
    # when the test runs: at collection time it would be older than a server started later)
    (lambda: generated_id(datetime.now(UTC) + timedelta(minutes=1)), "check the id",
     "state is gone"),
    (lambda: generated_id(datetime(2020, 1, 1, tzinfo=UTC)), "state is gone", "check the id"),
    (lambda: "my-own-id", "check the id", None),
], ids=["created-after-redis-started", "created-before-redis-started", "hand-picked-id"])
def test_status_of_an_unknown_id_says_mistyped_or_lost(env, make_id, says, never_says):
    job_id = make_id()
    for command in (["status", job_id], ["wait", job_id, "--timeout", "5"]):
        proc = run_cli(*command, env=env, check=False)
        assert proc.returncode == 3, proc.stdout + proc.stderr
        assert says in proc.stderr
        assert never_says is None or never_says not in proc.stderr


def test_submit_waits_while_the_queue_is_above_the_high_water_mark(env, bucket, redis_server,
                                                                   monkeypatch):
    """Back-pressure: with 3 batches queued and a high-water mark of 2, submit queues nothing
    until a "worker" takes messages off the queue."""
    import threading

    from producer.submit import submit

    monkeypatch.setenv("POSEBATCH_QUEUE_HIGH_WATER", "2")
    r = redis_server.client()
    r.rpush(QUEUE, b"{}", b"{}", b"{}")  # someone else's batches, ahead of ours
    done = threading.Event()

    def run() -> None:
        submit(f"s3://{bucket}/in/", f"s3://{bucket}/out/", job=JobSettings(),
               broker_url=redis_server.url, keys=["a.jpg"], job_id="bp")
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert not done.wait(3)  # held back: the queue is above the mark
    assert r.llen(QUEUE) == 3
    r.rpop(QUEUE)
    r.rpop(QUEUE)  # workers drain it
    assert done.wait(20)
    assert r.llen(QUEUE) == 2  # one foreign message left, plus ours
    t.join(5)


def test_log_json_writes_one_json_object_per_line(env, bucket):
    import json

    proc = run_cli("--log-json", "watch", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/lj/",
                   "--once", env=env)
    lines = [json.loads(line) for line in proc.stderr.splitlines() if line.strip()]
    assert any("new images" in e["msg"] and e["level"] == "WARNING" and
               e["logger"] == "producer.watch" for e in lines), proc.stderr
