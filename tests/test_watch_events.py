"""``posebatch watch --events``: S3 event notifications drive the drop folder (issue 22, item 1).

Real servers only: redis-server, moto's server (S3 that sends its bucket notifications into its
own SQS queues, a separate process on loopback) and a real ``posebatch worker`` that reads the
images from it. Each test has its own bucket and queue; the watcher runs as the CLI does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from posebatch.testing.cluster import CLI, WorkerProcess, run_cli, wait_until
from posebatch.testing.servers import running_events_server
from tests.devdata import require_model
from tests.images import encode, gradient, jpeg

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def stack(redis_server, tmp_path_factory):
    require_model()
    redis_server.start()
    with running_events_server(tmp_path_factory.mktemp("moto")) as server:
        env = {**server.env(), "POSEBATCH_BROKER_URL": redis_server.url}
        worker = WorkerProcess(tmp_path_factory.mktemp("worker"), env)
        worker.start()
        try:
            yield {"server": server, "env": env, "client": server.client(), "worker": worker}
        finally:
            worker.stop()


@pytest.fixture
def drop(stack):
    """A bucket whose notifications go to a fresh queue; the watcher's arguments for it."""
    server, name = stack["server"], f"ev-{uuid.uuid4().hex[:12]}"
    url, arn = server.make_queue(name)
    server.make_bucket(name, arn)
    return {"bucket": name, "queue": url, "arn": arn,
            "args": [f"s3://{name}/drop/", "--out", f"s3://{name}/out/", "--events", url]}


def watch_once(stack, drop, *extra: str) -> list[str]:
    return run_cli("watch", *drop["args"], "--once", *extra, env=stack["env"]).stdout.split()


def wait_job(stack, job_id: str) -> None:
    proc = run_cli("wait", job_id, "--timeout", "120", "--no-progress", env=stack["env"],
                   check=False)
    assert proc.returncode in (0, 1), proc.stderr


def put(stack, drop, key: str, data: bytes) -> None:
    stack["client"].put_object(Bucket=drop["bucket"], Key=key, Body=data)


def read_json(stack, drop, key: str) -> dict:
    return json.loads(stack["client"].get_object(Bucket=drop["bucket"], Key=key)["Body"].read())


def job_images(stack, drop, job_id: str) -> int:
    return read_json(stack, drop, f"out/_jobs/{job_id}/_summary.json")["images_seen"]


def s3_event(bucket: str, key: str, etag: str, size: int) -> str:
    """The S3 event JSON as AWS sends it (key URL-encoded, a space as '+')."""
    from urllib.parse import quote_plus

    return json.dumps({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": bucket}, "object": {
            "key": quote_plus(key, safe="/"), "eTag": etag, "size": size}}}]})


def test_an_upload_is_processed_once_and_a_duplicate_event_is_not_resubmitted(stack, drop):
    image = jpeg(64, 48)
    put(stack, drop, "drop/sub/a b.jpg", image)  # URL-encoded in the event: sub/a+b.jpg
    put(stack, drop, "drop/readme.txt", b"not an image")
    put(stack, drop, "elsewhere/z.jpg", jpeg(40, 30))  # outside INPUT's prefix
    jobs = watch_once(stack, drop)
    assert len(jobs) == 1, jobs
    wait_job(stack, jobs[0])
    assert job_images(stack, drop, jobs[0]) == 1
    first = read_json(stack, drop, "out/sub/a b.jpg.json")
    # The same version announced again: S3 re-sending (same bytes, same ETag) and SQS
    # delivering a copy of the message.
    put(stack, drop, "drop/sub/a b.jpg", image)
    head = stack["client"].head_object(Bucket=drop["bucket"], Key="drop/sub/a b.jpg")
    stack["server"].client("sqs").send_message(QueueUrl=drop["queue"], MessageBody=s3_event(
        drop["bucket"], "drop/sub/a b.jpg", head["ETag"].strip('"'), len(image)))
    assert watch_once(stack, drop) == []
    assert read_json(stack, drop, "out/sub/a b.jpg.json")["log_id"] == first["log_id"]
    assert stack["server"].client("sqs").receive_message(
        QueueUrl=drop["queue"], WaitTimeSeconds=0).get("Messages", []) == []  # all deleted


def test_a_reupload_with_new_bytes_is_processed_again(stack, drop):
    put(stack, drop, "drop/x.jpg", jpeg(64, 48))
    put(stack, drop, "drop/y.png", encode(gradient(40, 30), "PNG"))
    (first,) = watch_once(stack, drop)
    wait_job(stack, first)
    before = {k: read_json(stack, drop, f"out/{k}.json")["log_id"] for k in ("x.jpg", "y.png")}
    put(stack, drop, "drop/x.jpg", b"not an image any more")  # same name, new bytes
    (second,) = watch_once(stack, drop)
    wait_job(stack, second)
    assert job_images(stack, drop, second) == 1
    replaced = read_json(stack, drop, "out/x.jpg.json")
    assert replaced["error_code"] == 216201 and replaced["log_id"] != before["x.jpg"]
    assert read_json(stack, drop, "out/y.png.json")["log_id"] == before["y.png"]
    assert watch_once(stack, drop) == []


