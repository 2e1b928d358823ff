"""Fault injection against the real stack: nothing lost, nothing counted twice.

Each test runs a job over the same corpus (the dev images re-encoded at several sizes) through
real ``posebatch worker`` processes, a real redis-server and SeaweedFS, breaks something in the
middle (SIGKILL a worker, all workers, Redis, the S3 server, the producer), lets the system
recover (or recovers the way the docs tell a user to), and then compares every per-image result,
``_summary.json`` and ``_counts.csv`` with an undisturbed local run of the same images.

"In the middle" is a condition, never a sleep: a worker has recorded at least one batch and has
written results of the next one that are not recorded yet (results in S3 > records in Redis).
Workers run with a 6 s visibility timeout so that a batch of a killed worker comes back in
seconds rather than hours (docs/reliability.md explains the trade-off).

The measured figures go to $POSEBATCH_FIGURES (JSON lines) when set; docs/reliability.md holds
the table and the command that reproduces each row.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from posebatch.jobstate import JobStore
from posebatch.testing.cluster import (
    CLI,
    WorkerProcess,
    batches_in_flight,
    comparable_summary,
    compare_with_reference,
    download_results,
    record_figures,
    rerun_batches,
    result_keys,
    run_cli,
    start_all,
    upload_tree,
    wait_until,
    without_log_id,
    worker_log,
)
from posebatch.testing.servers import RedisServer, S3Server, require_or_skip, running_redis
from tests.devdata import require_dev_data
from tests.tables import without_versions

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

VISIBILITY_TIMEOUT = 6  # seconds before a dead worker's batch is handed out again
BATCH_IMAGES = 16  # images per task: 4 model calls of 4 images, results written as they come
MODEL_BATCH = 4
SIZES = (640, 480, 800, 360)  # long side of each re-encoded copy of a dev image
JOB_TIMEOUT = 150
THIS = "tests/test_faults.py"


# -- corpus and reference ---------------------------------------------------------------------

def make_corpus(dst: Path) -> list[str]:
    """Each dev image at several sizes (odd ones mirrored), re-encoded: 52 distinct JPEGs."""
    dev = require_dev_data() / "images"
    keys = []
    for src in sorted(p for p in dev.rglob("*") if p.is_file()):
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            for i, side in enumerate(SIZES):
                scale = side / max(im.size)
                copy = im.resize((round(im.width * scale), round(im.height * scale)),
                                 Image.Resampling.BILINEAR)
                if i % 2:
                    copy = ImageOps.mirror(copy)
                rel = f"{src.parent.name}/{src.stem}-{side}.jpg"
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                copy.save(buf, "JPEG", quality=88)
                (dst / rel).write_bytes(buf.getvalue())
                keys.append(rel)
    return sorted(keys)


@pytest.fixture(scope="module")
def fault_corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("fault-corpus")
    return root, make_corpus(root)


@pytest.fixture(scope="module")
def reference(fault_corpus, tmp_path_factory) -> dict:
    """The undisturbed run: ``posebatch run`` of the corpus in one process."""
    root, _keys = fault_corpus
    out = tmp_path_factory.mktemp("fault-reference")
    run_cli("run", str(root), "--out", str(out), "--no-progress", env={
        "POSEBATCH_BATCH_SIZE": str(MODEL_BATCH), "POSEBATCH_INTRA_THREADS": "1"})
    results = {p.relative_to(out).as_posix(): json.loads(p.read_text())
               for p in out.rglob("*.json")}
    return {"results": results, "csv": (out / "_counts.csv").read_bytes()}


# -- the stack --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fault_redis(tmp_path_factory) -> Iterator[RedisServer]:
    """A private Redis with AOF persistence (fsync always), restartable without data loss."""
    with running_redis(tmp_path_factory.mktemp("fault-redis"), appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def fault_stack(fault_redis, s3_server: S3Server, fault_corpus, reference) -> dict:
    """The corpus uploaded once; each test writes to its own output prefix."""
    root, keys = fault_corpus
    bucket = s3_server.make_bucket(f"f-{uuid.uuid4().hex[:12]}")
    uploaded = upload_tree(s3_server.client(), bucket, "in/", root)
    assert uploaded == keys
    return {"bucket": bucket, "keys": keys, "input": f"s3://{bucket}/in/",
            "reference": reference}


class Cluster:
    """Workers, jobs and checks for one test; everything it started is killed at teardown."""

    def __init__(self, stack: dict, s3: S3Server, redis_server: RedisServer, workdir: Path,
                 test_name: str) -> None:
        self.stack, self.s3, self.redis, self.workdir = stack, s3, redis_server, workdir
        self.test_name = test_name
        self.bucket = stack["bucket"]
        self.out = f"out-{test_name.replace('_', '-')[5:25]}-{uuid.uuid4().hex[:6]}/"
        self.workers: list[WorkerProcess] = []
        self.client = s3.client()
        self.visibility_timeout: int | None = VISIBILITY_TIMEOUT
        """None: the defaults of ClusterSettings (what a deployment gets)."""
        self.extra_env: dict[str, str] = {}

    @property
    def env(self) -> dict[str, str]:
        timeout = "" if self.visibility_timeout is None else str(self.visibility_timeout)
        return {**self.s3.env(), "POSEBATCH_BROKER_URL": self.redis.url,
                "POSEBATCH_VISIBILITY_TIMEOUT": timeout,
                "POSEBATCH_BATCH_SIZE": str(MODEL_BATCH), **self.extra_env}

    def start_workers(self, n: int) -> list[WorkerProcess]:
        new = [WorkerProcess(self.workdir, self.env, len(self.workers) + i) for i in range(n)]
        self.workers += new
        start_all(new)
        return new

    def store(self) -> JobStore:
        return JobStore.from_url(self.redis.url)

    def submit(self, *extra: str) -> str:
        proc = run_cli("submit", self.stack["input"], "--out", f"s3://{self.bucket}/{self.out}",
                       "--batch-images", str(BATCH_IMAGES), *extra, env=self.env)
        return proc.stdout.strip().splitlines()[-1]

    def wait(self, job_id: str, timeout: float = JOB_TIMEOUT) -> subprocess.CompletedProcess:
        return run_cli("wait", job_id, "--timeout", str(timeout), "--no-progress",
                       env=self.env, check=False, timeout=timeout + 30)

    def written(self) -> int:
        return len(result_keys(self.client, self.bucket, self.out))

    def mid_batch(self, job_id: str, min_done: int = BATCH_IMAGES) -> bool:
        """A batch is half done: results in S3 that have no record yet, after ``min_done``
        recorded images, and the job is not finished."""
        p = self.store().progress(job_id)
        if p is None or p.state == "done" or p.done < min_done:
            return False
        return self.written() > p.done

    def check(self, fault: str) -> dict[str, int]:
        """Everything equals the undisturbed run; returns (and records) the figures."""
        results = download_results(self.client, self.bucket, self.out)
        csv = self.client.get_object(Bucket=self.bucket,
                                     Key=self.out + "_counts.csv")["Body"].read()
        ref = self.stack["reference"]
        figures = compare_with_reference(results, csv, ref["results"], ref["csv"],
                                         self.stack["keys"])
        figures["rerun_batches"] = rerun_batches(self.redis.client())
        record_figures(fault, figures, f"pytest {THIS}::{self.test_name}")
        assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
        assert without_log_id(results) == without_log_id(ref["results"])
        assert comparable_summary(results["_summary.json"]) == comparable_summary(
            ref["results"]["_summary.json"])
        assert without_versions(csv) == without_versions(ref["csv"])
        return figures

    def close(self) -> None:
        for w in self.workers:
            w.kill()
        if not self.redis.running:
            self.redis.start()
        if not self.s3.running:
            self.s3.start()


@pytest.fixture
def cluster(request, fault_stack, fault_redis, s3_server, tmp_path) -> Iterator[Cluster]:
    fault_redis.client().flushall()
    c = Cluster(fault_stack, s3_server, fault_redis, tmp_path, request.node.name)
    try:
        yield c
    finally:
        c.close()


# -- the faults -------------------------------------------------------------------------------

def test_worker_killed_mid_batch_another_worker_finishes(cluster: Cluster):
    (first,) = cluster.start_workers(1)
    job_id = cluster.submit()
    wait_until(lambda: cluster.mid_batch(job_id), 60, "the worker half way through a batch")
    first.kill()  # SIGKILL, parent and pool child: no chance to requeue anything
    p = cluster.store().progress(job_id)
    assert p is not None and p.state != "done"
    cluster.start_workers(1)
    proc = cluster.wait(job_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert max(cluster.store().batch_starts(job_id)) >= 2  # the killed batch ran again
    cluster.check("worker SIGKILLed mid-batch")


def test_machine_lost_mid_job_with_default_settings_the_job_finishes_within_two_minutes(
        cluster: Cluster):
    """Spot reclaim with the settings a deployment gets (60 s lease): the lost batch returns
    by itself and another worker runs it; `wait` needs no help and no human resubmits."""
    cluster.visibility_timeout = None
    lost, _survivor = cluster.start_workers(2)
    job_id = cluster.submit()
    def holding_a_batch() -> bool:  # after the first record, while it runs a batch
        p = cluster.store().progress(job_id)
        return (p is not None and p.state != "done" and p.done >= 1
                and batches_in_flight(lost) > 0)

    wait_until(holding_a_batch, 90, "the first worker running a batch after the first record")
    lost.kill()  # the whole process group: nothing renews its batch any more
    p = cluster.store().progress(job_id)
    assert p is not None and p.state != "done"
    proc = cluster.wait(job_id, timeout=120)  # exit 4 if not done two minutes after the loss
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # What this test is about: the job finished by itself with nothing lost or counted twice
    # (cluster.check). How many batches ran twice depends on timing: under load the lost
    # worker's batch may still have been in its prefetch, not started (1 delivery). Never a
    # third delivery: the survivor's lease holds.
    assert max(cluster.store().batch_starts(job_id)) <= 2
    cluster.check("machine lost mid-job, default 60 s lease")


LEASE_TIMEOUT = 2  # visibility timeout of the long-batch test; renewed every 0.5 s


def test_batch_running_three_times_the_visibility_timeout_on_a_live_worker_runs_once(
        cluster: Cluster):
    """The lease, not the timeout, decides: one batch much longer than the visibility timeout,
    an idle second worker that would take it if it were handed out again: it runs once."""
    cluster.visibility_timeout = LEASE_TIMEOUT
    cluster.start_workers(2)
    n = len(cluster.stack["keys"])
    job_id = run_cli("submit", cluster.stack["input"], "--out",
                     f"s3://{cluster.bucket}/{cluster.out}", "--batch-images", str(n),
                     "--imgsz", "1280",  # 4x the pixels: long enough on a fast engine too
                     env=cluster.env).stdout.split()[-1]
    proc = cluster.wait(job_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    took = [float(m) for w in cluster.workers
            for m in re.findall(r"process_batch\[[^\]]+\] succeeded in ([0-9.]+)s",
                                worker_log(w))]
    assert len(took) == 1, took
    if took[0] < 3 * LEASE_TIMEOUT:
        pytest.fail(f"the batch took {took[0]:.1f} s, too short to test a lease of "
                    f"{LEASE_TIMEOUT} s: make it longer")
    assert cluster.store().batch_starts(job_id) == {1: 1}  # its only batch, started once
    received = sum(len(re.findall(r"process_batch\[[^\]]+\] received", worker_log(w)))
                   for w in cluster.workers)
    assert received == 1  # never handed to the idle worker, not even to wait in its prefetch
    results = download_results(cluster.client, cluster.bucket, cluster.out)
    assert results["_summary.json"]["images_seen"] == n  # (no reference run at this size)
    assert len(result_keys(cluster.client, cluster.bucket, cluster.out)) == n
    record_figures("batch running 3x the visibility timeout on a live worker",
                   {"images": n, "lost": 0, "duplicated": 0,
                    "rerun_batches": rerun_batches(cluster.redis.client())},
                   f"pytest {THIS}::test_batch_running_three_times_the_visibility_timeout_on_"
                   "a_live_worker_runs_once")


def test_all_workers_killed_then_restarted_later(cluster: Cluster):
    workers = cluster.start_workers(2)
    job_id = cluster.submit()
    wait_until(lambda: cluster.mid_batch(job_id), 60, "a worker half way through a batch")
    for w in workers:
        w.kill()
    p = cluster.store().progress(job_id)
    assert p is not None and p.state != "done" and p.done < p.total
    status = run_cli("status", job_id, env=cluster.env).stdout
    assert f"job {job_id}: running" in status
    cluster.start_workers(2)  # "later": fresh processes, nothing carried over but Redis and S3
    proc = cluster.wait(job_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cluster.check("all workers SIGKILLed, restarted later")


def broker_lost(worker: WorkerProcess) -> bool:
    return "Connection to broker lost" in worker_log(worker)


def state_unreachable(worker: WorkerProcess) -> bool:
    # workers.policy.patiently logs the translated error (posebatch.jobstate.redis_errors)
    return "cannot reach the broker/Redis" in worker_log(worker)


def outage_felt(workers: list[WorkerProcess]) -> bool:
    """Every worker saw the broker go, and every batch still running has hit the outage in its
    own Redis calls (so recording results across a Redis restart is what gets tested; a batch
    that got its records in just before the outage has nothing left to hit)."""
    return all(broker_lost(w) and (batches_in_flight(w) == 0 or state_unreachable(w))
               for w in workers)


def test_redis_killed_mid_job_with_persistence_the_job_finishes(cluster: Cluster):
    workers = cluster.start_workers(2)
    job_id = cluster.submit()
    wait_until(lambda: cluster.mid_batch(job_id), 60, "a worker half way through a batch")
    cluster.redis.kill()  # SIGKILL, a crash; AOF with fsync always: every acknowledged write
    # is on disk (with `appendfsync everysec` only a machine crash could lose the last second)
    wait_until(lambda: outage_felt(workers), 120, "the running batches to hit the outage")
    cluster.redis.start()
    proc = cluster.wait(job_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cluster.check("Redis killed and restarted (AOF persistence)")


def test_redis_restarted_without_persistence_is_detected_and_resubmit_recovers(
        cluster: Cluster, tmp_path):
    volatile = RedisServer(tmp_path / "volatile-redis", require_or_skip("redis-server"))
    cluster.redis = volatile  # workers, submit and wait use this one
    try:
        volatile.start()
        workers = cluster.start_workers(1)  # one worker: queued batches are lost, not all done
        job_id = cluster.submit()
        wait_until(lambda: cluster.mid_batch(job_id), 60, "a worker half way through a batch")
        volatile.stop()  # queue, job state and records are gone with it
        wait_until(lambda: outage_felt(workers), 60, "the running batches to hit the outage")
        volatile.start()
        done_before = set(result_keys(cluster.client, cluster.bucket, cluster.out))
        assert 0 < len(done_before) < len(cluster.stack["keys"])
        # Detected: `wait` and `status` say the job's state is gone and how to recover.
        for proc in (cluster.wait(job_id, timeout=30),
                     run_cli("status", job_id, env=cluster.env, check=False)):
            assert proc.returncode == 3, proc.stdout + proc.stderr
            assert "state is gone from Redis" in proc.stderr
            assert "posebatch submit" in proc.stderr and "skipped" in proc.stderr
        # The worker's running batch finds its job gone and does not recreate it (a job hash
        # with records but no parameters would look "submitting" forever).
        wait_until(lambda: batches_in_flight(workers[0]) == 0, 60, "the running batch to end")
        assert not cluster.store().exists(job_id)
        # Recovery as told: the same submit again.
        before = download_results(cluster.client, cluster.bucket, cluster.out)
        assert "_summary.json" not in before
        job2 = cluster.submit()
        proc = cluster.wait(job2)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        after = download_results(cluster.client, cluster.bucket, cluster.out)
        kept = {k[: -len(".json")] for k in before if not k.startswith("_")
                and after[k] == before[k]}
        assert kept == done_before  # done images were skipped (same log_id), the rest was run
        cluster.check("Redis restarted without persistence; resubmitted")
    finally:
        for w in cluster.workers:
            w.kill()
        volatile.kill()


def test_s3_unreachable_for_seconds_mid_job(cluster: Cluster):
    workers = cluster.start_workers(2)
    job_id = cluster.submit()
    wait_until(lambda: cluster.mid_batch(job_id), 60, "a worker half way through a batch")
    cluster.s3.kill()  # connection refused for every request until it is back
    wait_until(lambda: any("retry: Retry in" in worker_log(w) for w in workers), 60,
               "a worker to see S3 requests fail and schedule a retry")
    cluster.s3.start()
    proc = cluster.wait(job_id)
    if proc.returncode == 1:
        # The outage outlasted the retry budget (a slow SeaweedFS restart): the batches that
        # ran out of attempts are recorded as failed, saying why, and have no result file;
        # the documented recovery is to submit again.
        summary, rows = failed_rows(cluster)
        failed = [row for row in rows if row["status"] == "error"]
        assert failed and summary["failed_by_code"] == {"282000": len(failed)}
        assert all("attempts: S3 " in row["error_msg"] for row in failed)
        proc = cluster.wait(cluster.submit())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cluster.check("S3 server unreachable for seconds")


def test_batch_lost_between_queue_and_worker_is_queued_again_and_wait_ends(cluster: Cluster):
    """kombu's gap: a message popped off the queue by a machine that died before kombu copied
    it into ``unacked`` exists nowhere. The job state still has the batch outstanding; `wait`
    sees the job stop moving, finds the batch neither queued nor held, and queues it again."""
    cluster.extra_env = {"POSEBATCH_REQUEUE_AFTER": "5"}
    job_id = cluster.submit()
    r = cluster.redis.client()
    batches = -(-len(cluster.stack["keys"]) // BATCH_IMAGES)
    assert r.llen("posebatch") == batches
    gone = json.loads(r.rpop("posebatch"))["headers"]["id"]  # the next one a worker would take
    cluster.start_workers(1)
    proc = cluster.wait(job_id, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "queued them again" in proc.stderr and gone.split(".")[-1] in proc.stderr
    assert cluster.store().batch_starts(job_id) == {1: batches}  # each batch started once
    assert r.hlen(f"posebatch:job:{job_id}:batches") == 0  # nothing outstanding
    cluster.check("batch message lost between queue and worker (kombu's gap)")


OUTAGE_SECONDS = 25  # longer than the 1+2+4+8 s of retries that used to fail every image


def test_s3_outage_of_half_a_minute_is_waited_out_and_fails_no_image(cluster: Cluster):
    """Issue 11 row 8: the batches wait out the outage (bounded by POSEBATCH_STORAGE_PATIENCE,
    600 s) with backoff, and `status` says why the job is not moving."""
    cluster.start_workers(2)
    job_id = cluster.submit()
    wait_until(lambda: cluster.mid_batch(job_id), 60, "a worker half way through a batch")
    cluster.s3.kill()
    down_at = time.monotonic()

    def says_waiting() -> bool:
        out = run_cli("status", job_id, env=cluster.env).stdout
        return "waiting: storage unreachable" in out

    wait_until(says_waiting, 60, "status to say the job waits out a storage outage")
    time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))  # the fault's length
    cluster.s3.start()
    proc = cluster.wait(job_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # 0: no image failed
    assert "waiting" not in run_cli("status", job_id, env=cluster.env).stdout
    cluster.check("S3 server down for half a minute mid-job")


# -- the producer -----------------------------------------------------------------------------

LISTING_IMAGES = 400  # a "large listing": 200 batches of 2, enqueued in a fraction of a second
LISTING_BATCH = 2
LISTING_IMGSZ = "64"  # tiny images, tiny model input: the test is about bookkeeping, not pixels


def make_listing(dst: Path) -> list[str]:
    """Small generated images (a few below the 15 px minimum, so some results are errors)."""
    import numpy as np

    rng = np.random.default_rng(7)
    keys = []
    for i in range(LISTING_IMAGES):
        w, h = int(rng.integers(12, 120)), int(rng.integers(12, 120))
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        rel = f"drop/{i % 7}/img-{i:04d}.jpg"
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(dst / rel, "JPEG", quality=80)
        keys.append(rel)
    return sorted(keys)


def kill_producer_mid_submission(cmd: list[str], env: dict[str, str],
                                 r) -> tuple[str | None, int]:
    """Run the producer; SIGKILL it as soon as 10 batches are queued. Return the job id and the
    batches queued, or (None, n) when it finished before the kill landed."""
    producer = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while r.llen("posebatch") < 10 and producer.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError("the producer enqueued nothing in 60 s")
            time.sleep(0.001)
        producer.send_signal(signal.SIGKILL)
        producer.wait(10)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait(10)
    (job_id,) = [j.decode() for j in r.zrange("posebatch:jobs", 0, -1)]
    finished = r.hget(f"posebatch:job:{job_id}", "submitted") == b"1"
    return (None if finished else job_id), r.llen("posebatch")


def test_producer_killed_mid_submission_then_rerun(cluster: Cluster, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    src = tmp_path / "listing"
    keys = make_listing(src)
    client, bucket = cluster.client, cluster.bucket
    prefix = f"listing-{uuid.uuid4().hex[:6]}/"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=prefix + k,
                                                  Body=(src / k).read_bytes()), keys))
    ref_out = tmp_path / "reference"
    run_cli("run", str(src), "--out", str(ref_out), "--no-progress", "--imgsz", LISTING_IMGSZ,
            env={"POSEBATCH_BATCH_SIZE": str(MODEL_BATCH)})
    reference = {p.relative_to(ref_out).as_posix(): json.loads(p.read_text())
                 for p in ref_out.rglob("*.json")}
    submit_args = ["submit", f"s3://{bucket}/{prefix}", "--out", f"s3://{bucket}/{cluster.out}",
                   "--batch-images", str(LISTING_BATCH), "--imgsz", LISTING_IMGSZ]
    total_batches = LISTING_IMAGES // LISTING_BATCH
    r = cluster.redis.client()

    # No worker yet: the producer is the only thing running. Kill it once some batches are out.
    # Enqueuing takes ~0.7 ms a batch, so the window is a fraction of a second: watch it from a
    # tight loop, and if a busy machine lets the producer finish first, start over (bounded).
    for _attempt in range(4):
        r.flushall()
        job1, enqueued = kill_producer_mid_submission([*CLI, *submit_args], cluster.env, r)
        if job1 is not None:
            break
    else:
        pytest.fail("the producer finished every time before it could be killed")
    p1 = cluster.store().progress(job1)
    assert p1 is not None and not p1.submitted and p1.state == "submitting"
    assert 0 < enqueued < total_batches
    status = run_cli("status", job1, env=cluster.env).stdout
    assert "the producer stopped before the end: resubmit" in status

    # Recovery as told: the same command again, then workers.
    job2 = run_cli(*submit_args, env=cluster.env).stdout.strip().splitlines()[-1]
    assert r.llen("posebatch") == enqueued + total_batches
    cluster.start_workers(2)
    proc = cluster.wait(job2)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr  # 1: the tiny images failed
    results = download_results(client, bucket, cluster.out)
    csv = client.get_object(Bucket=bucket, Key=cluster.out + "_counts.csv")["Body"].read()
    figures = compare_with_reference(results, csv, reference, (ref_out / "_counts.csv")
                                     .read_bytes(), keys)
    figures["rerun_batches"] = rerun_batches(r)
    record_figures("producer SIGKILLed mid-submission; re-run", figures,
                   f"pytest {THIS}::test_producer_killed_mid_submission_then_rerun")
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert without_log_id(results) == without_log_id(reference)
    assert comparable_summary(results["_summary.json"]) == comparable_summary(
        reference["_summary.json"])
    assert without_versions(csv) == without_versions((ref_out / "_counts.csv").read_bytes())
    assert results["_summary.json"]["job_id"] == job2
    # The orphaned batches of the first job ran too (or found their results): nothing waits.
    wait_until(lambda: r.llen("posebatch") == 0, 60, "the queue to drain")


# -- batches that keep failing ----------------------------------------------------------------

def failed_rows(cluster: Cluster) -> tuple[dict, list[dict[str, str]]]:
    results = download_results(cluster.client, cluster.bucket, cluster.out)
    csv = cluster.client.get_object(Bucket=cluster.bucket,
                                    Key=cluster.out + "_counts.csv")["Body"].read()
    from posebatch.testing.cluster import read_counts_csv

    return results["_summary.json"], read_counts_csv(csv)


def subset(cluster: Cluster, folder: str) -> list[str]:
    return [k for k in cluster.stack["keys"] if k.startswith(folder)]


def test_batch_failing_on_every_attempt_stops_and_records_its_images_as_failed(
        cluster: Cluster, s3_server: S3Server):
    """The workers may read but not write (S3 answers 403 to every upload): the batch is
    retried MAX_RETRIES times with backoff, then each image is recorded as failed, with why."""
    from workers.policy import MAX_RETRIES

    folder = "mhp/"
    keys = [k[len(folder):] for k in subset(cluster, folder)]  # relative to the job's input
    admin = cluster.env
    worker = WorkerProcess(cluster.workdir, {**admin, **s3_server.readonly_env()}, 0)
    cluster.workers.append(worker)
    worker.start()
    job_id = run_cli("submit", f"{cluster.stack['input']}{folder}", "--out",
                     f"s3://{cluster.bucket}/{cluster.out}", env=admin).stdout.split()[-1]
    proc = cluster.wait(job_id, timeout=90)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # finished, with failed images
    # MAX_RETRIES + 1 attempts; one more start when the last countdown (8 s) outlives the
    # test's 6 s visibility timeout and Redis hands the held retry out again (harmless).
    assert cluster.store().batch_starts(job_id) in ({MAX_RETRIES + 1: 1}, {MAX_RETRIES + 2: 1})
    # The worker cannot write the summary (that is the fault); `posebatch wait` wrote it.
    summary, rows = failed_rows(cluster)
    assert summary["images_seen"] == len(keys) and summary["failed"] == len(keys)
    assert summary["failed_by_code"] == {"282000": len(keys)}
    assert sorted(r["key"] for r in rows) == keys
    assert all("AccessDenied" in r["error_msg"] for r in rows)
    # The records are in the count table now (Redis dropped them at the job end).
    assert list(cluster.store().records(job_id)) == []
    for r in rows:
        assert r["status"] == "error" and r["error_code"] == "282000"
        assert f"failed after {MAX_RETRIES + 1} attempts" in r["error_msg"]
        assert "AccessDenied" in r["error_msg"] and "HTTP 403" in r["error_msg"]
        assert s3_server.readonly_secret not in r["error_msg"]
    assert "images recorded as failed" in worker_log(worker)
    record_figures("batch failing on every attempt (S3 refuses writes)",
                   {"images": len(keys), "lost": len(keys) - len(rows), "duplicated": 0,
                    "rerun_batches": rerun_batches(cluster.redis.client())},
                   f"pytest {THIS}::test_batch_failing_on_every_attempt_stops_and_records_"
                   "its_images_as_failed")


def test_batch_whose_worker_keeps_dying_is_abandoned_with_a_reason(cluster: Cluster):
    """A batch that killed its worker MAX_DELIVERIES times (say, an image that crashes the
    decoder) is not started again: its images are recorded as failed and the job completes.
    The earlier deaths are the delivery counter in Redis, set here as they would have left it."""
    from workers.policy import MAX_DELIVERIES

    folder = "jhmdb/"
    keys = [k[len(folder):] for k in subset(cluster, folder)]
    job_id = f"poison-{uuid.uuid4().hex[:8]}"
    r = cluster.store().r
    r.hset(f"posebatch:job:{job_id}:deliveries", "00000000", MAX_DELIVERIES)
    run_cli("submit", f"{cluster.stack['input']}{folder}", "--out",
            f"s3://{cluster.bucket}/{cluster.out}", "--job-id", job_id, env=cluster.env)
    cluster.start_workers(1)
    proc = cluster.wait(job_id, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary, rows = failed_rows(cluster)
    assert summary["failed_by_code"] == {"282000": len(keys)} and summary["succeeded"] == 0
    assert sorted(row["key"] for row in rows) == keys
    assert all(f"abandoned after {MAX_DELIVERIES} attempts" in row["error_msg"] for row in rows)
    assert result_keys(cluster.client, cluster.bucket, cluster.out) == []  # never started
    record_figures("batch whose worker dies on every attempt",
                   {"images": len(keys), "lost": len(keys) - len(rows),
                    "duplicated": len(rows) - len({row["key"] for row in rows}),
                    "rerun_batches": rerun_batches(cluster.redis.client())},
                   f"pytest {THIS}::test_batch_whose_worker_keeps_dying_is_abandoned_with_a_"
                   "reason")


# -- the table in docs/reliability.md ---------------------------------------------------------

def test_reliability_doc_has_a_zero_row_for_every_fault_test():
    """Each fault test above has its row in docs/reliability.md, every row says 0 lost and 0
    counted twice, and every command in the table names a test that exists."""
    import inspect
    import sys

    root = Path(__file__).resolve().parent.parent
    rows = [line for line in (root / "docs" / "reliability.md").read_text().splitlines()
            if line.startswith("| ") and "`pytest tests/" in line]
    named = set()
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert (cells[2], cells[3]) == ("0", "0"), row
        path, name = cells[-1].strip("`").split()[1].split("::")
        module = __import__(path[:-3].replace("/", "."), fromlist=["_"])
        assert callable(getattr(module, name, None)), f"{row}: no test {name} in {path}"
        named.add(name)
    here = sys.modules[__name__]
    faults = {n for n, f in inspect.getmembers(here, inspect.isfunction)
              if n.startswith("test_") and n != "test_reliability_doc_has_a_zero_row_for_"
              "every_fault_test"}
    assert faults <= named, f"fault tests without a row: {sorted(faults - named)}"


def test_a_worker_with_another_model_hands_batches_back_and_fails_none(cluster: Cluster,
                                                                        tmp_path: Path):
    """Issue 21 row 7: a worker started with another --model used to fail each batch it took
    at once ("run one model per cluster"), so it took most of them (56 of 60 images 282000)
    while the right worker sat idle. Now it hands them back untouched, without counting a
    delivery, and the job's results are the right model's."""
    import onnx

    from posebatch.modelstore import resolve_model
    from posebatch.settings import RuntimeSettings, from_env

    (right,) = cluster.start_workers(1)
    job_id = cluster.submit()
    wait_until(lambda: (p := cluster.store().progress(job_id)) is not None and p.done >= 1, 90,
               "the first record (the job's model is then the right worker's)")
    os.killpg(right.proc.pid, signal.SIGSTOP)  # only the other worker can take batches now
    try:
        other = onnx.load(str(resolve_model(None, from_env(RuntimeSettings).cache_dir).path))
        other.doc_string = "same network, another file: another sha256"
        onnx.save(other, str(tmp_path / "other.onnx"))
        cluster.extra_env = {"POSEBATCH_MODEL": str(tmp_path / "other.onnx")}
        (wrong,) = cluster.start_workers(1)
        wait_until(lambda: "handed back" in worker_log(wrong), 90,
                   "the other model's worker handing a batch back")
    finally:
        os.killpg(right.proc.pid, signal.SIGCONT)
    proc = cluster.wait(job_id)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # exit 1 if any image failed
    cluster.check("a worker with another model joined")


def test_the_output_bucket_deleted_mid_job_is_exit_3_with_the_reason(cluster: Cluster):
    """Issue 21 row 8: images failed with a clear message, but `wait` exited 4 "NoSuchBucket
    (transient; try again)" and `status` said running. A gone bucket is not transient."""
    bucket = cluster.s3.make_bucket(f"gone-{uuid.uuid4().hex[:10]}")
    cluster.start_workers(1)
    proc = run_cli("submit", cluster.stack["input"], "--out", f"s3://{bucket}/res/",
                   "--batch-images", str(BATCH_IMAGES), env=cluster.env)
    job_id = proc.stdout.strip().splitlines()[-1]
    wait_until(lambda: (p := cluster.store().progress(job_id)) is not None and p.done >= 1, 90,
               "the first record")
    for page in cluster.client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            cluster.client.delete_object(Bucket=bucket, Key=obj["Key"])
    cluster.client.delete_bucket(Bucket=bucket)
    proc = cluster.wait(job_id, timeout=180)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"bucket {bucket} does not exist" in proc.stderr, proc.stderr
    assert "transient" not in proc.stderr
    status = run_cli("status", job_id, env=cluster.env, check=False)
    assert status.returncode == 3, status.stdout + status.stderr
    assert f"bucket {bucket} does not exist" in status.stdout + status.stderr


