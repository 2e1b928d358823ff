"""The cluster end to end: redis-server, SeaweedFS S3 and real worker processes.

Upload the dev set (plus bad files) to a bucket, submit, run two workers, wait: every result and
the summary must equal the local run's. Then re-submission, --force, the drop-folder watcher and
the beat schedule's submit task, all against the same real servers.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from posebatch.settings import JobSettings
from posebatch.testing.cluster import (
    WorkerProcess,
    comparable_summary,
    download_results,
    run_cli,
    upload_tree,
    without_log_id,
)
from tests.devdata import require_dev_data
from tests.images import encode, gradient, jpeg
from tests.tables import without_versions

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster_stack(redis_server, s3_server, tmp_path_factory):
    """Servers, a bucket with the input uploaded, the local reference run, two workers."""
    dev = require_dev_data()
    redis_server.start()
    import redis as redis_lib

    redis_lib.Redis.from_url(redis_server.url).flushall()
    bucket = s3_server.make_bucket(f"c-{uuid.uuid4().hex[:12]}")
    env = {**s3_server.env(), "POSEBATCH_BROKER_URL": redis_server.url}
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(dev / "images", src, dirs_exist_ok=True)
    (src / "bad").mkdir()
    (src / "bad" / "empty.jpg").write_bytes(b"")
    (src / "bad" / "fake.png").write_bytes(b"definitely not a png" * 10)
    (src / "odd names").mkdir()
    (src / "odd names" / "straße café.jpg").write_bytes(jpeg(80, 60, orientation=8))
    (src / "odd names" / "x.bmp").write_bytes(encode(gradient(50, 40), "BMP"))
    client = s3_server.client()
    keys = upload_tree(client, bucket, "in/", src)
    local_out = tmp_path_factory.mktemp("local")
    run_cli("run", str(src), "--out", str(local_out), "--no-progress", env=env)
    workdir = tmp_path_factory.mktemp("workers")
    from posebatch.testing.servers import free_ports

    ports = free_ports(2)
    workers = [WorkerProcess(workdir, {**env, "POSEBATCH_METRICS_PORT": str(ports[i])}, i)
               for i in range(2)]
    for w in workers:
        w.start()
    yield {"env": env, "bucket": bucket, "client": client, "keys": keys, "src": src,
           "local": local_out, "workers": workers, "redis": redis_server,
           "metrics_ports": ports}
    for w in workers:
        w.stop()


def submit(cluster_stack, *extra: str, out: str = "out/") -> str:
    proc = run_cli("submit", f"s3://{cluster_stack['bucket']}/in/", "--out",
                   f"s3://{cluster_stack['bucket']}/{out}", "--batch-images", "4", *extra,
                   env=cluster_stack["env"])
    return proc.stdout.strip().splitlines()[-1]


def wait(cluster_stack, job_id: str) -> int:
    proc = run_cli("wait", job_id, "--timeout", "240", "--no-progress", env=cluster_stack["env"],
                   check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode


def local_results(cluster_stack) -> dict[str, dict]:
    out: Path = cluster_stack["local"]
    return {p.relative_to(out).as_posix(): json.loads(p.read_text())
            for p in out.rglob("*.json")}


@pytest.fixture(scope="module")
def first_job(cluster_stack):
    job_id = submit(cluster_stack)
    assert wait(cluster_stack, job_id) == 1  # the bad files failed: wait says so
    return job_id


def test_cluster_results_equal_the_local_run(cluster_stack, first_job):
    remote = download_results(cluster_stack["client"], cluster_stack["bucket"], "out/")
    local = local_results(cluster_stack)
    assert without_log_id(remote) == without_log_id(local)
    assert len(without_log_id(remote)) == len(cluster_stack["keys"])


def test_cluster_summary_equals_the_local_summary(cluster_stack, first_job):
    client, bucket = cluster_stack["client"], cluster_stack["bucket"]
    remote = download_results(client, bucket, "out/")["_summary.json"]
    local = local_results(cluster_stack)["_summary.json"]
    assert comparable_summary(remote) == comparable_summary(local)
    assert remote["job_id"] == first_job
    assert remote["images_seen"] == len(cluster_stack["keys"]) and remote["failed"] == 2
    csv = client.get_object(Bucket=bucket, Key="out/_counts.csv")["Body"].read()
    # Equal but for the input versions, which only `submit`'s listing records (S3's ETags).
    assert without_versions(csv) == without_versions(
        (cluster_stack["local"] / "_counts.csv").read_bytes())


def test_both_workers_took_batches(cluster_stack, first_job):
    assert all(w.processed_batches() > 0 for w in cluster_stack["workers"]), [
        w.log_tail() for w in cluster_stack["workers"]]


def scrape(port: int) -> dict[str, float]:
    """``curl http://127.0.0.1:PORT/metrics``, parsed by prometheus-client's own parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            values[f"{s.name}{{{labels}}}"] = values.get(f"{s.name}{{{labels}}}", 0) + s.value
    return values


