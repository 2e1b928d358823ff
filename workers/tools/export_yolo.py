"""Export a YOLO-pose ``.pt`` to ONNX. Runs inside the *build* environment (torch + ultralytics).

Why a separate script run with another interpreter: the exporter pulls in torch, torchvision and
ultralytics (about 6 GB); a worker needs none of that, so ``posebatch model build`` calls this file
with the build environment's Python and keeps the worker's own environment small. It imports
nothing from this project, so it runs in an environment where posebatch is not installed.

Usage: python export_yolo.py WEIGHTS.pt OUT.onnx [--imgsz 640] [--opset 17]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights")
    parser.add_argument("out")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)

    os.environ.setdefault("YOLO_OFFLINE", "1")  # never reach a hub, even for fonts or checks
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory() as tmp:
        # Ultralytics writes the ONNX next to the weights; work on a copy so the source stays clean.
        pt = os.path.join(tmp, os.path.basename(args.weights))
        shutil.copyfile(args.weights, pt)
        model = YOLO(pt, task="pose")
        # dynamic=True: batch, height and width are all symbolic, so one file serves any batch size
        # and rectangular letterbox shapes. NMS stays outside the graph (we do it in numpy).
        exported = model.export(
            format="onnx", imgsz=args.imgsz, dynamic=True, simplify=True, opset=args.opset,
            half=False, nms=False, device="cpu",
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp_out = args.out + ".tmp"
        shutil.copyfile(exported, tmp_out)
        os.replace(tmp_out, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
