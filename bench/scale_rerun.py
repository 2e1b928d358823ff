"""Reruns, Redis and the job end at scale, on loopback servers (issue 22).

A real SeaweedFS S3 server and redis-server (``posebatch.testing.servers``); N small objects
uploaded under camera-roll keys (17 top-level prefixes); no model: each batch is "processed" the
way a worker records it (``JobStore.add_records`` with the batch id, its message taken off the
queue), then ``maybe_finalize`` writes the tables to the S3 output, as the last worker would.

Measured: the listing of N objects by 1 and by 8 paginators; the first `submit` (listing +
enqueue); then R nightly reruns, each after uploading 0.5 % new images: the rerun's `submit`
(time, S3 requests by operation counted on its own clients, keys queued, Redis peak sampled at
20 Hz), its job end (finalize with N earlier rows: time, lock renewals), and Redis
``used_memory`` after each (should stay flat). Last, a job end with ``--earlier`` stubbed rows
(a synthetic root table) in a child process: time, renewals, peak RSS.

    .venv/bin/python bench/scale_rerun.py --objects 100000 --reruns 30 \\
        --json bench/results/scale-rerun-100k.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import emit  # noqa: E402  (bench/ is the script's folder)

from bench.scale_redis import cpu_model, key_name  # noqa: E402

JOB_END = """
import csv, json, sys, time
from posebatch.jobend import maybe_finalize
from posebatch.jobstate import JobStore
from posebatch.records import Record
url, out, earlier, mine = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open(out + "/_counts.csv", "w", encoding="utf-8", newline="") as f:
    f.write("\\ufeff")
    w = csv.writer(f, lineterminator="\\r\\n")
    w.writerow(["key", "status", "error_code", "person_num", "valid_persons", "error_msg",
                "width", "height", "etag", "bytes"])
    for i in range(earlier):
        w.writerow([f"old/{i:09d}.jpg", "ok", "", 1, 1, "", 640, 480, f"{i:032x}", 1000])
with open(out + "/_summary.json", "w", encoding="utf-8") as f:  # its base's size (roottables)
    json.dump({"job_id": "earlier", "images_seen": earlier, "succeeded": earlier}, f)
store = JobStore.from_url(url)
store.r.flushall()
store.create("end", {"input": None, "output": out, "settings": {}})
store.mark_submitted("end", mine, 1)
store.add_records("end", [Record(f"new/{i:09d}.jpg", True, None, 1, 1, width=64, height=48)
                          for i in range(mine)])
t = time.perf_counter()
assert maybe_finalize(store, "end")
print(json.dumps({"seconds": time.perf_counter() - t,
                  "renewals": store.last_lock.renewals}))
"""


class Peak:
    """Redis used_memory sampled at 20 Hz while a step runs (INFO's peak cannot be reset)."""

    def __init__(self, r) -> None:
        self.r, self.peak, self._stop = r, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, int(self.r.info("memory")["used_memory"]))
            self._stop.wait(0.05)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def upload(client, bucket: str, keys: list[str]) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=f"in/{k}",
                                                  Body=k.encode()), keys))
    return time.perf_counter() - t


