"""(c) The cluster end to end: SeaweedFS S3 + Redis on loopback, one ``posebatch worker``."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import subprocess
import time
from pathlib import Path
from typing import Any

from common import CLI, ROOT, log
from measure_local import clean_env, job_flags
from procstat import RssSampler, cpu_seconds, proc_status, process_tree

# --------------------------------------------------------------------------- (c) cluster


def measure_cluster(images: Path, files: list[Path], ns: argparse.Namespace,
                    work: Path) -> dict[str, Any]:
    import redis as redis_lib

    from posebatch.jobstate import JobStore
    from posebatch.testing.cluster import WorkerProcess
    from posebatch.testing.servers import RedisServer, S3Server, find_binary

    redis_bin, weed_bin = find_binary("redis-server"), find_binary("weed")
    if not redis_bin or not weed_bin:
        raise RuntimeError(f"need redis-server and weed (found {redis_bin}, {weed_bin})")
    redis_srv = RedisServer(work / "redis", redis_bin)
    s3 = S3Server(work / "weed", weed_bin)
    worker = None
    try:
        t = time.perf_counter()
        redis_srv.start()
        s3.start()
        log(f"cluster: redis :{redis_srv.port}, weed s3 :{s3.port} up in "
            f"{time.perf_counter() - t:.1f} s")
        client = s3.client()
        bucket = s3.make_bucket("bench")
        rels = [f.relative_to(images).as_posix() for f in files]
        warm = rels[: max(2 * ns.batch_size, 4)]
        jobs = [(f"in/{r}", images / r) for r in rels] + [(f"warm/{r}", images / r)
                                                          for r in warm]
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda kp: client.put_object(Bucket=bucket, Key=kp[0],
                                                       Body=kp[1].read_bytes()), jobs))
        env = {**s3.env(), "POSEBATCH_BROKER_URL": redis_srv.url,
               "POSEBATCH_BATCH_SIZE": str(ns.batch_size),
               "POSEBATCH_INTRA_THREADS": str(ns.intra_threads),
               "POSEBATCH_IO_THREADS": str(ns.io_threads), "POSEBATCH_PROVIDERS": ns.providers,
               **{f"POSEBATCH_{k.upper()}": str(getattr(ns, k))
                  for k in ("precision", "model", "backend") if getattr(ns, k, None)}}
        base_env = {**clean_env(), **env}
        worker = WorkerProcess(work / "worker", env)
        worker.child_env = lambda: dict(base_env)  # type: ignore[method-assign]
        t = time.perf_counter()
        worker.start()
        log(f"cluster: worker ready in {time.perf_counter() - t:.1f} s")

        def cli(*args: str) -> str:
            proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=base_env,
                                  cwd=ROOT, timeout=1800)
            if proc.returncode not in (0, 1):
                raise RuntimeError(f"posebatch {args[0]} exited {proc.returncode}: "
                                   f"{proc.stderr[-2000:]}")
            return proc.stdout

        sub = ["--batch-images", str(ns.task_images), *job_flags(ns)]
        warm_id = cli("submit", f"s3://{bucket}/warm/", "--out", f"s3://{bucket}/warm-out/",
                      *sub).strip().splitlines()[-1]
        cli("wait", warm_id, "--no-progress", "--timeout", "600")
        store = JobStore(redis_lib.Redis.from_url(redis_srv.url))
        assert worker.proc is not None and s3.proc is not None and redis_srv.proc is not None
        groups = {"worker": worker.proc.pid, "weed (S3)": s3.proc.pid,
                  "redis": redis_srv.proc.pid}

        def timed_job(out_prefix: str) -> dict[str, Any]:
            assert worker is not None and worker.proc is not None
            cpu0 = {k: cpu_seconds(process_tree(v)) for k, v in groups.items()}
            with RssSampler(worker.proc.pid, 0.5) as sampler:
                t0 = time.perf_counter()
                job_id = cli("submit", f"s3://{bucket}/in/", "--out",
                             f"s3://{bucket}/{out_prefix}", *sub).strip().splitlines()[-1]
                submitted = time.perf_counter() - t0
                waiter = subprocess.Popen([*CLI, "wait", job_id, "--no-progress", "--timeout",
                                           "1800"], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=base_env,
                                          cwd=ROOT)
                seen: list[tuple[float, int]] = []  # (time, images done) at each change
                while True:  # poll more finely than `wait` (1 s) for the done time
                    p = store.progress(job_id)
                    if p is not None and (not seen or p.done != seen[-1][1]):
                        seen.append((time.perf_counter() - t0, p.done))
                    if (p is not None and p.state == "done") or waiter.poll() is not None:
                        break
                    time.sleep(0.05)
                done = time.perf_counter() - t0
                wait_out, wait_err = waiter.communicate(timeout=600)
                wait_done = time.perf_counter() - t0
                hwm = {pid: proc_status(pid).get("VmHWM", 0) for pid in
                       process_tree(worker.proc.pid)}
                pss_end = sampler.pss_now()
                cpu = {k: round(cpu_seconds(process_tree(v)) - cpu0[k], 2)
                       for k, v in groups.items()}
            p = store.progress(job_id)
            if p is None or p.state != "done":
                raise RuntimeError(f"job {job_id} not done: {p}; wait said {wait_out} "
                                   f"{wait_err}")
            root = worker.proc.pid
            child_hwm = max((v for pid, v in hwm.items() if pid != root), default=0)
            summary = json.loads(client.get_object(
                Bucket=bucket, Key=f"{out_prefix}_summary.json")["Body"].read())
            # Steady state: from the first task's records to the last's, without the job's fixed
            # costs (the submit command's start, listing, the first task's fill, finalizing).
            moved = [(t, n) for t, n in seen if n > 0]
            steady = ((moved[-1][1] - moved[0][1]) / (moved[-1][0] - moved[0][0])
                      if len(moved) >= 2 and moved[-1][0] > moved[0][0] else None)
            return {"img_per_s": p.done / done, "steady_img_per_s": steady,
                    "first_done_s": moved[0][0] if moved else None,
                    "seconds": done, "submit_s": submitted,
                    "wait_cli_s": wait_done, "done": p.done, "failed": p.failed,
                    "persons": summary.get("valid_persons_total"),
                    "tasks": math.ceil(len(files) / ns.task_images),
                    "worker_child_peak_rss_mb": child_hwm / 1024,
                    "worker_parent_peak_rss_mb": hwm.get(root, 0) / 1024,
                    "worker_tree_peak_rss_sum_mb": sampler.peak_rss_sum / 1024,
                    "worker_tree_pss_end_mb": pss_end / 1024,
                    "cpu_s_by_process": cpu, "wait_stdout": wait_out.strip()}

        runs = [timed_job(f"out{i}/") for i in range(max(1, ns.repeat))]
        best = max(runs, key=lambda x: x["img_per_s"])
        return {**best, "all_img_per_s": [round(x["img_per_s"], 2) for x in runs],
                "worker_child_peak_rss_mb": max(x["worker_child_peak_rss_mb"] for x in runs)}
    finally:
        if worker is not None:
            worker.stop()
        s3.stop(timeout=5)
        redis_srv.stop()
