"""The host side's ceiling: ``posebatch run`` with a model that costs nothing (issue 20).

With ``null.onnx`` (bench/null_model.py: the default model's layout, a fixed answer of 6 persons)
every CPU cycle of the run is the host's own work: read, decode, letterbox, copies,
post-processing, JSON and writes. Each corpus is run with N and 3N images (fresh output, the
real CLI as a subprocess, its CPU from wait4()); the steady state is the difference, so start-up
(imports, model load, listing, summary) cancels out:

    img/s = 2N / (wall_3N - wall_N)      CPU ms/img = (cpu_3N - cpu_N) / 2N
    cores busy = (cpu_3N - cpu_N) / (wall_3N - wall_N)

The 3N run's stage timers (``-vv``: the engine's ``stages:`` log line) are printed beside.
``--variant`` runs the same corpora with other flags, interleaved run by run with the others
(the host is shared: drift between windows hits every variant alike), e.g. threads vs decode
processes:

    python host_ceiling.py [--sizes 640x360,1920x1080] [--n 1000,300] [--repeat 3] [--json F]
        [--model M.onnx] [--variant "--decode-workers 0" --variant "--decode-workers 2"]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import make_corpus
import null_model
from common import CLI, ROOT, log
from procstat import machine_busy_s, run_measured

STAGE_LINE = re.compile(r"stages: (\{.*\})")


def corpus(n: int, size: tuple[int, int]) -> Path:
    """``n`` generated JPEGs of ``size`` (w, h), cached by make_corpus."""
    return make_corpus.ensure_corpus(n, sizes=(size,), quiet=True) / "images"


def run_once(images: Path, model: Path, extra: list[str], work: Path, root: Path = ROOT
             ) -> dict[str, Any]:
    """One ``posebatch run`` of the checkout at ``root`` (another one: a "before" figure)."""
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [*CLI, "-vv", "run", str(images), "--out", str(out), "--model", str(model),
           "--backend", "ort", "--force", "--no-progress", *extra]
    busy0, t0 = machine_busy_s(), time.perf_counter()
    r = run_measured(cmd, env=env, cwd=root, work=work)
    machine = (machine_busy_s() - busy0) / (time.perf_counter() - t0)
    if r["rc"] != 0:
        raise SystemExit(f"posebatch run failed ({r['rc']}):\n{r['stderr'][-3000:]}")
    stages = STAGE_LINE.findall(r["stderr"])
    return {"wall": r["wall"], "cpu": r["cpu"], "peak_rss_mb": r["peak_rss_mb"],
            "machine_cores_busy": machine,
            "stages": json.loads(stages[-1]) if stages else None}


def steady(n: int, small: dict[str, Any], big: dict[str, Any]) -> dict[str, Any]:
    dw, dc = big["wall"] - small["wall"], big["cpu"] - small["cpu"]
    return {"img_per_s": 2 * n / dw, "cpu_ms_per_img": 1000 * dc / (2 * n),
            "cores_busy": dc / dw, "wall_n": small["wall"], "wall_3n": big["wall"],
            "others_cores": max(0.0, big["machine_cores_busy"] - big["cpu"] / big["wall"]),
            "stages_3n": big["stages"]}


def measure(size: tuple[int, int], n: int, repeat: int, model: Path, extra: list[str],
            roots: list[Path], variants: list[str] | None = None,
            out_dir: Path | None = None) -> list[dict[str, Any]]:
    """Best of ``repeat`` N/3N pairs per checkout in ``roots`` and flag variant, interleaved
    run by run; the results are written below ``out_dir`` (default: the system's temp dir)."""
    small_dir, big_dir = corpus(n, size), corpus(3 * n, size)
    combos = [(root, v) for root in roots for v in (variants or [""])]
    runs: dict[tuple[Path, str], list[dict[str, Any]]] = {c: [] for c in combos}
    with tempfile.TemporaryDirectory(prefix="host-ceiling-", dir=out_dir) as tmp:
        work = Path(tmp)
        for i in range(repeat):
            for root, variant in combos:
                flags = [*extra, *variant.split()]
                s = run_once(small_dir, model, flags, work, root)
                b = run_once(big_dir, model, flags, work, root)
                rs = runs[(root, variant)]
                rs.append(steady(n, s, b))
                log(f"{root.name} {variant} {size[0]}x{size[1]} run {i + 1}: "
                    f"{rs[-1]['img_per_s']:.0f} img/s, {rs[-1]['cpu_ms_per_img']:.2f} CPU ms/img")
    out = []
    for (root, variant), rs in runs.items():
        best = max(rs, key=lambda r: r["img_per_s"])
        out.append({**best, "root": str(root), "variant": variant,
                    "size": f"{size[0]}x{size[1]}", "n": n,
                    "all_img_per_s": [round(r["img_per_s"], 1) for r in rs],
                    "all_cpu_ms_per_img": [round(r["cpu_ms_per_img"], 2) for r in rs]})
    return out


def stage_table(stages: dict[str, Any] | None) -> str:
    if not stages:
        return "  (no stage timers in this version's log)\n"
    images = max(1, int(stages.get("images", 1)))
    rows = [f"  {name:<10} {1000 * sec / images:7.3f} ms/img"
            for name, sec in stages.get("seconds", {}).items()]
    if "model_thread_cpu_ms_per_image" in stages:
        rows.append(f"  model thread: {stages['model_thread_ms_per_image']:.3f} ms/img wall, "
                    f"{stages['model_thread_cpu_ms_per_image']:.3f} ms/img CPU")
    return "\n".join(rows) + "\n"


def host() -> str:
    name = "?"
    flags = ""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name") and name == "?":
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    amx = "AMX yes" if "amx_bf16" in flags else "AMX no"
    return f"{name}, {os.cpu_count()} cores, {amx}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="640x360,1920x1080")
    ap.add_argument("--n", default="1000,300", help="N per size (3N is run too)")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many N/3N pairs")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--also", action="append", default=[], type=Path,
                    help="another checkout to run the same way, interleaved (e.g. main's)")
    ap.add_argument("--uint8", action="store_true",
                    help="null-u8.onnx: a uint8 input, so no scaling to float is counted")
    ap.add_argument("--model", type=Path,
                    help="another model instead of the null one (the real model: its path)")
    ap.add_argument("--variant", action="append", default=[],
                    help="extra flags for posebatch run, one variant per use (interleaved)")
    ap.add_argument("--out-dir", type=Path,
                    help="where the runs write their results (default: the temp dir); "
                    "/dev/shm leaves the file system's own cost per file out")
    ap.add_argument("args", nargs="*", help="more flags for posebatch run (after --)")
    ns = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in ns.sizes.split(",")]
    ns_ = [int(v) for v in ns.n.split(",")]
    model = ns.model or (null_model.ensure(null_model.HERE / "null-u8.onnx", uint8=True)
                         if ns.uint8 else null_model.ensure())
    print(f"model: {model.name}")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"host: {host()}\nuptime before: {load}")
    print(f"results written below: {ns.out_dir or tempfile.gettempdir()}")
    results = []
    for size, n in zip(sizes, ns_, strict=True):
        for r in measure(size, n, ns.repeat, model, ns.args, [ROOT, *ns.also], ns.variant,
                         ns.out_dir):
            results.append(r)
            print(f"{r['root']} {r['variant']} {r['size']} (N = {n}): "
                  f"{r['img_per_s']:.0f} img/s steady, "
                  f"{r['cpu_ms_per_img']:.2f} CPU ms/img, {r['cores_busy']:.2f} cores busy "
                  f"(others {r['others_cores']:.2f}); all runs {r['all_img_per_s']} img/s, "
                  f"{r['all_cpu_ms_per_img']} ms")
            print(stage_table(r["stages_3n"]), end="")
    print(f"uptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout}",
          end="")
    if ns.json:
        Path(ns.json).write_text(json.dumps({"host": host(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
