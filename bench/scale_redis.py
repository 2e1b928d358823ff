"""What a job of N images costs Redis and the finalizer, without a model (issue 10).

A real redis-server (no persistence) on a free port; ``producer.submit.submit`` with a generated
key list (the listing stubbed: key names like a camera roll, ~30 bytes); then every batch is
"processed" the way a worker records it (``JobStore.add_records`` with the batch id, one call per
batch) and its message taken off the queue; then ``maybe_finalize`` writes the aggregates to a
local folder in a child process whose peak RSS is read from ``getrusage(RUSAGE_CHILDREN)``.

Recorded: Redis ``used_memory`` after the submit (queue + outstanding batches), after all records
(records hash + failed set, queue empty), after finalize (keys expiring), and its peak; submit
seconds; records seconds; finalize seconds and peak RSS. Per-image figures divide by N.

    .venv/bin/python bench/scale_redis.py --images 1000000 --json bench/results/scale-1m.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import emit  # noqa: E402  (bench/ is the script's folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def key_name(i: int) -> str:
    return f"cam{i % 17:02d}/2026/{i // 100000 % 12 + 1:02d}/IMG_{i:08d}.jpg"


def mem(r) -> dict[str, int]:
    info = r.info("memory")
    return {"used": int(info["used_memory"]), "peak": int(info["used_memory_peak"])}


FINALIZE = """
import json, resource, sys, time
from posebatch.jobend import maybe_finalize
from posebatch.jobstate import JobStore
store = JobStore.from_url(sys.argv[1])
t = time.perf_counter()
assert maybe_finalize(store, sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1_000_000)
    ap.add_argument("--batch-images", type=int, default=32)
    ap.add_argument("--json", help="write the figures here too")
    ns = ap.parse_args()
    # No workers here: measure what an unthrottled queue of N images costs (submit's
    # back-pressure would otherwise stop at POSEBATCH_QUEUE_HIGH_WATER batches).
    os.environ["POSEBATCH_QUEUE_HIGH_WATER"] = "0"

    from posebatch.jobstate import JobStore
    from posebatch.queue import QUEUE
    from posebatch.records import Record
    from posebatch.settings import JobSettings
    from producer.submit import submit

    work = Path(tempfile.mkdtemp(prefix="pb-scale-"))
    port = free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", str(work)],
                              stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        r = redis.Redis.from_url(url)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        empty = mem(r)
        out = work / "out"
        n = ns.images
        t = time.perf_counter()
        job_id = submit(str(work / "in"), str(out), job=JobSettings(), broker_url=url,
                        batch_images=ns.batch_images, keys=(key_name(i) for i in range(n)),
                        job_id="scale")
        submit_s = time.perf_counter() - t
        after_submit = mem(r)
        queued = r.llen(QUEUE)
        message_bytes = len(r.lindex(QUEUE, 0))

        store = JobStore(r)
        t = time.perf_counter()
        batches = r.hgetall(f"posebatch:job:{job_id}:batches")
        for batch_id, raw in sorted(batches.items()):
            keys = json.loads(raw)
            recs = [Record(k, True, None, i % 4, i % 3) if i % 50 else
                    Record(k, False, 216201, 0, 0, "not JPEG, PNG or BMP")
                    for i, k in enumerate(keys)]
            store.add_records(job_id, recs, batch_id.decode())
            r.rpop(QUEUE)
        del batches
        records_s = time.perf_counter() - t
        after_records = mem(r)

        proc = subprocess.run([sys.executable, "-c", FINALIZE, url, job_id], check=True,
                              capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        finalize = json.loads(proc.stdout)
        finalize_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        after_finalize = mem(r)
        ttl_ok = all(r.ttl(k) > 0 for k in r.scan_iter(f"posebatch:job:{job_id}*"))
        csv_bytes = (out / "_counts.csv").stat().st_size
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    figures = {
        "images": n, "batch_images": ns.batch_images, "batches": queued,
        "submit_seconds": round(submit_s, 1),
        "records_seconds": round(records_s, 1),
        "finalize_seconds": round(finalize["seconds"], 1),
        "finalize_peak_rss_bytes": finalize_rss,
        "redis_used_after_submit_bytes": after_submit["used"] - empty["used"],
        "redis_used_after_records_bytes": after_records["used"] - empty["used"],
        "redis_used_after_finalize_bytes": after_finalize["used"] - empty["used"],
        "redis_peak_bytes": after_finalize["peak"] - empty["used"],
        "message_bytes": message_bytes,
        "counts_csv_bytes": csv_bytes,
        "every_job_key_expires": ttl_ok,
        "per_image": {
            "queued_bytes": round((after_submit["used"] - empty["used"]) / n, 1),
            "record_bytes": round((after_records["used"] - empty["used"]) / n, 1),
            "finalize_rss_bytes": round(finalize_rss / n, 1),
        },
        "host": {"cpu": cpu_model(), "cores": os.cpu_count(),
                 "note": "2 cores shared by 7 agents at the time"},
        "command": f"python bench/scale_redis.py --images {n}",
    }
    emit(figures, ns.json)


if __name__ == "__main__":
    main()
