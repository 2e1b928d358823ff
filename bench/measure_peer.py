"""(d) The peer: Ultralytics' own predict on the same files with the same .pt weights."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from common import FALLBACK_GFLOPS_640, HERE, best_of, log
from measure_local import clean_env
from procstat import run_measured

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