def total(samples: list[dict[str, float]], prefix: str) -> float:
    return sum(v for s in samples for k, v in s.items() if k.startswith(prefix))


def test_worker_metrics_count_images_and_move_with_the_next_job(cluster_stack, first_job):
    before = [scrape(p) for p in cluster_stack["metrics_ports"]]
    n = len(cluster_stack["keys"])
    # The first job: every image processed once across both workers, two of them failed.
    assert total(before, "posebatch_images_total{code=,status=ok}") == n - 2
    assert total(before, "posebatch_images_total{code=216200,status=error}") == 1  # empty.jpg
    assert total(before, "posebatch_images_total{code=216201,status=error}") == 1  # fake.png
    assert total(before, "posebatch_batch_seconds_count") >= n // 4
    assert total(before, "posebatch_model_load_seconds") > 0
    assert total(before, "posebatch_batches_in_flight") == 0
    # Stage timers: every batch task's seconds per stage (workers.engine.stages)
    assert total(before, "posebatch_stage_seconds_total{stage=decode}") > 0
    assert total(before, "posebatch_stage_seconds_per_image_count{stage=infer}") >= n // 4
    job = submit(cluster_stack, "--force", out="metrics-out/")
    wait(cluster_stack, job)
    after = [scrape(p) for p in cluster_stack["metrics_ports"]]
    assert total(after, "posebatch_images_total") == total(before, "posebatch_images_total") + n


def test_status_reports_the_finished_job(cluster_stack, first_job):
    proc = run_cli("status", first_job, env=cluster_stack["env"])
    assert f"job {first_job}: done" in proc.stdout
    n = len(cluster_stack["keys"])
    assert f"{n}/{n} images done, 2 failed" in proc.stdout
    # Redis stays bounded: only the job hash is left, and it expires.
    r = cluster_stack["redis"].client()
    keys = list(r.scan_iter(f"posebatch:job:{first_job}*"))
    assert len(keys) == 1 and all(r.ttl(k) > 0 for k in keys), {k: r.ttl(k) for k in keys}


def test_resubmission_processes_nothing_and_force_reprocesses_with_exact_counts(cluster_stack,
                                                                               first_job):
    before = download_results(cluster_stack["client"], cluster_stack["bucket"], "out/")
    job2 = submit(cluster_stack)
    wait(cluster_stack, job2)
    after = download_results(cluster_stack["client"], cluster_stack["bucket"], "out/")
    # Same log_ids: no image was processed again.
    assert {k: v for k, v in after.items() if not k.startswith("_")} == {
        k: v for k, v in before.items() if not k.startswith("_")}
    # Nothing new: the job submitted nothing and left the root tables as they were.
    assert after["_summary.json"] == before["_summary.json"]
    assert after[f"_jobs/{job2}/_summary.json"]["images_seen"] == 0

    job3 = submit(cluster_stack, "--force")
    wait(cluster_stack, job3)
    forced = download_results(cluster_stack["client"], cluster_stack["bucket"], "out/")
    changed = [k for k in before if not k.startswith("_")
               and forced[k]["log_id"] != before[k]["log_id"]]
    assert len(changed) == len(cluster_stack["keys"])  # every image redone
    assert comparable_summary(forced["_summary.json"]) == comparable_summary(
        before["_summary.json"])


