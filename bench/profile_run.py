"""Where the time of ``posebatch run`` goes, stage by stage, on the bench corpus.

Two views of the same local run (the function behind ``posebatch run``: workers.local_run.run_job):

1. Instrumented, in this process: the engine's stage functions are wrapped (never edited) with
   timers recording wall and thread-CPU seconds per call: read, decode (validate + draft decode +
   EXIF), letterbox, tensor (HWC uint8 -> CHW float32), session.run, output decode + NMS,
   to_result (inverse letterbox, 21 keypoints, clamp), to_api (dict), JSON encode, write.
2. py-spy (when ``py-spy`` is installed next to this Python or on PATH): the real CLI as a
   subprocess, sampled, each sample of each Python thread put in the same stage buckets.
   ONNX Runtime's own worker threads are native and invisible to py-spy; instrumented
   process CPU time covers them.

Experiments (what-if, for the engine's authors; the engine files are not touched): extra
ONNX Runtime session options, applied by wrapping ``onnxruntime.SessionOptions``:

    profile_run.py --images 40 --ort-config session.intra_op.allow_spinning=0 --no-mem-pattern
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import make_corpus  # noqa: E402
from procstat import machine_busy_s  # noqa: E402

STAGES = ["read", "decode", "letterbox", "tensor", "session.run", "postprocess", "to_result",
          "to_api", "json", "write", "records"]


class Timers:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            w, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                dw, dc = time.perf_counter() - w, time.thread_time() - c
                with self.lock:
                    self.wall[name] += dw
                    self.cpu[name] += dc
                    self.calls[name] += 1

        return timed


def apply_ort_experiments(configs: list[str], mem_pattern: bool | None) -> None:
    import onnxruntime as ort

    base = ort.SessionOptions

    def options():
        opts = base()
        for item in configs:
            key, _, value = item.partition("=")
            opts.add_session_config_entry(key, value)
        if mem_pattern is not None:
            opts.enable_mem_pattern = mem_pattern
        return opts

    ort.SessionOptions = options  # PoseModel calls ort.SessionOptions() at construction


def instrumented(images: Path, ns: argparse.Namespace) -> dict:
    import numpy as np

    import posebatch.schema as result_mod
    import workers.batch as batch_mod
    import workers.engine.pipeline as pipe
    import workers.engine.runner as model_mod
    from posebatch.modelstore import resolve_model
    from posebatch.settings import JobSettings, RuntimeSettings, from_env
    from posebatch.storage import LocalStorage, open_storage
    from workers.local_run import run_job

    t = Timers()
    pipe.decode_image = t.wrap("decode", pipe.decode_image)
    pipe.letterbox = t.wrap("letterbox", pipe.letterbox)
    pipe.to_result = t.wrap("to_result", pipe.to_result)
    result_mod.PoseResult.to_api = t.wrap("to_api", result_mod.PoseResult.to_api)
    batch_mod.encode_result = t.wrap("json", batch_mod.encode_result)
    batch_mod.record_from_result = t.wrap("records", batch_mod.record_from_result)
    LocalStorage.read = t.wrap("read", LocalStorage.read)
    LocalStorage.write = t.wrap("write", LocalStorage.write)
    model_mod.PoseModel.run_raw = t.wrap("session.run", model_mod.PoseModel.run_raw)
    model_mod.PoseModel.infer = t.wrap("infer", model_mod.PoseModel.infer)
    pipe.prepare = t.wrap("prepare", pipe.prepare)
    proxy = types.ModuleType("numpy_timed")  # pipeline's np, with np.stack (batching) timed
    proxy.__dict__.update(np.__dict__)
    proxy.stack = t.wrap("stack", np.stack)
    pipe.np = proxy

    job = JobSettings(imgsz=ns.imgsz, rect=ns.rect)
    runtime = from_env(RuntimeSettings, {"batch_size": ns.batch_size,
                                         "intra_threads": ns.intra_threads,
                                         "io_threads": ns.io_threads,
                                         "providers": ns.providers})
    model = resolve_model(None, runtime.cache_dir)
    out = Path(tempfile.mkdtemp(prefix="posebatch-profile-"))
    try:
        cpu0, wall0, busy0 = os.times(), time.perf_counter(), machine_busy_s()
        outcome = run_job(open_storage(str(images)), open_storage(str(out)), model, job, runtime,
                          force=True, progress=False)
        wall = time.perf_counter() - wall0
        cpu1, busy1 = os.times(), machine_busy_s()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    n = outcome.summary["images_seen"]
    proc_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    other_cores = max(0.0, busy1 - busy0 - proc_cpu) / wall
    # Derived stages: what a wrapper's total holds beyond the wrapped parts inside it.
    wall_s = dict(t.wall)
    cpu_s = dict(t.cpu)
    for d in (wall_s, cpu_s):
        d["tensor"] = d.get("prepare", 0) - d.get("read", 0) - d.get("decode", 0) - d.get(
            "letterbox", 0)
        d["postprocess"] = d.get("infer", 0) - d.get("session.run", 0)
    rows = {}
    for name in [*STAGES, "stack"]:
        if name in wall_s:
            rows[name] = {"wall_s": round(wall_s[name], 3), "cpu_s": round(cpu_s[name], 3),
                          "ms_per_image_cpu": round(1e3 * cpu_s[name] / n, 2),
                          "ms_per_image_wall": round(1e3 * wall_s[name] / n, 2)}
    python_cpu = sum(cpu_s.get(k, 0) for k in STAGES if k != "session.run") + cpu_s.get(
        "stack", 0)
    return {
        "images": n, "wall_s": round(wall, 2), "run_job_s": round(outcome.seconds, 2),
        "img_per_s": round(n / outcome.seconds, 2), "process_cpu_s": round(proc_cpu, 2),
        "cores_busy": round(proc_cpu / wall, 2), "stages": rows,
        "session_run_share_of_wall": round(wall_s.get("session.run", 0) / outcome.seconds, 3),
        "cpu_outside_session_run_s": round(python_cpu, 2),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "other_processes_cores": round(other_cores, 2),
    }


BUCKETS = [  # the first frame, from the leaf upwards, that matches decides
    ("session.run", ("PoseModel.run_raw (",)),
    ("postprocess", ("decode_yolo_raw (", "nms (", "decode_yolo_e2e (", "decode_rtmo (")),
    ("to_result", ("to_result (", "to_api21 (", "PoseResult.clamped (")),
    ("to_api", ("PoseResult.to_api (",)),
    ("json", ("encode_result (",)),
    ("write", ("LocalStorage.write (",)),
    ("read", ("LocalStorage.read (",)),
    ("decode", ("decode_image (",)),
    ("letterbox", ("letterbox (",)),
    ("tensor", ("prepare (",)),
    ("stack", ("PoseEngine._infer (",)),
    ("start-up (imports, model load)", ("_find_and_load (", "PoseModel.__init__ (",
                                        "resolve_model (")),
]
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py", "wait (threading.py",
               "Future.result (", "TMonitor.run (")


def classify(frames: list[str]) -> str:
    if not frames or any(k in frames[-1] for k in IDLE_LEAVES):
        return "idle (waiting)"
    for frame in reversed(frames):
        for bucket, keys in BUCKETS:
            if any(k in frame for k in keys):
                return bucket
    return "other"


def py_spy(images: Path, ns: argparse.Namespace, rate: int = 250) -> dict | None:
    exe = Path(sys.executable).parent / "py-spy"
    spy = str(exe) if exe.exists() else shutil.which("py-spy")
    if not spy:
        return None
    work = Path(tempfile.mkdtemp(prefix="posebatch-pyspy-"))
    raw = work / "stacks.txt"
    cmd = [spy, "record", "--format", "raw", "--rate", str(rate), "--threads", "-o", str(raw),
           "--", sys.executable, "-m", "posebatch.cli", "run", str(images), "--out",
           str(work / "out"), "--no-progress", "--force", "--imgsz", str(ns.imgsz),
           *(["--rect"] if ns.rect else []), "--batch-size", str(ns.batch_size),
           "--intra-threads", str(ns.intra_threads), "--io-threads", str(ns.io_threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0 or not raw.exists():
            return {"error": proc.stderr[-1500:]}
        by_thread: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            thread = frames[0]
            group = ("main" if "MainThread" in thread else "decode pool" if "decode" in thread
                     else "write pool" if "write" in thread else "other threads")
            bucket = classify(frames[1:])
            by_thread[group][bucket] += int(count)
        result = {g: {b: round(c / rate, 2) for b, c in sorted(v.items(), key=lambda x: -x[1])}
                  for g, v in by_thread.items()}
        return {"seconds_by_thread_and_stage": result, "rate_hz": rate,
                "cli": next((ln for ln in proc.stdout.splitlines() if " img/s" in ln), ""),
                "note": "Python threads only; ORT's pool threads "
                "are native and not sampled"}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(p: dict, spy: dict | None, ns: argparse.Namespace) -> str:
    lines = [f"posebatch run, {p['images']} images, batch {ns.batch_size}, intra "
             f"{ns.intra_threads}, io {ns.io_threads}, rect {ns.rect}"
             + (f", ORT config {ns.ort_config}" if ns.ort_config else "")
             + (", mem_pattern off" if ns.no_mem_pattern else ""),
             f"  {p['img_per_s']} img/s ({p['run_job_s']} s), process CPU "
             f"{p['process_cpu_s']} s = {p['cores_busy']} cores busy, session.run "
             f"{100 * p['session_run_share_of_wall']:.0f}% of the main thread's wall, "
             f"peak RSS {p['max_rss_mb']} MB; other processes kept "
             f"{p['other_processes_cores']} cores busy",
             "",
             f"  {'stage':<12} {'wall s':>8} {'cpu s':>8} {'cpu ms/img':>11}  (threads)",
             ]
    where = {"read": "decode pool", "decode": "decode pool", "letterbox": "decode pool",
             "tensor": "decode pool", "session.run": "main (+ORT pool)", "postprocess": "main",
             "to_result": "main", "to_api": "main", "json": "main", "records": "main",
             "write": "write pool", "stack": "main"}
    for name, row in p["stages"].items():
        lines.append(f"  {name:<12} {row['wall_s']:>8.3f} {row['cpu_s']:>8.3f} "
                     f"{row['ms_per_image_cpu']:>11.2f}  ({where.get(name, '')})")
    if spy and "seconds_by_thread_and_stage" in spy:
        lines += ["", f"  py-spy, seconds sampled per Python thread group ({spy['cli']}):"]
        for group, buckets in spy["seconds_by_thread_and_stage"].items():
            lines.append(f"    {group}: " + ", ".join(f"{b} {s}" for b, s in buckets.items()))
    elif spy:
        lines += ["", f"  py-spy failed: {spy.get('error')}"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--intra-threads", type=int, default=0)
    ap.add_argument("--io-threads", type=int, default=2)
    ap.add_argument("--providers", default="auto")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--rect", action="store_true")
    ap.add_argument("--ort-config", action="append", default=[],
                    help="KEY=VALUE ONNX Runtime session config entry (experiment)")
    ap.add_argument("--no-mem-pattern", action="store_true",
                    help="SessionOptions.enable_mem_pattern = False (experiment)")
    ap.add_argument("--no-py-spy", action="store_true")
    ap.add_argument("--json", help="also write the figures to this file")
    ns = ap.parse_args()
    folder = make_corpus.ensure_corpus(ns.images)
    images = folder / "images"
    if ns.ort_config or ns.no_mem_pattern:
        apply_ort_experiments(ns.ort_config, False if ns.no_mem_pattern else None)
    spy = None if ns.no_py_spy or ns.ort_config or ns.no_mem_pattern else py_spy(images, ns)
    prof = instrumented(images, ns)
    print(render(prof, spy, ns))
    if ns.json:
        Path(ns.json).write_text(json.dumps({"instrumented": prof, "py_spy": spy}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
