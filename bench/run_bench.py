"""posebatch benchmark: one run, one machine, every figure of issue 5 side by side.

    (a) the model alone: session.run on ready tensors at the chosen batch size (the ceiling)
    (b) ``posebatch run`` end to end on the corpus (the real CLI, as a subprocess)
    (c) the cluster end to end: SeaweedFS S3 + Redis on loopback, one ``posebatch worker``
    (d) Ultralytics' own predict on the same files with the same .pt weights (peer environment)
    plus decode-only images/s, peak memory of each process, the machine's measured float32
    GFLOP/s (numpy matmul) next to the model's GFLOPs x images/s.

The table is printed and written to ``results/<date>-<host>[-n<N>].md`` and ``.json``; the
headline is b/a, c/a and b/d. Goals (figures, not assertions): b/a >= 0.85, c/a >= 0.80,
b/d >= 3, peak RSS of a CPU worker <= 600 MB.

Run it with the project's interpreter (``make -C bench run`` or ``make -C bench quick``):

    ../.venv/bin/python run_bench.py --images 200 --batch-size 8 --intra-threads 0 --io-threads 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import make_corpus  # noqa: E402
import numpy as np  # noqa: E402

CLI = [sys.executable, "-m", "posebatch.cli"]
GOALS = {"b/a": 0.85, "c/a": 0.80, "b/d": 3.0, "worker_rss_mb": 600.0}
FALLBACK_GFLOPS_640 = 7.466984  # Ultralytics get_flops, YOLO11n-pose fused, 640x640


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort
    import PIL

    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    quota = None
    try:
        raw = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if len(raw) == 2 and raw[0] != "max":
            quota = int(raw[0]) / int(raw[1])
    except (OSError, ValueError):
        pass
    return {
        "host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)), "cgroup_cpu_quota": quota,
        "mem_gb": round(mem_kb / 1024 / 1024, 1), "kernel": platform.release(),
        "python": platform.python_version(), "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(), "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


PROBE = """
import json, sys, time, numpy as np
n = int(sys.argv[1]); a = np.random.rand(n, n).astype(np.float32)
b = np.random.rand(n, n).astype(np.float32); a @ b
best = 1e9; end = time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < end:
    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
print(json.dumps(2 * n ** 3 / best / 1e9))
"""


def gflops_probe(seconds: float = 2.0, n: int = 2048) -> dict[str, float]:
    """float32 matmul n x n, best of a few seconds, with 1 BLAS thread and with all cores."""
    out = {}
    for label, threads in (("1 thread", "1"), ("all cores", str(os.cpu_count()))):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads}
        proc = subprocess.run([sys.executable, "-c", PROBE, str(n), str(seconds)], env=env,
                              capture_output=True, text=True, check=True)
        out[label] = round(float(proc.stdout.strip().splitlines()[-1]), 1)
    return out


# --------------------------------------------------------------------------- memory


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) and PPid of one process, from /proc."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "PPid"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (their live threads included), from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return total / tick


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have been busy (non-idle), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """This process's CPU seconds plus those of every child it has reaped (and theirs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            ppid = _proc_status(int(name)).get("PPid")
            if ppid is not None:
                children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class RssSampler:
    """Samples the summed VmRSS of a process and its descendants every ``interval`` seconds.

    Only /proc/<pid>/status (cheap): reading smaps_rollup (PSS) takes the target's mmap lock and
    measurably slowed a 3 GB torch process when sampled, so PSS is read once, by ``pss_now``.
    """

    def __init__(self, root_pid: int, interval: float = 0.25) -> None:
        self.root, self.interval = root_pid, interval
        self.peak_rss_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        rss = sum(_proc_status(p).get("VmRSS", 0) for p in process_tree(self.root))
        self.peak_rss_sum = max(self.peak_rss_sum, rss)

    def pss_now(self) -> int:
        return sum(_pss_kb(p) for p in process_tree(self.root))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], *, env: dict[str, str], cwd: Path, work: Path,
                 timeout: float = 3600) -> dict[str, Any]:
    """Run ``cmd``; return its exit code, output, wall seconds, CPU seconds and peak RSS (MB).

    Peak RSS and CPU are the child's own rusage from wait4(): exact, and nothing sampled."""
    out_path, err_path = work / "cmd.stdout", work / "cmd.stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "stdout": out_path.read_text(),
            "stderr": err_path.read_text(), "wall": wall,
            "cpu": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


