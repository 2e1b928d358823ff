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
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import make_corpus  # noqa: E402
from common import HERE, best_of, log  # noqa: E402  (sets sys.path for the project)
from host import gflops_probe, machine_info  # noqa: E402
from measure_cluster import measure_cluster  # noqa: E402
from measure_local import corpus_shapes, measure_cli_run, measure_decode, measure_model  # noqa: E402
from measure_peer import measure_peer, model_gflops  # noqa: E402
from procstat import machine_busy_s, own_cpu_s  # noqa: E402
from report import fmt, ratio, render  # noqa: E402

# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200, help="corpus size (default 200)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--intra-threads", type=int, default=0,
                    help="ONNX Runtime intra-op threads (0: its default, one per core)")
    ap.add_argument("--io-threads", type=int, default=2, help="decode threads")
    ap.add_argument("--providers", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--backend", default="auto", choices=["auto", "ort", "openvino"],
                    help="backend of (b) and (c); (a) measures every installed backend")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
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
                    choices=["a", "decode", "b", "c", "d", "sizes", "probe"],
                    help="repeatable; sizes: (b) and (d) per image size")
    ap.add_argument("--results", default=str(HERE / "results"))
    return ap.parse_args()


def main() -> int:
    ns = parse_args()
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
                                                  "providers", "backend", "precision", "imgsz",
                                                  "rect", "det_conf",
                                                  "nms_iou", "task_images")},
        "model": {"path": str(model.path), "sha256": model.sha256},
        "corpus": {"folder": str(folder), "description": make_corpus.describe(folder),
                   "shapes": {f"{h}x{w}": c for (h, w), c in sorted(shapes.items())}},
        "errors": {}, "background_cores": {}, "loadavg_at_start": os.getloadavg()[0],
    }
    if r["loadavg_at_start"] > 0.5:
        log(f"warning: load average {r['loadavg_at_start']:.2f} before the run; figures are "
            "only comparable on an otherwise idle machine")
    run_stages(r, ns, model.path, images, files, shapes, peer_python)
    r["headline"] = headline(r)
    text = render(r)
    print(text)
    write_results(r, text, ns, started)
    return 1 if r["errors"] else 0


def run_stages(r: dict[str, Any], ns: argparse.Namespace, model_path: Path, images: Path,
               files: list[Path], shapes: Counter, peer_python: str | None) -> None:
    """Every measurement in one run, each timed against the load other processes add."""
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
        a_args = (str(model_path), shapes, ns.batch_size, ns.intra_threads, ns.providers,
                  ns.model_seconds)
        r["a_backends"] = {}
        for name, (backend, precision) in model_backends().items():
            r["a_backends"][name] = stage(f"a-{name}", measure_model, *a_args, backend,
                                          precision)
        a1 = stage("a", measure_model, *a_args, ns.backend, ns.precision)
        r["decode"] = stage("decode", measure_decode, files, ns.imgsz, ns.rect, ns.io_threads)
        r["b"] = stage("b", best_of, ns.repeat, measure_cli_run, images, len(files), ns, work)
        r["c"] = stage("c", measure_cluster, images, files, ns, work)
        if peer_python:
            r["d"] = stage("d", measure_peer, peer_python, files, ns, work)
            r["by_size"] = by_size(stage, ns, images, files, peer_python, work)
        a2 = stage("a", measure_model, *a_args, ns.backend, ns.precision)  # drift check
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


def by_size(stage, ns: argparse.Namespace, images: Path, files: list[Path],
            peer_python: str, work: Path) -> dict[str, Any]:
    """(b) and (d) again on each size folder of the corpus (1080p frames, 12 MP photos): the
    ratio to Ultralytics depends on the size, since decoding a 12 MP photo costs more than the
    model."""
    out: dict[str, Any] = {}
    if "sizes" in ns.skip:
        return out
    for folder in sorted(p for p in images.iterdir() if p.is_dir()):
        sized = [f for f in files if f.parent == folder]
        if not sized or len(sized) == len(files):
            continue  # one size only: the rows above are it
        out[folder.name] = {
            "images": len(sized),
            "b": stage(f"b-{folder.name}", best_of, ns.repeat, measure_cli_run, folder,
                       len(sized), ns, work),
            "d": stage(f"d-{folder.name}", measure_peer, peer_python, sized, ns, work),
        }
    return out


def model_backends() -> dict[str, tuple[str, str]]:
    """Every backend and precision installed here, for the model-alone rows."""
    from workers.engine.backends import openvino_available

    out = {"ort-fp32": ("ort", "fp32")}
    if openvino_available():
        from workers.engine.runner_openvino import cpu_has_bf16

        out["openvino-fp32"] = ("openvino", "fp32")
        if cpu_has_bf16():
            out["openvino-bf16"] = ("openvino", "bf16")
    return out


def headline(r: dict[str, Any]) -> dict[str, Any]:
    a_rate = (r.get("a") or {}).get("img_per_s")
    b_rate = (r.get("b") or {}).get("img_per_s")
    c_rate = (r.get("c") or {}).get("img_per_s")
    d_rate = max((p["img_per_s"] for p in (r.get("d") or {}).values()), default=None)
    return {"b/a": ratio(b_rate, a_rate), "c/a": ratio(c_rate, a_rate),
            "b/d": ratio(b_rate, d_rate),
            "worker_rss_mb": (r.get("c") or {}).get("worker_child_peak_rss_mb")}


def write_results(r: dict[str, Any], text: str, ns: argparse.Namespace,
                  started: datetime) -> None:
    """``results/<date>-<host>[-<non-default settings>].md`` and ``.json``."""
    machine = r["machine"]
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


if __name__ == "__main__":
    sys.exit(main())
