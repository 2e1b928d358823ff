"""Drop folder with S3 events: an image's latency from upload to result, and what a poll costs.

(a) Latency with ``posebatch watch --events`` (issue 22): redis-server, moto's server (S3 that
sends its bucket notifications into its SQS; ``posebatch.testing.servers.EventsServer``), one
real ``posebatch worker`` (the default model) and the real watcher (CLI, long-polling). Each of
``--uploads`` images is put with boto3 ``--gap`` seconds after the previous result appeared;
timed: upload -> job id printed by the watcher (intake: the event window plus the submit), and
upload -> ``<key>.json`` present in OUTPUT (HEAD every 50 ms).

(b) What one poll of today's watcher costs with ``--old`` objects already in the folder and
nothing new: SeaweedFS (``weed server -s3``), the objects put once, then the real
``producer.watch.poll_once`` twice (the second is the steady state: every object is older than
the previous poll, so Redis is not asked, only the listing runs); LIST requests = pages of 1000.
Extrapolated linearly to 1M and 10M old objects. With events the folder is never listed
between reconciliations: no LIST per new image, one ReceiveMessage per <= 10 events.

    .venv/bin/python bench/events_latency.py --uploads 6 --old 20000 --json bench/results/x.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def jpeg(width: int, height: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def latency(uploads: int, gap: float, window: float, workdir: Path) -> dict:
    from posebatch.testing.cluster import CLI, WorkerProcess
    from posebatch.testing.servers import running_events_server, running_redis

    with running_redis(workdir / "redis") as redis_server, \
            running_events_server(workdir / "moto") as server:
        env = {**server.env(), "POSEBATCH_BROKER_URL": redis_server.url}
        name = f"lat-{uuid.uuid4().hex[:8]}"
        url, arn = server.make_queue(name)
        server.make_bucket(name, arn)
        s3 = server.client()
        worker = WorkerProcess(workdir / "worker", env)
        worker.start()
        errors = (workdir / "watch.err").open("w")  # noqa: SIM115 - closed with the watcher
        watcher = subprocess.Popen(
            [*CLI, "watch", f"s3://{name}/drop/", "--out", f"s3://{name}/out/", "--events", url,
             "--event-window", str(window), "--reconcile-every", "0"],
            stdout=subprocess.PIPE, stderr=errors, text=True,
            env={**os.environ, **env}, start_new_session=True)
        jobs: list[float] = []

        def read_jobs() -> None:
            for line in watcher.stdout:
                if line.strip():
                    jobs.append(time.time())

        threading.Thread(target=read_jobs, daemon=True).start()
        rows = []
        try:
            time.sleep(2)  # the watcher is long-polling
            for i in range(-1, uploads):  # -1: warm-up (the worker's first batch loads lazily)
                key = f"drop/cam/{i + 1:04d}.jpg"
                seen = len(jobs)
                t0 = time.time()
                s3.put_object(Bucket=name, Key=key, Body=jpeg(1280, 720, i + 1))
                while True:
                    try:
                        s3.head_object(Bucket=name, Key=f"out/cam/{i + 1:04d}.jpg.json")
                        break
                    except s3.exceptions.ClientError:
                        if time.time() - t0 > 120:
                            raise TimeoutError(f"no result for {key} after 120 s") from None
                        time.sleep(0.05)
                done = time.time()
                if i >= 0:
                    rows.append({"key": key, "to_job_s": round(jobs[seen] - t0, 3)
                                 if len(jobs) > seen else None,
                                 "to_result_s": round(done - t0, 3)})
                time.sleep(gap)
        finally:
            watcher.terminate()
            watcher.wait(20)
            errors.close()
            worker.stop()
    res = [r["to_result_s"] for r in rows]
    intake = [r["to_job_s"] for r in rows if r["to_job_s"] is not None]
    return {"uploads": rows, "window_s": window, "median_to_result_s": statistics.median(res),
            "max_to_result_s": max(res), "median_to_job_s": statistics.median(intake)}


def poll_cost(old: int, workdir: Path) -> dict:
    from posebatch.settings import JobSettings
    from posebatch.testing.servers import running_redis, running_s3
    from producer.watch import poll_once

    with running_redis(workdir / "redis2") as redis_server, running_s3(workdir / "weed") as s3:
        os.environ.update(s3.env())
        bucket = s3.make_bucket(f"poll-{uuid.uuid4().hex[:8]}")
        client = s3.client(max_pool_connections=16)
        t = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: client.put_object(
                Bucket=bucket, Key=f"drop/cam{i % 17:02d}/IMG_{i:08d}.jpg", Body=b"x"),
                range(old)))
        put_s = time.perf_counter() - t
        args = {"job": JobSettings(), "broker_url": redis_server.url, "settle": 0.001}
        src, dst = f"s3://{bucket}/drop/", f"s3://{bucket}/out/"
        t = time.perf_counter()
        first = poll_once(src, dst, **args)  # a new watcher: submits the whole backlog once
        first_s = time.perf_counter() - t
        time.sleep(0.1)
        t = time.perf_counter()
        second = poll_once(src, dst, **args)
        steady_s = time.perf_counter() - t
    lists = math.ceil(old / 1000)
    return {"old_objects": old, "put_s": round(put_s, 1), "first_poll_s": round(first_s, 2),
            "first_poll_jobs": len(first), "steady_poll_s": round(steady_s, 3),
            "steady_poll_jobs": len(second), "lists_per_poll": lists,
            "per_1000_keys_s": round(steady_s / old * 1000, 4),
            "extrapolated_1m": {"lists": 1000, "seconds": round(steady_s / old * 1e6, 1)},
            "extrapolated_10m": {"lists": 10000, "seconds": round(steady_s / old * 1e7, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uploads", type=int, default=6)
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between uploads")
    ap.add_argument("--window", type=float, default=2.0, help="the watcher's --event-window")
    ap.add_argument("--old", type=int, default=20000, help="old objects for the poll (0: skip)")
    ap.add_argument("--json", help="write the figures here too")
    ns = ap.parse_args()
    os.environ.setdefault("POSEBATCH_QUEUE_HIGH_WATER", "0")  # no workers for the poll part
    with tempfile.TemporaryDirectory(prefix="posebatch-events-") as tmp:
        out = {"host": cpu_model(), "cores": os.cpu_count(),
               "load_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                     time.gmtime())}
        out["latency"] = latency(ns.uploads, ns.gap, ns.window, Path(tmp))
        if ns.old:
            out["poll"] = poll_cost(ns.old, Path(tmp))
        out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    if ns.json:
        Path(ns.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