def test_a_finished_force_job_with_new_settings_leaves_a_complete_output(cluster_stack, first_job):
    """The manifest is marked unfinished while a --force job replaces results (issue 11), and
    complete once the job is done: a later submit with those settings is accepted."""
    wait(cluster_stack, submit(cluster_stack, out="forced/"))
    wait(cluster_stack, submit(cluster_stack, "--force", "--det-conf", "0.3", out="forced/"))
    manifest = json.loads(cluster_stack["client"].get_object(
        Bucket=cluster_stack["bucket"], Key="forced/_posebatch.json")["Body"].read())
    assert manifest["complete"] is True and manifest["settings"]["det_conf"] == 0.3
    assert wait(cluster_stack, submit(cluster_stack, "--det-conf", "0.3", out="forced/")) in (0, 1)


def test_watcher_restarted_between_uploads_submits_each_image_once(cluster_stack, tmp_path):
    client, bucket, env = cluster_stack["client"], cluster_stack["bucket"], cluster_stack["env"]
    drop, out = f"s3://{bucket}/drop/", f"s3://{bucket}/drop-out/"
    client.put_object(Bucket=bucket, Key="drop/a.jpg", Body=jpeg(64, 48))
    client.put_object(Bucket=bucket, Key="drop/sub/b.png", Body=encode(gradient(40, 30), "PNG"))
    client.put_object(Bucket=bucket, Key="drop/readme.txt", Body=b"ignored")
    first = run_cli("watch", drop, "--out", out, "--once", env=env).stdout.split()
    # A new watcher process (a restart) after one more upload.
    client.put_object(Bucket=bucket, Key="drop/c.jpg", Body=jpeg(80, 60))
    second = run_cli("watch", drop, "--out", out, "--once", env=env).stdout.split()
    third = run_cli("watch", drop, "--out", out, "--once", env=env).stdout.split()
    assert len(first) == 1 and len(second) == 1 and third == []
    for job_id in first + second:
        wait(cluster_stack, job_id)
    res = download_results(client, bucket, "drop-out/")
    s1 = res[f"_jobs/{first[0]}/_summary.json"]
    s2 = res[f"_jobs/{second[0]}/_summary.json"]
    assert (s1["images_seen"], s2["images_seen"]) == (2, 1)
    assert {"a.jpg.json", "sub/b.png.json", "c.jpg.json"} <= set(res)


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_watch_reprocesses_an_image_replaced_under_the_same_name(cluster_stack, tmp_path, where):
    """Issue 11 row 10: a drop-folder image overwritten with new bytes is processed again."""
    import os

    client, bucket, env = cluster_stack["client"], cluster_stack["bucket"], cluster_stack["env"]
    if where == "s3":
        drop, out = f"s3://{bucket}/redrop/", f"s3://{bucket}/redrop-out/"

        def put(name: str, data: bytes) -> None:
            client.put_object(Bucket=bucket, Key=f"redrop/{name}", Body=data)

        def result(name: str) -> dict:
            body = client.get_object(Bucket=bucket, Key=f"redrop-out/{name}.json")["Body"]
            return json.loads(body.read())
    else:
        drop, out = str(tmp_path / "drop"), str(tmp_path / "out")
        os.makedirs(drop)

        def put(name: str, data: bytes) -> None:
            Path(drop, name).write_bytes(data)

        def result(name: str) -> dict:
            return json.loads(Path(out, f"{name}.json").read_text())

    put("x.jpg", jpeg(64, 48))
    put("y.jpg", jpeg(64, 48))
    (first,) = run_cli("watch", drop, "--out", out, "--once", env=env).stdout.split()
    wait(cluster_stack, first)
    before = {n: result(n)["log_id"] for n in ("x.jpg", "y.jpg")}
    put("x.jpg", b"not an image any more")  # replaced: same name, new bytes
    (second,) = run_cli("watch", drop, "--out", out, "--once", env=env).stdout.split()
    wait(cluster_stack, second)
    assert result("x.jpg")["error_code"] == 216201  # the new bytes were processed
    assert result("y.jpg")["log_id"] == before["y.jpg"]  # the unchanged one was not
    assert run_cli("watch", drop, "--out", out, "--once", env=env).stdout.split() == []


