"""GPU check: is the GPU worker correct, and does it keep a GPU busy? One table.

    model   the model alone, FP32 and fp16, at several batch sizes: ``PoseModel.run_raw`` on
            ready tensors (batch copied to the GPU each call, as the engine does) and the
            device alone (the bound buffers re-run, no copy); plus one run without CUDA graphs
    run     ``posebatch run`` end to end on generated 1080p JPEGs, per precision; for the last
            precision also with decode processes (``--decode-workers``), without the
            output tail (``POSEBATCH_OUTPUT_TAIL=0``: the whole head copied back), and with
            ``--decode cpu`` and ``--decode gpu`` (JPEG pixels by nvImageCodec)
    cluster one ``posebatch worker`` with local redis-server and SeaweedFS (bench/measure_cluster)
    agree   ``posebatch run`` on the dev images with each precision on the chosen provider,
            against the CPU provider's FP32 results (worst confident-keypoint distance, pixels),
            both with ``--decode cpu``

with GPU utilisation (NVML or nvidia-smi; "n/a" without either) sampled during each stage and
the CPU cores each stage kept busy. Results: ``bench/results/<date>-<host>-gpu-<provider>.md``
and ``.json``.

On a GPU machine: ``bash bench/gpu_check.sh`` (installs the carried wheels first; bench/README.md
"GPU check"). Dry run here, on the CPU provider (seconds, tiny corpus):

    .venv/bin/python bench/gpu_check.py --providers cpu --images 8 --batch-sizes 1,2 --batch 2 \
        --seconds 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import make_corpus
import numpy as np
from common import HERE, log  # noqa: E402  (sets sys.path for the project)
from gpustat import Gpu, Sampler
from host import machine_info
from measure_cluster import measure_cluster
from measure_local import measure_cli_run
from report import fmt

MODEL_DIR = HERE / "gpu" / "model"
STAGES = ("model", "run", "cluster", "agree")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--providers", default="auto", choices=["auto", "cpu", "cuda", "tensorrt"])
    ap.add_argument("--precisions", default="fp32,fp16")
    ap.add_argument("--batch-sizes", default="1,8,32,64,128", help="model alone")
    ap.add_argument("--batch", type=int, default=32, help="end to end and cluster batch size")
    ap.add_argument("--images", type=int, default=400, help="generated 1080p JPEGs")
    ap.add_argument("--io-threads", type=int, default=os.cpu_count() or 4,
                    help="decode threads (default: one per core)")
    ap.add_argument("--task-images", type=int, default=256, help="cluster: images per task")
    ap.add_argument("--seconds", type=float, default=3.0, help="model alone: per measurement")
    ap.add_argument("--model", help="FP32 ONNX model (default: the built default model)")
    ap.add_argument("--skip", action="append", default=[], choices=STAGES)
    ap.add_argument("--results", default=str(HERE / "results"))
    ns = ap.parse_args()
    ns.precisions = ns.precisions.split(",")
    ns.batch_sizes = [int(b) for b in ns.batch_sizes.split(",")]
    return ns


def model_copies(ns: argparse.Namespace) -> dict[str, Path]:
    """The FP32 model copied to bench/gpu/model/ (writable; the cache may not be) and its fp16
    copy made beside it, once."""
    from posebatch.modelstore import fp16_path, resolve_model
    from posebatch.settings import RuntimeSettings, from_env
    from workers.tools.fp16 import convert_fp16

    cache = from_env(RuntimeSettings).cache_dir
    src = Path(ns.model) if ns.model else resolve_model(None, cache).path
    fp32 = MODEL_DIR / src.name
    if not fp32.is_file() or fp32.stat().st_size != src.stat().st_size:
        MODEL_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, fp32)
        fp16_path(fp32).unlink(missing_ok=True)
    if not fp16_path(fp32).is_file():
        convert_fp16(fp32)
    return {"fp32": fp32, "fp16": fp16_path(fp32)}


def timed(fn, seconds: float) -> tuple[float, int]:
    """Median seconds per call of ``fn`` over >= ``seconds`` (>= 3 calls), and the call count."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), len(times)


