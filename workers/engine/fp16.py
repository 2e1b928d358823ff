"""The fp16 copy of a model for GPUs: converted once, cached beside the FP32 file.

Why convert at load time instead of exporting twice: any FP32 ONNX a user passes gets its fp16
copy the same way, and the copy is tied to the FP32 file's sha256 (a sidecar ``.json``), so a
rebuilt model is never paired with a stale copy. Inputs and outputs stay float32 (casts inside
the graph), so the pipeline feeds both the same tensors.

Measured on the dev images (ORT CPU provider, which runs the fp16 graph): confident keypoints
within 1.56 px of FP32 (0.19 % of the person's size). Keeping the head's arithmetic in float32
changed nothing there, so the whole graph is converted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from posebatch.errors import ConfigError, ModelError
from posebatch.modelstore import fingerprint


def fp16_path(fp32: str | os.PathLike[str]) -> Path:
    p = Path(fp32)
    return p.with_name(p.stem + ".fp16.onnx")


def ensure_fp16(fp32: str | os.PathLike[str]) -> Path:
    """The fp16 copy of ``fp32``, converted now if missing or made from another FP32 file."""
    out, src_sha = fp16_path(fp32), fingerprint(fp32)
    meta = out.with_suffix(".json")
    if out.is_file() and meta.is_file():
        try:
            if json.loads(meta.read_text()).get("fp32_sha256") == src_sha:
                return out
        except ValueError:
            pass  # a torn sidecar: convert again
    convert_fp16(Path(fp32), out)
    meta.write_text(json.dumps({"fp32_sha256": src_sha, "fp16_sha256": fingerprint(out)}) + "\n")
    return out


def convert_fp16(fp32: Path, out: Path) -> Path:
    """Write ``out``: ``fp32`` with float16 weights and activations, float32 inputs/outputs."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as err:
        raise ConfigError(f"the fp16 conversion needs the onnx package ({err}); "
                          "pip install 'posebatch[gpu]'") from err
    try:
        model = onnx.load(str(fp32))
    except Exception as err:  # onnx raises DecodeError and friends
        raise ModelError(f"cannot read {fp32} as ONNX: {err}") from err
    half = convert_float_to_float16(model, keep_io_types=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    try:
        onnx.save(half, str(tmp))
        os.replace(tmp, out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot write the fp16 copy {out}: {err}; make the model's folder "
                         "writable or pass --precision f32") from err
    return out