# --------------------------------------------------------------------------- corpus helpers


def corpus_shapes(manifest: dict, imgsz: int, rect: bool) -> Counter:
    """Model input (h, w) per image, by the engine's own rule (workers.engine.letterbox)."""
    from workers.engine.letterbox import input_shape_for

    shapes: Counter = Counter()
    for e in manifest["images"]:
        w, h = e["upright_wh"]
        shapes[input_shape_for((h, w), imgsz) if rect else (imgsz, imgsz)] += 1
    return shapes


# --------------------------------------------------------------------------- (a) model alone


def measure_model(model_path: str, shapes: Counter, batch: int, intra: int, providers: str,
                  min_seconds: float) -> dict[str, Any]:
    """session.run on ready random tensors, batch by batch, per input shape, >= min_seconds
    each; images/s over the corpus' shape mix = N / sum(count_shape / rate_shape)."""
    from workers.engine.runner import PoseModel

    model = PoseModel(model_path, providers, intra)
    rng = np.random.default_rng(0)
    rates, cpu_ms = {}, {}
    for (h, w), _count in sorted(shapes.items()):
        x = rng.random((batch, 3, h, w), dtype=np.float32)
        for _ in range(2):
            model.run_raw(x)
        times = []
        cpu0 = os.times()
        end = time.perf_counter() + min_seconds
        while time.perf_counter() < end or len(times) < 3:
            t = time.perf_counter()
            model.run_raw(x)
            times.append(time.perf_counter() - t)
        cpu1 = os.times()
        rates[f"{h}x{w}"] = batch / float(np.median(times))
        cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
        cpu_ms[f"{h}x{w}"] = 1e3 * cpu / (batch * len(times))
    total = sum(shapes.values())
    seconds = sum(c / rates[f"{h}x{w}"] for (h, w), c in shapes.items())
    cpu_per_image = sum(c * cpu_ms[f"{h}x{w}"] for (h, w), c in shapes.items()) / total
    return {"img_per_s": total / seconds, "per_shape": rates, "provider": model.info.provider,
            "cpu_ms_per_image": cpu_per_image}


# --------------------------------------------------------------------------- decode only


def measure_decode(files: list[Path], imgsz: int, rect: bool, io_threads: int) -> dict[str, Any]:
    """The engine's ``prepare`` (validate, decode, EXIF, letterbox, float tensor) on bytes in
    memory: in ``io_threads`` threads as the engine runs it, and per stage on one thread."""
    from posebatch.settings import JobSettings
    from workers.engine.decode import Limits, decode_image
    from workers.engine.letterbox import input_shape_for, letterbox
    from workers.engine.pipeline import prepare

    job = JobSettings(imgsz=imgsz, rect=rect)
    blobs = [(f.name, f.read_bytes()) for f in files]
    with cf.ThreadPoolExecutor(io_threads) as pool:
        list(pool.map(lambda kb: prepare(kb[0], lambda: kb[1], job, None), blobs[:4]))
        t0 = time.perf_counter()
        errors = sum(1 for p in pool.map(lambda kb: prepare(kb[0], lambda: kb[1], job, None),
                                         blobs) if p.error)
        threaded = len(blobs) / (time.perf_counter() - t0)
    stages: dict[str, dict[str, float]] = {}
    for _name, data in blobs:
        t0 = time.perf_counter()
        img = decode_image(data, Limits(job.max_image_bytes, job.min_side, job.max_side),
                           target=imgsz)
        t1 = time.perf_counter()
        hw = input_shape_for(img.rgb.shape[:2], imgsz) if rect else (imgsz, imgsz)
        canvas, _ = letterbox(img.rgb, hw)
        t2 = time.perf_counter()
        tensor = np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32)
        tensor *= 1.0 / 255.0
        t3 = time.perf_counter()
        kind = "12MP" if len(data) > 1_000_000 or img.width * img.height > 8e6 else "1080p"
        s = stages.setdefault(kind, {"n": 0, "decode_ms": 0.0, "letterbox_ms": 0.0,
                                     "tensor_ms": 0.0})
        s["n"] += 1
        s["decode_ms"] += (t1 - t0) * 1e3
        s["letterbox_ms"] += (t2 - t1) * 1e3
        s["tensor_ms"] += (t3 - t2) * 1e3
    for s in stages.values():
        for k in ("decode_ms", "letterbox_ms", "tensor_ms"):
            s[k] = round(s[k] / s["n"], 2)
    one = sum(s["n"] for s in stages.values()) / sum(
        s["n"] * (s["decode_ms"] + s["letterbox_ms"] + s["tensor_ms"]) / 1e3
        for s in stages.values())
    return {"img_per_s": threaded, "threads": io_threads, "img_per_s_1_thread": one,
            "ms_per_image_1_thread": 1e3 / one, "errors": errors, "stages_ms": stages}