def model_alone(path: Path, precision: str, batch: int, ns: argparse.Namespace, gpu: Gpu,
                graph: bool | None = None) -> dict[str, Any]:
    from workers.engine.providers import CUDA
    from workers.engine.runner import PoseModel

    model = PoseModel(str(path), ns.providers, precision=precision, fixed_shape_session=graph)
    x = model.as_input(np.random.default_rng(0).random((batch, 3, 640, 640), dtype=np.float32))
    for _ in range(3):  # warm-up: cuDNN algorithm choice, CUDA graph capture
        model.run_raw(x)
    cpu0 = os.times()
    with Sampler(gpu) as s:
        per_call, calls = timed(lambda: model.run_raw(x), ns.seconds)
    cpu1 = os.times()
    row = {"stage": "model alone", "precision": precision, "batch": batch,
           "img_per_s": batch / per_call, "provider": model.info.provider,
           "cpu_cores": ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system))
           / (per_call * calls), **s.summary(),
           "notes": "batch copied to the device each call" if model.io_binding else "session.run"}
    shape = tuple(x.shape)
    runner = model._fixed if model._fixed is not None and model._fixed.shape == shape else (
        model._bound.get(shape))
    if runner is not None:  # the device alone: re-run the bound buffers, no host copy
        with Sampler(gpu) as s2:
            per_call, _ = timed(lambda: runner.session.run_with_iobinding(
                runner.binding, runner._later), ns.seconds / 2)
        row["device_img_per_s"] = batch / per_call
        row["device_gpu_busy_pct"] = s2.summary()["gpu_busy_pct"]
        row["cuda_graph"] = runner is model._fixed and model.info.provider == CUDA
    if model.tail:  # the head's best columns copied back instead of all of it, then decoded
        with Sampler(gpu) as s3:
            per_call, _ = timed(lambda: model.run_head(x).persons(batch, 0.05, 0.6, 300),
                                ns.seconds / 2)
        row["tail_img_per_s"] = batch / per_call
        row["tail_gpu_busy_pct"] = s3.summary()["gpu_busy_pct"]
    return row


def run_ns(ns: argparse.Namespace, precision: str) -> argparse.Namespace:
    """The namespace bench/measure_local and bench/measure_cluster read their settings from."""
    return argparse.Namespace(batch_size=ns.batch, intra_threads=0, io_threads=ns.io_threads,
                              providers=ns.providers, precision=precision, imgsz=640,
                              rect=False, task_images=ns.task_images, repeat=1,
                              model=str(ns.model_paths["fp32"]))  # precision picks the copy