def play_workers(store, r, job_id: str) -> None:
    """Record every queued batch the way a worker does, and take its message off the queue."""
    from posebatch.queue import QUEUE
    from posebatch.records import Record

    for batch_id, raw in sorted(r.hgetall(f"posebatch:job:{job_id}:batches").items()):
        keys = json.loads(raw)
        store.add_records(job_id, [Record(k, True, None, i % 4, i % 3, width=64, height=48)
                                   for i, k in enumerate(keys)], batch_id.decode())
        r.rpop(QUEUE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=100_000)
    ap.add_argument("--reruns", type=int, default=30)
    ap.add_argument("--new-fraction", type=float, default=0.005)
    ap.add_argument("--earlier", type=int, default=1_000_000,
                    help="stubbed earlier rows for the last job end")
    ap.add_argument("--json")
    ns = ap.parse_args()
    os.environ["POSEBATCH_QUEUE_HIGH_WATER"] = "0"  # no workers: measure an unthrottled queue

    import posebatch.s3storage as s3storage
    from posebatch.jobend import maybe_finalize
    from posebatch.jobstate import JobStore
    from posebatch.s3storage import S3Storage
    from posebatch.settings import JobSettings
    from posebatch.testing.servers import running_redis, running_s3
    from producer.submit import submit

    work = Path(tempfile.mkdtemp(prefix="pb-scale-rerun-"))
    figures: dict = {"objects": ns.objects, "reruns": [], "host": {
        "cpu": cpu_model(), "cores": os.cpu_count(), "load_before": os.getloadavg()}}
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(running_redis(work / "redis"))
        s3 = stack.enter_context(running_s3(work / "weed"))
        os.environ.update(s3.env())
        bucket = s3.make_bucket("scale")
        client = s3.client()
        r = redis_server.client()
        store = JobStore(r)
        keys = [key_name(i) for i in range(ns.objects)]
        figures["upload_seconds"] = round(upload(client, bucket, keys), 1)
        src = S3Storage(bucket, "in")
        for paginators in (1, 8):
            t = time.perf_counter()
            n = sum(1 for _ in src.iter_objects(parallel=paginators))
            figures[f"list_{paginators}_paginators_seconds"] = round(time.perf_counter() - t, 2)
            assert n == ns.objects, n

        calls: Counter[str] = Counter()
        real_client = s3storage.make_s3_client

        def counting_client(**kwargs):
            c = real_client(**kwargs)
            c.meta.events.register("before-call.s3.*", lambda model, **_: calls.update(
                [model.name]))
            return c

        s3storage.make_s3_client = counting_client
        in_url, out_url = f"s3://{bucket}/in/", f"s3://{bucket}/out/"
        empty = int(r.info("memory")["used_memory"])
        with Peak(r) as peak:
            t = time.perf_counter()
            job = submit(in_url, out_url, job=JobSettings(), broker_url=redis_server.url)
            figures["first_submit_seconds"] = round(time.perf_counter() - t, 1)
            figures["first_submit_requests"] = dict(calls)
            play_workers(store, r, job)
            t = time.perf_counter()
            assert maybe_finalize(store, job)
            figures["first_job_end_seconds"] = round(time.perf_counter() - t, 1)
        figures["first_job_redis_peak_bytes"] = peak.peak - empty
        total = ns.objects
        for night in range(ns.reruns):
            new = [f"new/{night:02d}/IMG_{i:06d}.jpg"
                   for i in range(max(1, int(ns.objects * ns.new_fraction)))]
            upload(client, bucket, new)
            total += len(new)
            calls.clear()
            with Peak(r) as peak:
                t = time.perf_counter()
                job = submit(in_url, out_url, job=JobSettings(), broker_url=redis_server.url)
                submit_s = time.perf_counter() - t
                requests = dict(calls)
                p = store.progress(job)
                play_workers(store, r, job)
                t = time.perf_counter()
                assert maybe_finalize(store, job)
                end_s = time.perf_counter() - t
            figures["reruns"].append({
                "listed": total, "queued": p.total, "submit_seconds": round(submit_s, 2),
                "submit_requests": requests, "job_end_seconds": round(end_s, 2),
                "job_end_lock_renewals": store.last_lock.renewals,
                "redis_peak_bytes": peak.peak - empty,
                "redis_used_after_bytes": int(r.info("memory")["used_memory"]) - empty,
                "redis_keys_after": r.dbsize()})
            print(json.dumps(figures["reruns"][-1]), flush=True)

        out = work / "end-out"
        out.mkdir()
        proc = subprocess.run([sys.executable, "-c", JOB_END, redis_server.url, str(out),
                               str(ns.earlier), "5000"], check=True, capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        end = json.loads(proc.stdout)
        figures["job_end_stubbed"] = {
            "earlier_rows": ns.earlier, "new_rows": 5000, "seconds": round(end["seconds"], 1),
            "lock_renewals": end["renewals"],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}
    figures["host"]["load_after"] = os.getloadavg()
    figures["command"] = (f"python bench/scale_rerun.py --objects {ns.objects} --reruns "
                          f"{ns.reruns} --earlier {ns.earlier}")
    emit(figures, ns.json)


if __name__ == "__main__":
    main()