# --------------------------------------------------------------------------- (b) posebatch run


RUN_LINE = re.compile(r"(\d+) images, (\d+) ok, (\d+) failed.*?; ([\d.]+) s \(([\d.]+) img/s\)")


def runtime_flags(ns: argparse.Namespace) -> list[str]:
    return ["--batch-size", str(ns.batch_size), "--intra-threads", str(ns.intra_threads),
            "--io-threads", str(ns.io_threads), "--providers", ns.providers]


def job_flags(ns: argparse.Namespace) -> list[str]:
    return ["--imgsz", str(ns.imgsz), *(["--rect"] if ns.rect else [])]


def clean_env() -> dict[str, str]:
    """This environment without POSEBATCH_* runtime variables: the flags decide."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("POSEBATCH_") or k in ("POSEBATCH_CACHE", "POSEBATCH_DEV_DATA")}


def measure_cli_run(images: Path, n: int, ns: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / "run-out"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*CLI, "run", str(images), "--out", str(out), "--no-progress", "--force",
           *job_flags(ns), *runtime_flags(ns)]
    res = run_measured(cmd, env=clean_env(), cwd=ROOT, work=work)
    stdout, wall = res["stdout"], res["wall"]
    if res["rc"] != 0:
        raise RuntimeError(f"posebatch run exited {res['rc']}:\n{stdout}\n{res['stderr']}")
    m = RUN_LINE.search(stdout)
    if not m:
        raise RuntimeError(f"cannot parse posebatch run output: {stdout!r}")
    seen, ok, failed, seconds, _rate = m.groups()
    if int(seen) != n:
        raise RuntimeError(f"posebatch run saw {seen} images, the corpus has {n}")
    summary = json.loads((out / "_summary.json").read_text())
    return {"img_per_s": int(seen) / float(seconds), "seconds": float(seconds),
            "wall_s": wall, "img_per_s_wall": int(seen) / wall, "ok": int(ok),
            "failed": int(failed), "persons": summary.get("valid_persons_total"),
            "peak_rss_mb": res["peak_rss_mb"], "cpu_s": res["cpu"],
            "cores_busy": res["cpu"] / wall, "command": " ".join(cmd[2:]),
            "stdout": stdout.strip()}


# --------------------------------------------------------------------------- (c) cluster


def measure_cluster(images: Path, files: list[Path], ns: argparse.Namespace,
                    work: Path) -> dict[str, Any]:
    import redis as redis_lib

    from posebatch.jobstate import JobStore
    from tests.cluster import WorkerProcess
    from tests.servers import RedisServer, S3Server, find_binary

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
               "POSEBATCH_IO_THREADS": str(ns.io_threads), "POSEBATCH_PROVIDERS": ns.providers}
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
                while True:  # poll more finely than `wait` (1 s) for the done time
                    p = store.progress(job_id)
                    if (p is not None and p.state == "done") or waiter.poll() is not None:
                        break
                    time.sleep(0.05)
                done = time.perf_counter() - t0
                wait_out, wait_err = waiter.communicate(timeout=600)
                wait_done = time.perf_counter() - t0
                hwm = {pid: _proc_status(pid).get("VmHWM", 0) for pid in
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
            return {"img_per_s": p.done / done, "seconds": done, "submit_s": submitted,
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


# --------------------------------------------------------------------------- (d) peer


def peer_env(work: Path) -> dict[str, str]:
    return {**clean_env(), "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(work / "ultralytics"),
            "PYTHONWARNINGS": "ignore"}


def run_peer(peer_python: str, args: list[str], work: Path) -> dict[str, Any]:
    cmd = [peer_python, str(HERE / "peer_ultralytics.py"), *args]
    res = run_measured(cmd, env=peer_env(work), cwd=work, work=work)
    if res["rc"] != 0:
        raise RuntimeError(f"peer {args[0]} exited {res['rc']}:\n{res['stderr'][-3000:]}")
    out = json.loads(res["stdout"].strip().splitlines()[-1])
    out["peak_rss_mb"] = res["peak_rss_mb"]
    return out


def measure_peer(peer_python: str, files: list[Path], ns: argparse.Namespace,
                 work: Path) -> dict[str, Any]:
    # The order `posebatch run` lists them in (sorted keys: all 1920x1080, then all 4032x3024).
    # It matters to the peer: torch on CPU re-plans for every change of input shape, and
    # Ultralytics' minimal-rectangle letterbox makes a new shape for every other image of an
    # interleaved list (measured: 1.7x slower). posebatch groups by shape itself.
    listing = work / "peer-files.txt"
    listing.write_text("\n".join(str(f) for f in sorted(files)) + "\n")
    common = ["predict", "--files", str(listing), "--imgsz", str(ns.imgsz),
              "--conf", str(ns.det_conf), "--iou", str(ns.nms_iou)]
    out = {"default": best_of(ns.repeat, run_peer, peer_python, common, work)}
    cores = os.cpu_count() or 1
    if out["default"]["torch_threads"] != cores:
        out[f"threads={cores}"] = best_of(ns.repeat, run_peer, peer_python,
                                          [*common, "--threads", str(cores)], work)
    return out


def model_gflops(peer_python: str | None, shapes: Counter, work: Path) -> dict[str, Any]:
    """GFLOPs per image over the corpus' shape mix, as Ultralytics counts them."""
    keys = [f"{h}x{w}" for h, w in shapes]
    per = None
    if peer_python:
        try:
            args = ["flops"] + [a for k in keys for a in ("--shape", k)]
            per = run_peer(peer_python, args, work)["gflops"]
            source = "Ultralytics get_flops (thop MACs x 2) on the fused .pt, per input shape"
        except (RuntimeError, OSError, ValueError) as err:
            log(f"flops from the peer failed ({err}); using the 640x640 figure scaled by area")
    if per is None:
        per = {k: FALLBACK_GFLOPS_640 * (int(k.split("x")[0]) * int(k.split("x")[1]))
               / (640 * 640) for k in keys}
        source = "Ultralytics' 7.47 GFLOPs at 640x640, scaled by input area"
    total = sum(shapes.values())
    mean = sum(per[f"{h}x{w}"] * c for (h, w), c in shapes.items()) / total
    return {"per_shape": per, "mean_per_image": mean, "source": source}