def test_scheduled_submit_task_creates_a_job(cluster_stack, tmp_path):
    """What a beat entry sends (posebatch.submit_job) runs on the control worker, and the model
    workers complete the job."""
    from celery import Celery

    from posebatch.testing.cluster import ControlProcess

    control = ControlProcess(tmp_path, {**cluster_stack["env"], "POSEBATCH_REQUEUE_AFTER": "2"})
    control.start()
    try:
        app = Celery(broker=cluster_stack["env"]["POSEBATCH_BROKER_URL"])
        _scheduled_job_completes(cluster_stack, app)
        _scheduled_run_skipped_while_the_previous_one_runs(cluster_stack, app, control)
        _control_worker_requeues_a_lost_batch(cluster_stack)
    finally:
        control.stop()


def _scheduled_run_skipped_while_the_previous_one_runs(cluster_stack, app, control) -> None:
    from posebatch.jobstate import JobStore
    from posebatch.testing.cluster import wait_until, worker_log
    from producer.control import schedule_key

    bucket = cluster_stack["bucket"]
    src, dst = f"s3://{bucket}/in/odd names/", f"s3://{bucket}/sched2-out/"
    store = JobStore(cluster_stack["redis"].client())
    store.create("previous-run", {"input": src, "output": dst, "settings": {}})
    store.mark_submitted("previous-run", 10, 1)  # running: never finishes in this test
    store.r.set(f"{schedule_key(src, dst)}:last", "previous-run")
    app.send_task("posebatch.submit_job", queue="posebatch-control",
                  kwargs={"input_url": src, "output_url": dst})
    wait_until(lambda: "is still running; this run is skipped" in worker_log(control), 60,
               "the control worker to skip the overlapping run")
    assert store.recent(50).count("previous-run") == 1
    assert not any(store.meta(j)["output"] == dst for j in store.recent(50)
                   if j != "previous-run")
    store.discard("previous-run")


def _control_worker_requeues_a_lost_batch(cluster_stack) -> None:
    """A job whose only batch has no message anywhere (lost with a machine): nobody runs
    `wait`, the control worker's watchdog queues it again and the job completes."""
    from posebatch.jobstate import JobStore
    from posebatch.testing.cluster import wait_until

    bucket = cluster_stack["bucket"]
    store = JobStore(cluster_stack["redis"].client())
    meta = {"input": f"s3://{bucket}/in/odd names/", "output": f"s3://{bucket}/lost-out/",
            "settings": JobSettings().to_dict(), "force": False, "summary_prefix": ""}
    store.create("lost-batch", meta)
    store.add_batches("lost-batch", {"00000000": ["straße café.jpg", "x.bmp"]})
    store.mark_submitted("lost-batch", 2, 1)

    def done() -> bool:
        p = store.progress("lost-batch")
        return p is not None and p.state == "done"

    wait_until(done, 90, "the watchdog to queue the lost batch again and the job to finish")
    res = download_results(cluster_stack["client"], bucket, "lost-out/")
    assert res["_summary.json"]["images_seen"] == 2


def _scheduled_job_completes(cluster_stack, app) -> None:
    bucket = cluster_stack["bucket"]
    app.send_task("posebatch.submit_job", queue="posebatch-control",
                  kwargs={"input_url": f"s3://{bucket}/in/odd names/",
                          "output_url": f"s3://{bucket}/sched-out/", "batch_images": 4})
    from posebatch.testing.cluster import wait_until

    def summary_written() -> bool:
        try:
            cluster_stack["client"].head_object(Bucket=bucket, Key="sched-out/_summary.json")
            return True
        except Exception:
            return False

    wait_until(summary_written, 120, "the scheduled job's summary")
    res = download_results(cluster_stack["client"], bucket, "sched-out/")
    assert res["_summary.json"]["images_seen"] == 2


def test_a_pinned_job_runs_its_pin_on_every_worker_and_says_so(cluster_stack, first_job):
    """Workers left at auto (OpenVINO bf16 on an AMX host) run a job pinned to ORT FP32 with
    ORT FP32: the job's answers no longer depend on which host took a batch."""
    wait(cluster_stack, submit(cluster_stack, "--precision", "fp32", "--backend", "ort",
                               out="pinned/"))
    results = download_results(cluster_stack["client"], cluster_stack["bucket"], "pinned/")
    assert results["_summary.json"]["runners"] == ["ort fp32 cpu"]
    assert results["_posebatch.json"]["settings"]["precision"] == "fp32"
    assert results["_posebatch.json"]["runner"] == "ort fp32 cpu"