def test_a_lost_event_is_caught_by_reconciliation(stack, drop):
    put(stack, drop, "drop/seen.jpg", jpeg(64, 48))
    (first,) = watch_once(stack, drop)  # the first run reconciles too: it has no cursor yet
    wait_job(stack, first)
    server, sqs = stack["server"], stack["server"].client("sqs")
    server.notify(drop["bucket"], None)  # notifications off: no event for this one
    put(stack, drop, "drop/unannounced.jpg", jpeg(72, 40))
    server.notify(drop["bucket"], drop["arn"])
    put(stack, drop, "drop/deleted-event.jpg", jpeg(50, 50))
    for m in sqs.receive_message(QueueUrl=drop["queue"], MaxNumberOfMessages=10,
                                 WaitTimeSeconds=0).get("Messages", []):
        sqs.delete_message(QueueUrl=drop["queue"], ReceiptHandle=m["ReceiptHandle"])
    assert watch_once(stack, drop) == []  # no event left, reconciliation not due (1 h)
    time.sleep(1.1)
    (caught,) = watch_once(stack, drop, "--reconcile-every", "1")
    wait_job(stack, caught)
    assert job_images(stack, drop, caught) == 2  # not seen.jpg: its event submitted it
    for key in ("unannounced.jpg", "deleted-event.jpg"):
        stack["client"].head_object(Bucket=drop["bucket"], Key=f"out/{key}.json")
    time.sleep(1.1)
    assert watch_once(stack, drop, "--reconcile-every", "1") == []


def start_watcher(stack, drop, tmp_path, *args: str) -> tuple[subprocess.Popen, Path]:
    """``posebatch watch`` on the drop folder's queue in its own session (killpg stops it), its
    stdout (the job ids) in ``watch.out``, its log in ``watch.err``."""
    log = tmp_path / "watch.out"
    with open(log, "w") as out, open(tmp_path / "watch.err", "w") as err:
        proc = subprocess.Popen([*CLI, "watch", *drop["args"], *args], stdout=out, stderr=err,
                                env={**os.environ, **stack["env"]}, start_new_session=True)
    return proc, log


def test_a_burst_of_uploads_is_one_job_in_the_running_watcher(stack, drop, tmp_path):
    proc, log = start_watcher(stack, drop, tmp_path, "--event-window", "2",
                              "--reconcile-every", "0")
    try:
        started(stack, drop, proc)
        for i in range(3):
            put(stack, drop, f"drop/burst/{i}.jpg", jpeg(48 + 8 * i, 40))
        wait_until(lambda: _job_lines(log), 60, "the watcher to submit the burst")
        time.sleep(3)  # a second job would be out by now
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    jobs = _job_lines(log)
    assert len(jobs) == 1, (tmp_path / "watch.err").read_text()
    wait_job(stack, jobs[0])
    assert job_images(stack, drop, jobs[0]) == 3


def started(stack, drop, proc) -> None:
    """Wait until the watcher runs (its signal handler set): it has taken the s3:TestEvent that
    configuring the notification put into the queue."""
    sqs = stack["server"].client("sqs")

    def empty() -> bool:
        assert proc.poll() is None, "the watcher exited"
        attrs = sqs.get_queue_attributes(QueueUrl=drop["queue"], AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])
        return set(attrs["Attributes"].values()) == {"0"}

    wait_until(empty, 60, "the watcher to take the test event")
    time.sleep(0.5)  # and to be in its next long poll


def _job_lines(path) -> list[str]:
    return path.read_text().split()


def intake(stack, drop, **options):
    """An EventIntake as the CLI builds it (the test has set the AWS_* variables)."""
    from posebatch.settings import JobSettings
    from producer.events import EventIntake

    broker = options.pop("broker_url", stack["env"]["POSEBATCH_BROKER_URL"])
    return EventIntake(f"s3://{drop['bucket']}/drop/", f"s3://{drop['bucket']}/out/",
                       drop["queue"], job=JobSettings(), broker_url=broker, **options)


