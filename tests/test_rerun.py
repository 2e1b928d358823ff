"""Reruns in O(new) (issue 22, item 2): a re-submission of the same INPUT into the same OUTPUT
submits only keys that are new, replaced (ETag/size differ from the count table) or retryable;
nothing is read for a done image. Real redis-server, SeaweedFS and a worker process; the plan
itself against a real folder."""

from __future__ import annotations

import csv
import io
import json

import pytest

from posebatch import s3storage
from posebatch.aggregate import COUNTS_NAME, CSV_COLUMNS
from posebatch.jobstate import JobStore
from posebatch.settings import JobSettings
from posebatch.storage import LocalStorage
from posebatch.testing.cluster import WorkerProcess, run_cli
from producer import submit as submit_mod
from producer.rerun import CHANGED, NEW, RETRY, rerun_plan
from tests.images import jpeg


def table(client, bucket: str) -> dict[str, dict[str, str]]:
    body = client.get_object(Bucket=bucket, Key="out/_counts.csv")["Body"].read()
    return {r["key"]: r for r in csv.DictReader(io.StringIO(body.decode("utf-8-sig")))}


def log_ids(client, bucket: str, keys) -> dict[str, str]:
    return {k: json.loads(client.get_object(Bucket=bucket, Key=f"out/{k}.json")["Body"].read())
            ["log_id"] for k in keys}


@pytest.mark.cluster
def test_a_rerun_submits_only_new_and_replaced_images_and_reads_no_done_result(
        redis_server, s3_server, bucket, tmp_path, monkeypatch):
    redis_server.start()
    r = redis_server.client()
    r.flushall()
    client = s3_server.client()
    done = [f"d/{i}.jpg" for i in range(6)]
    for key in done:
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=jpeg(64, 48))
    env = {**s3_server.env(), "POSEBATCH_BROKER_URL": redis_server.url}
    src, out = f"s3://{bucket}/in/", f"s3://{bucket}/out/"
    worker = WorkerProcess(tmp_path, env)
    worker.start()
    try:
        first = run_cli("submit", src, "--out", out, "--batch-images", "2",
                        env=env).stdout.split()[-1]
        assert run_cli("wait", first, "--timeout", "180", "--no-progress", env=env).returncode == 0
        rows = table(client, bucket)
        assert rows["d/0.jpg"]["etag"] and rows["d/0.jpg"]["bytes"] == str(len(jpeg(64, 48)))
        before = log_ids(client, bucket, done)
        client.put_object(Bucket=bucket, Key="in/new/a.jpg", Body=jpeg(32, 24))
        client.put_object(Bucket=bucket, Key="in/new/b.jpg", Body=jpeg(32, 24))
        client.put_object(Bucket=bucket, Key="in/d/3.jpg", Body=jpeg(80, 60))  # replaced

        # The producer's requests, counted on its own S3 clients (botocore's event hooks).
        gets: list[str] = []
        real_client = s3storage.make_s3_client

        def counting_client(**kwargs):
            c = real_client(**kwargs)
            c.meta.events.register("before-call.s3.GetObject",
                                   lambda params, **_: gets.append(params["url_path"]))
            return c

        monkeypatch.setattr("posebatch.s3storage.make_s3_client", counting_client)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        second = submit_mod.submit(src, out, job=JobSettings(), broker_url=redis_server.url,
                                   batch_images=2)
        assert any(g.endswith("out/_counts.csv") for g in gets), gets  # the hook sees GETs
        assert [g for g in gets if g.endswith(".jpg.json")] == []  # no done result read
        assert run_cli("wait", second, "--timeout", "180", "--no-progress",
                       env=env).returncode == 0
    finally:
        worker.stop()
    p = JobStore(r).progress(second)
    assert (p.total, p.done) == (3, 3)  # 2 new + 1 replaced, not the 8 listed
    assert int(r.hget(f"posebatch:job:{second}", "batches")) == 2  # one plain, one forced
    after = log_ids(client, bucket, done)
    assert {k for k in done if after[k] != before[k]} == {"d/3.jpg"}
    rows = table(client, bucket)
    assert len(rows) == 8 and (rows["d/3.jpg"]["width"], rows["d/3.jpg"]["height"]) == (
        "80", "60")
    assert rows["d/3.jpg"]["bytes"] == str(len(jpeg(80, 60)))
    root = json.loads(client.get_object(Bucket=bucket, Key="out/_summary.json")["Body"].read())
    assert root["images_seen"] == 8 and root["job_id"] == second
    own = json.loads(client.get_object(
        Bucket=bucket, Key=f"out/_jobs/{second}/_summary.json")["Body"].read())
    assert own["images_seen"] == 3


def test_the_plan_takes_new_replaced_and_retryable_keys_only(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    for name in ("done.jpg", "replaced.jpg", "unreadable.jpg", "batchfail.jpg", "notimage.jpg",
                 "old-table.jpg", "new.jpg"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(jpeg(16, 12))
    listed = {i.key: i for i in LocalStorage(str(src)).iter_objects()}
    out.mkdir()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)

    def row(key, status="ok", code="", msg="", etag=None, nbytes=None, batch=""):
        info = listed[key]
        w.writerow([key, status, code, 1, 1, msg, 16, 12,
                    info.etag if etag is None else etag,
                    info.size if nbytes is None else nbytes, batch])

    for key in ("batchfail.jpg", "done.jpg", "notimage.jpg", "old-table.jpg", "replaced.jpg",
                "unreadable.jpg"):
        if key == "batchfail.jpg":
            row(key, "error", 282000, "batch 00000001 failed: storage unreachable", batch="1")
        elif key == "notimage.jpg":
            row(key, "error", 216201, "not JPEG, PNG or BMP")
        elif key == "old-table.jpg":
            row(key, etag="", nbytes="")  # a table without versions: unchanged
        elif key == "replaced.jpg":
            row(key, etag="mtime:1", nbytes=999)
        elif key == "unreadable.jpg":
            row(key, "error", 216200, "no image data: access denied")
        else:
            row(key)
    (out / COUNTS_NAME).write_text("\ufeff" + buf.getvalue(), encoding="utf-8")
    with rerun_plan(LocalStorage(str(src)), LocalStorage(str(out)), None) as plan:
        got = {info.key: why for info, why in plan}
    assert got == {"new.jpg": NEW, "replaced.jpg": CHANGED, "unreadable.jpg": RETRY,
                   "batchfail.jpg": RETRY}