# --------------------------------------------------------------------------- report


def best_of(repeat: int, fn, *args) -> dict[str, Any]:
    """Run a measurement ``repeat`` times; keep the fastest, list every rate."""
    runs = [fn(*args) for _ in range(max(1, repeat))]
    best = max(runs, key=lambda x: x["img_per_s"])
    return {**best, "all_img_per_s": [round(x["img_per_s"], 2) for x in runs]}



def ratio(x: float | None, y: float | None) -> float | None:
    return None if not x or not y else x / y


def fmt(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def render(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["settings"]
    a = r.get("a", {})
    rows = []
    a_rate = a.get("img_per_s")

    def row(name: str, rate: float | None, notes: str, runs: list | None = None) -> None:
        if runs and len(runs) > 1:
            notes += f"; best of {len(runs)} runs: {runs} img/s"
        rows.append(f"| {name} | {fmt(rate)} | {fmt(ratio(rate, a_rate), 2)} | {notes} |")

    if a:
        row(f"(a) model alone: session.run, batch {s['batch_size']}", a_rate,
            f"start {fmt(a['start'])} / end {fmt(a['end'])} img/s (the faster used); "
            + ", ".join(f"{k}: {v:.1f}" for k, v in a["per_shape"].items()))
    d = r.get("decode")
    if d:
        row(f"decode only: validate+decode+letterbox+tensor, {d['threads']} threads",
            d["img_per_s"], f"1 thread: {d['img_per_s_1_thread']:.1f} img/s; per image: "
            + "; ".join(f"{k} decode {v['decode_ms']} ms, letterbox {v['letterbox_ms']} ms, "
                        f"tensor {v['tensor_ms']} ms" for k, v in d["stages_ms"].items()))
    cores = m["cores_usable"]
    if a and d and a.get("cpu_ms_per_image"):
        # On a CPU-only machine model and decoding share the cores: (b) cannot beat this.
        cpu_ms = a["cpu_ms_per_image"] + d["ms_per_image_1_thread"]
        r["cpu_bound_ceiling"] = 1e3 * cores / cpu_ms
        row(f"CPU-bound ceiling for (b) on {cores} cores", r["cpu_bound_ceiling"],
            f"cores / (model {a['cpu_ms_per_image']:.1f} + decode "
            f"{d['ms_per_image_1_thread']:.1f} CPU ms per image): what (b) could reach if "
            "nothing else were lost; the ratio column is its b/a limit")
    b = r.get("b")
    if b:
        row("(b) `posebatch run` end to end", b["img_per_s"],
            f"{b['ok']} ok / {b['failed']} failed, {b['persons']} valid persons; its own "
            f"timer {b['seconds']:.1f} s; process wall incl. start-up and model load "
            f"{b['wall_s']:.1f} s = {b['img_per_s_wall']:.1f} img/s; CPU {b['cpu_s']:.1f} s "
            f"= {b['cores_busy']:.2f} cores busy", b.get("all_img_per_s"))
    c = r.get("c")
    if c:
        row("(c) cluster: S3 + Redis + 1 worker, submit -> done", c["img_per_s"],
            f"{c['done']} done / {c['failed']} failed in {c['tasks']} tasks of "
            f"{s['task_images']}; {c['seconds']:.1f} s (submit {c['submit_s']:.1f} s; "
            f"`posebatch wait` returned at {c['wait_cli_s']:.1f} s); CPU s in that time: "
            + ", ".join(f"{k} {v}" for k, v in c["cpu_s_by_process"].items()),
            c.get("all_img_per_s"))
    for name, p in (r.get("d") or {}).items():
        ms = p["ms_per_image"]
        row(f"(d) Ultralytics predict ({name}: torch threads {p['torch_threads']})",
            p["img_per_s"], f"{p['persons']} persons (conf {s['det_conf']}); its own ms/img: "
            f"pre {ms['preprocess']:.1f}, infer {ms['inference']:.1f}, post "
            f"{ms['postprocess']:.1f} (image reading not included there)",
            p.get("all_img_per_s"))
    h = r["headline"]

    def goal(key: str, value: float | None, fmt_nd: int = 2, le: bool = False) -> str:
        if value is None:
            return f"| {key} | - | {GOALS[key]} | not measured |"
        ok = value <= GOALS[key] if le else value >= GOALS[key]
        sign = "<=" if le else ">="
        return (f"| {key} | {value:.{fmt_nd}f} | {sign} {GOALS[key]} | "
                f"{'met' if ok else 'missed'} |")

    g = r.get("gflops", {})
    lines = [
        f"# posebatch benchmark, {r['date']} on {m['host']}",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['mem_gb']} GB, kernel {m['kernel']}",
        f"- software: Python {m['python']}, onnxruntime {m['onnxruntime']} "
        f"({a.get('provider', '?')}), numpy {m['numpy']}, Pillow {m['pillow']}"
        + (f"; peer: torch {r['peer_versions']['torch']}, ultralytics "
           f"{r['peer_versions']['ultralytics']}" if r.get("peer_versions") else ""),
        f"- settings: batch size {s['batch_size']}, intra threads {s['intra_threads']} "
        f"(0 = ONNX Runtime's default), io threads {s['io_threads']}, providers "
        f"{s['providers']}, imgsz {s['imgsz']}, rect {s['rect']}, det_conf {s['det_conf']}, "
        f"nms_iou {s['nms_iou']}, cluster task size {s['task_images']} images",
        f"- model: {r['model']['path']} (sha256 {r['model']['sha256'][:12]})",
        f"- corpus: {r['corpus']['description']}",
        "- input shapes (h x w: images): "
        + ", ".join(f"{k}: {v}" for k, v in r["corpus"]["shapes"].items()),
        "",
        f"- load average at start {r['loadavg_at_start']:.2f}; CPU cores kept busy by other "
        "processes during each stage: "
        + (", ".join(f"{k} {v}" for k, v in r["background_cores"].items()) or "-"),
        "",
        "## Headline",
        "",
        "| ratio | value | goal | |",
        "| --- | --- | --- | --- |",
        goal("b/a", h["b/a"]),
        goal("c/a", h["c/a"]),
        goal("b/d", h["b/d"]),
        goal("worker_rss_mb", h["worker_rss_mb"], 0, le=True),
        "",
        "b/d uses the faster of the peer's runs. worker_rss_mb: peak RSS of the worker's pool "
        "process (the one holding the model), VmHWM.",
        "",
        "## Throughput",
        "",
        "| measurement | images/s | vs (a) | notes |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        "## Memory (peak)",
        "",
    ]
    if b:
        lines.append(f"- `posebatch run` process: {b['peak_rss_mb']:.0f} MB RSS")
    if c:
        lines.append(
            f"- cluster worker: pool process {c['worker_child_peak_rss_mb']:.0f} MB RSS (VmHWM),"
            f" Celery parent {c['worker_parent_peak_rss_mb']:.0f} MB; sampled sum "
            f"{c['worker_tree_peak_rss_sum_mb']:.0f} MB RSS; at the end "
            f"{c['worker_tree_pss_end_mb']:.0f} MB PSS (shared pages counted once)")
    for name, p in (r.get("d") or {}).items():
        lines.append(f"- Ultralytics peer ({name}): {p['peak_rss_mb']:.0f} MB RSS")
    if g:
        probe = r["gflops_probe"]
        lines += [
            "",
            "## Compute",
            "",
            f"- machine, float32 matmul 2048x2048 (numpy, best of 2 s): "
            f"{probe['1 thread']} GFLOP/s on 1 thread, {probe['all cores']} GFLOP/s on all "
            "cores",
            f"- model: {g['mean_per_image']:.2f} GFLOPs per image over this shape mix "
            f"({', '.join(f'{k}: {v:.2f}' for k, v in g['per_shape'].items())}); source: "
            f"{g['source']}",
        ]
        for key, label in (("a", "(a)"), ("b", "(b)"), ("c", "(c)")):
            rate = (r.get(key) or {}).get("img_per_s")
            if rate:
                achieved = rate * g["mean_per_image"]
                lines.append(f"- {label}: {achieved:.0f} GFLOP/s = "
                             f"{100 * achieved / probe['all cores']:.0f}% of the matmul probe")
    if r.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in r["errors"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200, help="corpus size (default 200)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--intra-threads", type=int, default=0,
                    help="ONNX Runtime intra-op threads (0: its default, one per core)")
    ap.add_argument("--io-threads", type=int, default=2, help="decode threads")
    ap.add_argument("--providers", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--rect", action="store_true", help="pass --rect to posebatch")
    ap.add_argument("--det-conf", type=float, default=0.05,
                    help="posebatch's default; given to the peer too, so both do the same work")
    ap.add_argument("--nms-iou", type=float, default=0.6)
    ap.add_argument("--task-images", type=int, default=32,
                    help="cluster: images per task (submit --batch-images)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run (b), (c) and each peer configuration this many times; keep the "
                         "fastest (a shared machine only ever slows a run down)")
    ap.add_argument("--model-seconds", type=float, default=4.0,
                    help="(a): seconds of session.run per input shape, each time")
    ap.add_argument("--peer-python", default=str(HERE / ".venv-peer/bin/python"))
    ap.add_argument("--skip", action="append", default=[],
                    choices=["a", "decode", "b", "c", "d", "probe"], help="repeatable")
    ap.add_argument("--results", default=str(HERE / "results"))
    ns = ap.parse_args()

    from posebatch.modelstore import resolve_model
    from posebatch.settings import RuntimeSettings, from_env

    started = datetime.now(UTC)
    machine = machine_info()
    model = resolve_model(None, from_env(RuntimeSettings).cache_dir)
    log(f"corpus of {ns.images} images (cached after the first run)")
    folder = make_corpus.ensure_corpus(ns.images)
    manifest = json.loads((folder / "manifest.json").read_text())
    images = folder / "images"
    files = [folder / e["path"] for e in manifest["images"]]
    shapes = corpus_shapes(manifest, ns.imgsz, ns.rect)
    # abspath, not resolve(): the venv's python is a symlink whose target is not the venv.
    peer_python = os.path.abspath(ns.peer_python) if Path(ns.peer_python).exists() else None
    if "d" not in ns.skip and not peer_python:
        log(f"no peer environment at {ns.peer_python} (make -C bench peer): (d) skipped")
    r: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine,
        "settings": {k: getattr(ns, k) for k in ("batch_size", "intra_threads", "io_threads",
                                                  "providers", "imgsz", "rect", "det_conf",
                                                  "nms_iou", "task_images")},
        "model": {"path": str(model.path), "sha256": model.sha256},
        "corpus": {"folder": str(folder), "description": make_corpus.describe(folder),
                   "shapes": {f"{h}x{w}": c for (h, w), c in sorted(shapes.items())}},
        "errors": {}, "background_cores": {}, "loadavg_at_start": os.getloadavg()[0],
    }
    if r["loadavg_at_start"] > 0.5:
        log(f"warning: load average {r['loadavg_at_start']:.2f} before the run; figures are "
            "only comparable on an otherwise idle machine")
    work = Path(tempfile.mkdtemp(prefix="posebatch-bench-"))

    def stage(key: str, fn, *args):
        if key in ns.skip:
            return None
        log(f"{key} ...")
        t, busy0, own0 = time.perf_counter(), machine_busy_s(), own_cpu_s()
        try:
            out = fn(*args)
        except Exception as err:  # one failed stage must not lose the others' figures
            log(f"{key} FAILED: {err}")
            r["errors"][key] = f"{type(err).__name__}: {err}"[:2000]
            return None
        wall = time.perf_counter() - t
        # CPU the rest of the machine used meanwhile (other users' jobs distort every figure).
        other = max(0.0, (machine_busy_s() - busy0) - (own_cpu_s() - own0)) / wall
        r["background_cores"][key] = max(r["background_cores"].get(key, 0.0), round(other, 2))
        log(f"{key} done in {wall:.1f} s: "
            f"{fmt((out or {}).get('img_per_s')) if isinstance(out, dict) else ''}"
            f"{f' (other processes kept {other:.2f} cores busy)' if other > 0.05 else ''}")
        return out

    try:
        if "probe" not in ns.skip:
            r["gflops_probe"] = stage("probe", gflops_probe)
        a_args = (str(model.path), shapes, ns.batch_size, ns.intra_threads, ns.providers,
                  ns.model_seconds)
        a1 = stage("a", measure_model, *a_args)
        r["decode"] = stage("decode", measure_decode, files, ns.imgsz, ns.rect, ns.io_threads)
        r["b"] = stage("b", best_of, ns.repeat, measure_cli_run, images, len(files), ns, work)
        r["c"] = stage("c", measure_cluster, images, files, ns, work)
        if peer_python:
            r["d"] = stage("d", measure_peer, peer_python, files, ns, work)
        a2 = stage("a", measure_model, *a_args)  # again: the machine may have drifted
        if a1 and a2:  # the ceiling: the faster of the two (other load only slows it down)
            best = a1 if a1["img_per_s"] >= a2["img_per_s"] else a2
            r["a"] = {**best, "start": a1["img_per_s"], "end": a2["img_per_s"]}
        elif a1 or a2:
            a = a1 or a2
            r["a"] = {**a, "start": a["img_per_s"], "end": a["img_per_s"]}
        if "probe" not in ns.skip and r.get("gflops_probe"):
            r["gflops"] = model_gflops(peer_python, shapes, work)
        if r.get("d"):
            r["peer_versions"] = {k: next(iter(r["d"].values()))[k]
                                  for k in ("torch", "ultralytics")}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    a_rate = (r.get("a") or {}).get("img_per_s")
    b_rate = (r.get("b") or {}).get("img_per_s")
    c_rate = (r.get("c") or {}).get("img_per_s")
    d_rate = max((p["img_per_s"] for p in (r.get("d") or {}).values()), default=None)
    r["headline"] = {"b/a": ratio(b_rate, a_rate), "c/a": ratio(c_rate, a_rate),
                     "b/d": ratio(b_rate, d_rate),
                     "worker_rss_mb": (r.get("c") or {}).get("worker_child_peak_rss_mb")}
    text = render(r)
    print(text)
    out_dir = Path(ns.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{started.strftime('%Y-%m-%d')}-{machine['host']}"
    for flag, value, default in (("n", ns.images, 200), ("b", ns.batch_size, 8),
                                 ("intra", ns.intra_threads, 0), ("io", ns.io_threads, 2),
                                 ("imgsz", ns.imgsz, 640)):
        if value != default:  # non-default settings get their own file
            stem += f"-{flag}{value}"
    if ns.rect:
        stem += "-rect"
    (out_dir / f"{stem}.md").write_text(text)
    (out_dir / f"{stem}.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    log(f"written {out_dir / stem}.md and .json")
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