def end_to_end(images: Path, n: int, ns: argparse.Namespace, precision: str, gpu: Gpu,
               work: Path, variant: str = "", flags: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> dict[str, Any]:
    run = run_ns(ns, precision)
    run.extra_flags, run.extra_env = list(flags), env or {}
    with Sampler(gpu) as s:
        r = measure_cli_run(images, n, run, work)
    return {"stage": f"posebatch run{', ' + variant if variant else ''}", "precision": precision,
            "batch": ns.batch,
            "img_per_s": r["img_per_s"], "cpu_cores": r["cores_busy"], **s.summary(),
            "notes": f"{n} 1080p JPEGs, {ns.io_threads} decode threads; CPU over the whole "
                     f"process (start-up included), peak RSS {r['peak_rss_mb']:.0f} MB",
            "command": r["command"]}


def cluster(images: Path, files: list[Path], ns: argparse.Namespace, precision: str, gpu: Gpu,
            work: Path) -> dict[str, Any]:
    with Sampler(gpu) as s:
        r = measure_cluster(images, files, run_ns(ns, precision), work)
    cpu = r["cpu_s_by_process"]
    return {"stage": "cluster, 1 worker", "precision": precision, "batch": ns.batch,
            "img_per_s": r["img_per_s"], "cpu_cores": cpu["worker"] / r["seconds"], **s.summary(),
            "notes": f"{r['done']} done, {r['failed']} failed; tasks of {ns.task_images}; weed "
                     f"{cpu['weed (S3)'] / r['seconds']:.2f} cores, redis "
                     f"{cpu['redis'] / r['seconds']:.2f} cores"}


def persons(result: dict[str, Any], min_score: float = 0.25) -> list[np.ndarray]:
    out = []
    for p in result.get("person_info", []):
        if p["location"]["score"] >= min_score:
            out.append(np.array([[v["x"], v["y"], v["score"]] for v in p["body_parts"].values()]))
    return out


def compare(ref: Path, other: Path, images: Path) -> dict[str, Any]:
    """Worst distance of a confident keypoint (score >= 0.5) of a confident person (box score
    >= 0.25) to its nearest counterpart in ``other``: in the image's pixels, and in model-input
    pixels (x 640 / the long side: what the network itself resolves)."""
    from PIL import Image

    worst, worst_model, n_persons, n_images, missing = 0.0, 0.0, 0, 0, 0
    for path in sorted(ref.rglob("*.json")):
        if path.name.startswith("_"):
            continue
        n_images += 1
        rel = path.relative_to(ref)
        with Image.open(images / str(rel)[: -len(".json")]) as im:
            to_model = 640 / max(im.size)
        theirs = persons(json.loads((other / rel).read_text()), 0.0)
        for mine in persons(json.loads(path.read_text())):
            sure = mine[:, 2] >= 0.5
            if not sure.any():
                continue
            n_persons += 1
            if not theirs:
                missing += 1
                continue
            d = min(float(np.abs(t[sure, :2] - mine[sure, :2]).max()) for t in theirs)
            worst, worst_model = max(worst, d), max(worst_model, d * to_model)
    return {"images": n_images, "persons": n_persons, "missing": missing,
            "worst_px": round(worst, 3), "worst_model_px": round(worst_model, 3)}


def agreement(ns: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from posebatch.devdata import dev_data_dir

    dev = dev_data_dir()
    if dev is None:
        raise RuntimeError("no dev set (POSEBATCH_DEV_DATA)")
    images = dev / "images"
    n = sum(1 for p in images.rglob("*") if p.is_file())
    outs = {}
    for label, providers, precision in [("ref", "cpu", "fp32"),
                                        *((p, ns.providers, p) for p in ns.precisions)]:
        sub = argparse.Namespace(**{**vars(run_ns(ns, precision)), "providers": providers,
                                    "batch_size": 4 if providers == "cpu" else ns.batch})
        # The CPU decoder on both sides: this row is about precision, and --decode gpu (auto's
        # choice on a GPU) moves pixels of its own (README "GPU decode").
        sub.extra_flags = ["--decode", "cpu"]
        folder = work / f"agree-{label}"
        measure_cli_run(images, n, sub, folder.parent)
        shutil.move(work / "run-out", folder)
        outs[label] = folder
    return [{"stage": "agree with CPU FP32", "precision": p, "batch": ns.batch,
             **compare(outs["ref"], outs[p], images)} for p in ns.precisions]


def render(r: dict[str, Any]) -> str:
    m, g = r["machine"], r["gpu"]
    lines = [f"# GPU check, {r['date']}", "",
             f"- GPU: {g.get('gpu')} (driver {g.get('driver', '-')}, "
             f"{g.get('memory_mib', '-')} MiB; utilisation from {g.get('sampled_with')})",
             f"- host: {m['host']}, {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GB",
             f"- onnxruntime {m['onnxruntime']}, providers {', '.join(m['ort_providers'])}; "
             f"TensorRT libraries: {r['tensorrt']}; asked for --providers {r['providers']}",
             f"- command: `{r['command']}`; load average at the start {r['loadavg']:.2f}", "",
             "| stage | precision | batch | img/s | device alone img/s | GPU busy % | "
             "GPU mem MiB | CPU cores | notes |", "| --- | --- | --- | --- | --- | --- | --- | "
             "--- | --- |"]
    for row in r["rows"]:
        if row["stage"].startswith("agree"):
            notes = (f"{row['images']} dev images, {row['persons']} persons, "
                     f"{row['missing']} missing; worst confident keypoint "
                     f"{row['worst_px']} image px = {row['worst_model_px']} model px")
            lines.append(f"| {row['stage']} | {row['precision']} | - | - | - | - | - | - | "
                         f"{notes} |")
            continue
        busy = "n/a" if row.get("gpu_busy_pct") is None else fmt(row["gpu_busy_pct"])
        mem = "n/a" if row.get("gpu_mem_peak_mib") is None else str(row["gpu_mem_peak_mib"])
        graph = " (CUDA graph)" if row.get("cuda_graph") else ""
        if row.get("tail_img_per_s") is not None:
            row["notes"] = (f"{row.get('notes', '')}; with the output tail (best columns "
                            f"copied back, decoded) {fmt(row['tail_img_per_s'])} img/s, GPU "
                            f"busy {fmt(row.get('tail_gpu_busy_pct'))} %")
        lines.append(f"| {row['stage']}{graph} | {row['precision']} | {row['batch']} | "
                     f"{fmt(row['img_per_s'])} | {fmt(row.get('device_img_per_s'))} | {busy} | "
                     f"{mem} | {fmt(row.get('cpu_cores'), 2)} | {row.get('notes', '')} |")
    if r["errors"]:
        lines += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in r["errors"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    ns = parse_args()
    started = datetime.now(UTC)
    gpu = Gpu()
    import onnxruntime as ort

    from workers.engine.providers import preload_cuda_libraries, tensorrt_libraries_present

    preload_cuda_libraries(ort, ort.get_available_providers())

    r: dict[str, Any] = {"date": started.strftime("%Y-%m-%d %H:%M UTC"),
                         "machine": machine_info(), "gpu": gpu.info(),
                         "tensorrt": "present" if tensorrt_libraries_present() else "absent",
                         "providers": ns.providers, "command": " ".join(sys.argv),
                         "rows": [], "errors": {}, "loadavg": os.getloadavg()[0]}
    ns.model_paths = model_copies(ns)
    work = Path(tempfile.mkdtemp(prefix="posebatch-gpu-"))

    def stage(key: str, fn, *args) -> None:
        log(f"{key} ...")
        try:
            out = fn(*args)
        except Exception as err:  # one failed stage must not lose the others' figures
            log(f"{key} FAILED: {type(err).__name__}: {err}")
            r["errors"][key] = f"{type(err).__name__}: {err}"[:2000]
            return
        r["rows"] += out if isinstance(out, list) else [out]

    try:
        if "model" not in ns.skip:
            for p in ns.precisions:
                for b in ns.batch_sizes:
                    stage(f"model {p} b{b}", model_alone, ns.model_paths[p], p, b, ns, gpu)
            if ns.providers != "cpu":  # the same with the CUDA graph off, to see what it gives
                stage(f"model {ns.precisions[-1]} b{ns.batch} no graph", model_alone,
                      ns.model_paths[ns.precisions[-1]], ns.precisions[-1], ns.batch, ns, gpu,
                      False)
        if "run" not in ns.skip or "cluster" not in ns.skip:
            folder = make_corpus.ensure_corpus(ns.images, sizes=((1920, 1080),), portrait_share=0)
            images = folder / "images"
            files = sorted(p for p in images.rglob("*.jpg"))
        if "run" not in ns.skip:
            for p in ns.precisions:
                stage(f"run {p}", end_to_end, images, len(files), ns, p, gpu, work)
            last, procs = ns.precisions[-1], str(max(2, (os.cpu_count() or 4) - 2))
            stage(f"run {last} decode processes", end_to_end, images, len(files), ns, last, gpu,
                  work, f"{procs} decode processes", ("--decode-workers", procs))
            stage(f"run {last} no tail", end_to_end, images, len(files), ns, last, gpu, work,
                  "no output tail", (), {"POSEBATCH_OUTPUT_TAIL": "0"})
            for decode in ("cpu", "gpu"):  # JPEG pixels by libjpeg-turbo / nvImageCodec
                stage(f"run {last} {decode} decode", end_to_end, images, len(files), ns, last,
                      gpu, work, f"--decode {decode}", ("--decode", decode))
        if "cluster" not in ns.skip:
            stage("cluster", cluster, images, files, ns, ns.precisions[-1], gpu, work)
        if "agree" not in ns.skip:
            stage("agree", agreement, ns, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(r)
    print(text)
    out = Path(ns.results)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{started.strftime('%Y-%m-%d')}-{r['machine']['host']}-gpu-{ns.providers}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
    log(f"written {out / stem}.md and .json")
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