def test_redis_full_mid_job_workers_wait_commands_say_so_and_nothing_is_lost(
        s3_server: S3Server, tmp_path: Path):
    """Issue 21 row 5: at maxmemory with noeviction the worker used to exit ("Unrecoverable
    error: OutOfMemoryError"), and status, wait and submit exited 70 with a traceback. Now the
    worker waits and reconnects, the commands exit 0 or 4 saying Redis is full, and once Redis
    takes writes again the job finishes with every image."""
    from tests.images import jpeg

    src = tmp_path / "src"
    src.mkdir()
    for i in range(120):
        (src / f"{i:03d}.jpg").write_bytes(jpeg(320, 240))
    bucket = s3_server.make_bucket(f"full-{uuid.uuid4().hex[:10]}")
    upload_tree(s3_server.client(), bucket, "in/", src)
    with running_redis(tmp_path / "redis", maxmemory="256mb") as redis_server:
        env = {**s3_server.env(), "POSEBATCH_BROKER_URL": redis_server.url,
               "POSEBATCH_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
               "POSEBATCH_BATCH_SIZE": str(MODEL_BATCH), "POSEBATCH_STATE_PATIENCE": "3"}
        worker = WorkerProcess(tmp_path / "w", env)
        worker.start()
        try:
            job_id = run_cli("submit", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out/",
                             "--batch-images", "4", env=env).stdout.split()[-1]
            store = JobStore.from_url(redis_server.url)
            wait_until(lambda: (p := store.progress(job_id)) is not None and p.done >= 8, 90,
                       "the first batches")
            redis_server.client().config_set("maxmemory", "1")  # full: every write refused
            # Past the state patience (3 s): batches go back to the queue, and requeues, acks
            # and lease renewals meet the full Redis too.
            time.sleep(VISIBILITY_TIMEOUT + 6)
            status = run_cli("status", job_id, env=env, check=False)
            assert status.returncode == 0, status.stderr
            assert "Redis is full" in status.stdout and "maxmemory" in status.stdout
            waited = run_cli("wait", job_id, "--timeout", "2", "--no-progress", env=env,
                             check=False)
            assert waited.returncode == 4 and "Redis is full" in waited.stderr, waited.stderr
            again = run_cli("submit", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/o2/",
                            env=env, check=False)
            assert again.returncode == 4, again.stdout + again.stderr
            assert "full" in again.stderr and "Traceback" not in again.stderr, again.stderr
            assert worker.proc.poll() is None, worker_log(worker)[-3000:]  # still running
            redis_server.client().config_set("maxmemory", "256mb")
            done = run_cli("wait", job_id, "--timeout", "180", "--no-progress", env=env,
                           check=False, timeout=240)
            assert done.returncode == 0, done.stdout + done.stderr
            assert "Unrecoverable error" not in worker_log(worker)
        finally:
            worker.stop()
    results = result_keys(s3_server.client(), bucket, "out/")
    assert len(results) == 120
