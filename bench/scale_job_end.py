"""A job end into an output with 1M-10M earlier rows, before vs after the root index (issue 22,
item 4), on loopback SeaweedFS S3 and redis-server (``posebatch.testing.servers``).

Per size: a root ``_counts.csv`` of N stubbed rows (+ its ``_summary.json``, no ``_tables.json``:
an output written by the merging finalize) is uploaded; then, each in a child process (its own
peak RSS), a job of ``--new`` rows ends through ``jobend.maybe_finalize``:

- ``after``: the index: the job's table and ``_tables.json``, no earlier row read;
- ``before``: compaction forced at the job end (``COMPACT_RATIO`` huge): download the base and
  the pending tables, merge, upload: what every job end did before (the merging finalize);
  its time per 1M rows is the compaction cost;
- ``read``: the merged view (base + 1 pending table) streamed by ``current_rows``;
- ``old`` (with ``--old-src``): the merging finalize of an older checkout, on the same base.

Measured: seconds, bytes read from the output (``S3Storage.read``/``download``/``peek``
counted in the child), peak RSS of the child, finalize and output lock renewals.

    .venv/bin/python bench/scale_job_end.py --rows 1000000 2000000 \\
        --json bench/results/scale-job-end.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from common import emit  # noqa: E402  (bench/ is the script's folder)

CHILD = """
import json, resource, sys, time
import posebatch.finalize as fz
if hasattr(fz, "add_job"):
    import posebatch.roottables as rt
else:  # the merging finalize of an older checkout (--old-src)
    rt = None
from posebatch.jobend import maybe_finalize
from posebatch.jobstate import JobStore
from posebatch.records import Record
from posebatch.s3storage import S3Storage
from posebatch.storage import open_storage
url, out, mode, new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
read = {"bytes": 0, "calls": 0, "keys": set()}
real_read, real_download, real_peek = S3Storage.read, S3Storage.download, S3Storage.peek
def counted_read(self, key, max_bytes=None):
    data = real_read(self, key, max_bytes)
    read["bytes"] += len(data); read["calls"] += 1; read["keys"].add(key)
    return data
def counted_download(self, key, path):
    real_download(self, key, path)
    import os
    read["bytes"] += os.path.getsize(path); read["calls"] += 1; read["keys"].add(key)
def counted_peek(self, key, n):
    data = real_peek(self, key, n)
    read["bytes"] += len(data); read["calls"] += 1; read["keys"].add(key)
    return data
S3Storage.read, S3Storage.download, S3Storage.peek = counted_read, counted_download, counted_peek
t = time.perf_counter()
fig = {}
if mode == "read":
    with rt.current_rows(open_storage(out)) as rows:
        fig["rows"] = sum(1 for _ in rows)
else:
    if mode == "before":
        rt.COMPACT_RATIO = 10**9
    store = JobStore.from_url(url)
    job = f"job-{mode}"
    store.create(job, {"input": None, "output": out, "settings": {}})
    store.mark_submitted(job, new, 1)
    store.add_records(job, [Record(f"new-{mode}/{i:09d}.jpg", True, None, 1, 1, width=64,
                                   height=48) for i in range(new)])
    t = time.perf_counter()
    assert maybe_finalize(store, job)
    fig["lock_renewals"] = store.last_lock.renewals
    if rt is not None:
        fig["output_lock_renewals"] = store.last_output_lock.renewals
        fig["pending_after"] = len(rt.read_index(open_storage(out)).pending)
fig["seconds"] = time.perf_counter() - t
import posebatch.finalize
fig["code"] = posebatch.finalize.__file__
fig.update(bytes_read=read["bytes"], read_calls=read["calls"], keys_read=sorted(read["keys"]),
           peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps(fig))
"""


def base_table(path: Path, n: int) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\ufeff")
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow(["key", "status", "error_code", "person_num", "valid_persons", "error_msg",
                    "width", "height", "etag", "bytes"])
        for i in range(n):
            w.writerow([f"old/{i:09d}.jpg", "ok", "", 1, 1, "", 640, 480, f"{i:032x}", 1000])


def child(redis_url: str, out: str, mode: str, new: int, src: Path = ROOT) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, redis_url, out, mode, str(new)],
                          capture_output=True, text=True, cwd=src,
                          env={**os.environ, "PYTHONPATH": str(src)})
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} child failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--new", type=int, default=5000, help="rows of the job that ends")
    ap.add_argument("--old-src", type=Path,
                    help="a checkout of the merging finalize (e.g. `git archive f3cc3ec "
                         "posebatch | tar -x -C DIR`): its job end is measured too, as 'old'")
    ap.add_argument("--json")
    ns = ap.parse_args()

    from bench.scale_redis import cpu_model
    from posebatch.aggregate import summarize, summary_json
    from posebatch.records import Record
    from posebatch.s3storage import S3Storage
    from posebatch.testing.servers import running_redis, running_s3

    work = Path(tempfile.mkdtemp(prefix="pb-scale-job-end-"))
    figures: dict = {"new_rows": ns.new, "sizes": [], "host": {
        "cpu": cpu_model(), "cores": os.cpu_count(), "load_before": os.getloadavg()}}
    with contextlib.ExitStack() as stack:
        redis_server = stack.enter_context(running_redis(work / "redis"))
        s3 = stack.enter_context(running_s3(work / "weed"))
        os.environ.update(s3.env())
        bucket = "bench"
        s3.client().create_bucket(Bucket=bucket)
        for n in ns.rows:
            prefix = f"out-{n}"
            out = S3Storage(bucket, prefix)
            table = work / f"base-{n}.csv"
            t = time.perf_counter()
            base_table(table, n)
            out.upload("_counts.csv", str(table), "text/csv")
            summary = summarize([Record("x", True, None, 1, 1)], {"job_id": "base"})
            summary.update(images_seen=n, succeeded=n, persons_total=n, valid_persons_total=n,
                           valid_persons_histogram={"1": n})
            out.write("_summary.json", summary_json(summary), "application/json")
            setup = time.perf_counter() - t
            table.unlink()
            size = {"earlier_rows": n, "base_bytes": out.size("_counts.csv"),
                    "setup_seconds": round(setup, 1)}
            for mode in ("after", "read", "before"):
                size[mode] = child(redis_server.url, out.url, mode, ns.new)
                print(json.dumps({"rows": n, mode: size[mode]}), flush=True)
            if ns.old_src is not None:  # the same base (now compacted), the old job end
                size["old"] = child(redis_server.url, out.url, "old", ns.new, ns.old_src)
                print(json.dumps({"rows": n, "old": size["old"]}), flush=True)
            size["compaction_seconds_per_1m_rows"] = round(
                size["before"]["seconds"] / ((n + 2 * ns.new) / 1e6), 2)
            figures["sizes"].append(size)
    figures["host"]["load_after"] = os.getloadavg()
    figures["command"] = (f"python bench/scale_job_end.py --rows {' '.join(map(str, ns.rows))} "
                          f"--new {ns.new}" + (" --old-src DIR" if ns.old_src else ""))
    emit(figures, ns.json)


if __name__ == "__main__":
    main()
