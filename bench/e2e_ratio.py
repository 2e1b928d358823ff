"""How close ``posebatch run`` gets to the model alone, interleaved in one run (issue 16's ratio).

Three rates, each the best of ``--rounds`` interleaved rounds with the same runner configuration:
the model alone (``run_raw`` on ready batch-4 tensors), the engine on JPEG bytes in memory
(decode, letterbox, model, results), and ``posebatch run`` on the folder (its own timer, files and
JSON writes included). Usage::

    ../.venv/bin/python e2e_ratio.py FOLDER_OF_JPEGS [--backend openvino --precision bf16]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np  # noqa: E402
from common import ROOT  # noqa: F401  (puts the project on sys.path)

from posebatch.modelstore import resolve_model  # noqa: E402
from posebatch.settings import JobSettings, RuntimeSettings, from_env  # noqa: E402
from workers.engine.pipeline import PoseEngine  # noqa: E402
from workers.loading import open_model  # noqa: E402


def rate(fn, seconds: float) -> float:
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        n += fn()
    return n / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0)
    ns = ap.parse_args()
    rt = from_env(RuntimeSettings)
    path = str(resolve_model(None, rt.cache_dir).path)
    runner = open_model(RuntimeSettings(model=path, backend=ns.backend, precision=ns.precision,
                                        providers="cpu"))
    blobs = [p.read_bytes() for p in sorted(ns.folder.glob("*.jpg"))]
    x = np.random.default_rng(0).random((4, 3, 640, 640), np.float32)
    x = runner.as_input(x) if hasattr(runner, "as_input") else x  # the engine's batch dtype

    def model_alone() -> float:
        return rate(lambda: (runner.run_raw(x), 4)[1], ns.seconds)

    def engine() -> float:
        eng = PoseEngine(runner, JobSettings(), batch_size=4, io_threads=2)
        loaders = [lambda d=data: d for data in blobs]
        items = ((f"k{i}", loaders[i % len(loaders)]) for i in range(10**9))
        n, t = 0, time.perf_counter()
        for _ in eng.run(items):
            n += 1
            if time.perf_counter() - t > ns.seconds:
                break
        return n / (time.perf_counter() - t)

    def cli() -> float:
        with tempfile.TemporaryDirectory() as out:
            proc = subprocess.run([sys.executable, "-m", "posebatch.cli", "run", str(ns.folder),
                                   "--out", out, "--no-progress", "--backend", ns.backend,
                                   "--precision", ns.precision],
                                  capture_output=True, text=True, check=True)
        return float(re.search(r"\(([\d.]+) img/s\)", proc.stdout).group(1))

    best = {"model": 0.0, "engine": 0.0, "run": 0.0}
    for r in range(ns.rounds):
        for name, fn in (("model", model_alone), ("engine", engine), ("run", cli)):
            value = fn()
            best[name] = max(best[name], value)
            print(f"round {r}: {name} {value:.1f} img/s (load {os.getloadavg()[0]:.1f})",
                  file=sys.stderr)
    print(f"{runner.info.provider}: model {best['model']:.1f}, engine {best['engine']:.1f}, "
          f"run {best['run']:.1f} img/s; run/model {best['run'] / best['model']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
