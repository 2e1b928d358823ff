"""The GPU check (issue 15): one table of what a GPU worker does, from one short command.

    sh bench/gpu_check.sh              # on a GPU machine: installs from bench/wheels, then this
    python bench/gpu_check.py --dry-run  # anywhere: the same steps on the CPU provider, tiny sizes

Rows: the model alone in FP32 and fp16 at several batch sizes; ``posebatch run`` end to end on
generated 1920x1080 JPEGs (decode on CPU threads; GPU decode is not built yet, its row says so);
one cluster worker with local Redis and SeaweedFS. For each: images/s, the GPU's mean and median
utilisation while it ran (nvidia-smi, sampled every 200 ms) and the CPU the process used. The
model must already be built (the GPU machine has no torch): carry ``~/.cache/posebatch`` along
or point ``POSEBATCH_CACHE`` at a copy. Results go to ``bench/results/<date>-gpu-<host>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import make_corpus  # noqa: E402
from common import HERE, log  # noqa: F401  (common puts the project on sys.path)
from host import machine_info  # noqa: E402
from measure_cluster import measure_cluster  # noqa: E402
from measure_local import measure_cli_run, measure_model  # noqa: E402


class GpuSampler:
    """nvidia-smi's utilisation.gpu every 200 ms in a thread; empty when there is no nvidia-smi."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        exe = shutil.which("nvidia-smi")
        if exe:
            self._proc = subprocess.Popen(
                [exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append(float(line.split(",")[0]))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)

    def summary(self) -> str:
        if not self.samples:
            return "n/a (no nvidia-smi)"
        s = sorted(self.samples)
        return f"mean {sum(s) / len(s):.0f} %, median {s[len(s) // 2]:.0f} %"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU provider, batches 1 and 2, 8 images: checks every step runs")
    ap.add_argument("--images", type=int, default=400, help="1080p corpus size (default 400)")
    ap.add_argument("--batches", default="1,8,32,64", help="model-alone batch sizes")
    ap.add_argument("--batch-size", type=int, default=32, help="batch of the end-to-end runs")
    ap.add_argument("--io-threads", type=int, default=0, help="decode threads (0: one per core)")
    ap.add_argument("--model-seconds", type=float, default=5.0)
    ap.add_argument("--task-images", type=int, default=100)
    ap.add_argument("--skip", action="append", default=[], choices=["model", "run", "cluster"])
    ap.add_argument("--results", default=str(HERE / "results"))
    ns = ap.parse_args()
    ns.providers = "cpu" if ns.dry_run else "cuda"
    if ns.dry_run:
        ns.images, ns.batches, ns.batch_size, ns.model_seconds = 8, "1,2", 2, 0.5
        ns.task_images = 4
    ns.io_threads = ns.io_threads or os.cpu_count() or 1
    # What measure_cli_run / measure_cluster read from the bench's namespace.
    ns.intra_threads, ns.imgsz, ns.rect, ns.repeat = 0, 640, False, 1
    ns.backend = "ort"
    return ns


def main() -> int:
    ns = parse_args()
    from posebatch.modelstore import resolve_model
    from posebatch.settings import RuntimeSettings, from_env

    started = datetime.now(UTC)
    model = resolve_model(None, from_env(RuntimeSettings).cache_dir)
    folder = make_corpus.ensure_corpus(ns.images, sizes=((1920, 1080),))
    images = folder / "images"
    files = sorted(p for p in images.rglob("*.jpg"))
    rows: list[tuple[str, str, str, str]] = []
    work = Path(tempfile.mkdtemp(prefix="posebatch-gpucheck-"))

    def measured(name: str, fn, *args) -> None:
        log(f"{name} ...")
        cpu0 = os.times()
        with GpuSampler() as gpu:
            try:
                out: dict[str, Any] = fn(*args)
            except Exception as err:  # one failed row must not lose the others
                rows.append((name, "FAILED", gpu.summary(), f"{type(err).__name__}: {err}"[:300]))
                return
        cpu1 = os.times()
        cpu = sum(getattr(cpu1, f) - getattr(cpu0, f)
                  for f in ("user", "system", "children_user", "children_system"))
        if isinstance(out.get("cpu_s_by_process"), dict):  # the worker's processes, not ours
            cpu = sum(v for v in out["cpu_s_by_process"].values() if isinstance(v, int | float))
        seconds = out.get("seconds")
        share = f" = {cpu / seconds:.2f} cores" if seconds else ""
        rows.append((name, f"{out['img_per_s']:.1f}", gpu.summary(),
                     f"CPU {cpu:.1f} s{share}; {out.get('provider') or ''}"))

    try:
        shapes = Counter({(640, 640): 1})
        if "model" not in ns.skip:
            for precision in ("f32", "fp16"):
                for b in (int(x) for x in ns.batches.split(",")):
                    measured(f"model alone {precision}, batch {b}", measure_model,
                             str(model.path), shapes, b, 0, ns.providers, ns.model_seconds,
                             "ort", precision)
        if "run" not in ns.skip:
            for precision in ("f32", "fp16"):
                ns.precision = precision
                measured(f"posebatch run, {precision}, CPU decode ({ns.io_threads} threads)",
                         measure_cli_run, images, len(files), ns, work)
            rows.append(("posebatch run, GPU decode (nvImageCodec)", "not built", "-",
                         "issue 15 item 2: decode on the GPU is not implemented yet"))
        if "cluster" not in ns.skip:
            ns.precision = "auto"
            measured("cluster: 1 worker, local Redis + SeaweedFS", measure_cluster, images,
                     files, ns, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = machine_info()
    text = "\n".join([
        f"# GPU check, {started:%Y-%m-%d %H:%M} UTC on {socket.gethostname()}"
        + (" (DRY RUN: CPU provider)" if ns.dry_run else ""), "",
        f"- machine: {m['cpu']}, {m['cores']} cores; GPU: {gpu_name()}",
        f"- onnxruntime {m['onnxruntime']}, providers {m['ort_providers']}",
        f"- model {model.path} (sha256 {model.sha256[:12]}); corpus {len(files)} x 1920x1080",
        f"- command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}", "",
        "| measurement | img/s | GPU utilisation | notes |", "| --- | --- | --- | --- |",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows), ""])
    print(text)
    out_dir = Path(ns.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{started:%Y-%m-%d}-gpu-{socket.gethostname()}{'-dryrun' if ns.dry_run else ''}.md"
    (out_dir / name).write_text(text)
    log(f"written {out_dir / name}")
    return 1 if any(r[1] == "FAILED" for r in rows) else 0


def gpu_name() -> str:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return "none found (nvidia-smi missing)"
    proc = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version",
                           "--format=csv,noheader"], capture_output=True, text=True)
    return proc.stdout.strip() or proc.stderr.strip()


if __name__ == "__main__":
    sys.exit(main())