def test_a_failed_flush_leaves_its_messages_to_be_delivered_again(stack, drop, monkeypatch):
    """Redis unreachable while a window is submitted: nothing is deleted from the queue; the
    messages come back after the visibility timeout and are submitted then, once."""
    from posebatch.errors import StateUnavailable
    from posebatch.testing.servers import free_ports

    for name, value in stack["env"].items():
        monkeypatch.setenv(name, value)
    put(stack, drop, "drop/retry.jpg", jpeg(64, 48))
    down = intake(stack, drop, broker_url=f"redis://127.0.0.1:{free_ports(1)[0]}/0",
                  visibility=1)
    with pytest.raises(StateUnavailable):
        down.drain()
    time.sleep(1.5)  # the visibility timeout passes: SQS hands the messages out again
    jobs = intake(stack, drop).drain()
    assert len(jobs) == 1
    wait_job(stack, jobs[0])
    assert job_images(stack, drop, jobs[0]) == 1


def test_submitted_versions_expire_after_the_dedup_ttl(stack, drop, monkeypatch):
    import redis

    for name, value in stack["env"].items():
        monkeypatch.setenv(name, value)
    put(stack, drop, "drop/ttl.jpg", jpeg(64, 48))
    events = intake(stack, drop, dedup_ttl=1)
    assert len(events.drain()) == 1
    r = redis.Redis.from_url(stack["env"]["POSEBATCH_BROKER_URL"])
    assert r.hget(events.events, "ttl.jpg") is not None
    assert r.hget(events.versions, "ttl.jpg") == r.hget(events.events, "ttl.jpg")
    assert 0 < r.ttl(events.events) <= 30 * 24 * 3600  # the whole state expires too
    time.sleep(1.1)
    assert events.expire() == 1
    assert (r.hlen(events.events), r.zcard(events.times)) == (0, 0)
    assert r.hget(events.versions, "ttl.jpg") is None


@pytest.mark.parametrize("body, expected", [
    ('{"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "b"}', []),
    ("not json", None),
    ('{"Records": [{"eventName": "ObjectRemoved:Delete", "s3": {}}]}', []),
    (s3_event("b", "in/a b+c%.jpg", "e1", 3), [("a b+c%.jpg", "e1", 3)]),
    (s3_event("other", "in/a.jpg", "e1", 3), []),
    (s3_event("b", "out/a.jpg", "e1", 3), []),
    (s3_event("b", "in/notes.txt", "e1", 3), []),
    (json.dumps({"Type": "Notification", "Message": s3_event("b", "in/s.png", "e2", 5)}),
     [("s.png", "e2", 5)]),
])
def test_parse_message(body, expected):
    """One function: the standard S3 event JSON (and SNS-wrapped), keys URL-decoded."""
    from producer.events import parse_message

    got = parse_message(body, "b", "in/")
    assert (None if got is None else [(c.key, c.etag, c.size) for c in got]) == expected


def test_sigterm_submits_the_open_window_before_exiting(stack, drop, tmp_path):
    """docker stop / k8s: the images of an unfinished window are submitted, not left in the
    queue for the visibility timeout."""
    proc, log = start_watcher(stack, drop, tmp_path, "--event-window", "5",
                              "--reconcile-every", "0")
    try:
        started(stack, drop, proc)
        put(stack, drop, "drop/late.jpg", jpeg(64, 48))
        time.sleep(1)  # received; its window is still open
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 0, (tmp_path / "watch.err").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (job,) = _job_lines(log)
    wait_job(stack, job)
    assert job_images(stack, drop, job) == 1


@pytest.mark.parametrize("args, says", [
    (["/tmp/folder", "--out", "/tmp/out", "--events", "q"], "needs an s3:// INPUT"),
    (["s3://b/in/", "--out", "s3://b/out/", "--events", "q", "--dedup-ttl", "3600"],
     "--dedup-ttl 3600 is shorter"),
    (["s3://b/in/", "--out", "s3://b/out/", "--events", "a/b"], "expected a queue URL"),
])
def test_watch_events_refuses_what_cannot_work(stack, args, says):
    proc = run_cli("watch", *args, "--once", env=stack["env"], check=False)
    assert proc.returncode == 3 and says in proc.stderr, proc.stderr


def test_the_running_watcher_reconciles_in_its_own_thread(stack, drop, tmp_path):
    """A watcher that never listed reconciles at start, beside the event loop: an image put
    while notifications were off is submitted without any event."""
    stack["server"].notify(drop["bucket"], None)
    put(stack, drop, "drop/before.jpg", jpeg(64, 48))
    stack["server"].notify(drop["bucket"], drop["arn"])
    proc, log = start_watcher(stack, drop, tmp_path)
    try:
        wait_until(lambda: _job_lines(log), 60, "the reconciliation to submit before.jpg")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    (job,) = _job_lines(log)
    wait_job(stack, job)
    assert job_images(stack, drop, job) == 1
    assert "reconciliation" in (tmp_path / "watch.err").read_text()
