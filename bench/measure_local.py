"""Measurements in this process or one CLI subprocess: (a) the model alone, decode only,
(b) ``posebatch run`` end to end."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from common import CLI, ROOT
from procstat import run_measured

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
                  min_seconds: float, backend: str = "ort",
                  precision: str = "auto") -> dict[str, Any]:
    """The runner on ready random tensors, batch by batch, per input shape, >= min_seconds
    each; images/s over the corpus' shape mix = N / sum(count_shape / rate_shape)."""
    from posebatch.settings import RuntimeSettings
    from workers.loading import open_model

    model = open_model(RuntimeSettings(model=model_path, providers=providers, intra_threads=intra,
                                       backend=backend, precision=precision))
    rng = np.random.default_rng(0)
    rates, cpu_ms = {}, {}
    for (h, w), _count in sorted(shapes.items()):
        x = rng.random((batch, 3, h, w), dtype=np.float32)
        if hasattr(model, "as_input"):  # the batch the engine gives it (uint8 channels-last)
            x = model.as_input(x)
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
    optional = [(f"--{name}", getattr(ns, name, None))
                for name in ("precision", "model", "backend")]
    return ["--batch-size", str(ns.batch_size), "--intra-threads", str(ns.intra_threads),
            "--io-threads", str(ns.io_threads), "--providers", ns.providers,
            *(x for flag, value in optional if value for x in (flag, str(value))),
            *getattr(ns, "extra_flags", [])]


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
    res = run_measured(cmd, env={**clean_env(), **getattr(ns, "extra_env", {})}, cwd=ROOT,
                       work=work)
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
