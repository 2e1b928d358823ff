"""``posebatch model quantize``: a statically quantized INT8 copy of an ONNX pose model.

Why static QDQ with onnxruntime's own tools: activations are calibrated once on real images (the
dev set, or any folder) instead of at run time, and QDQ graphs run on the CPU provider's INT8
kernels and on TensorRT alike. Only convolutions are quantized, and the last convolution of each
head branch (boxes, person score, keypoints) stays in float: those outputs are coordinates and
scores read directly, where 8-bit steps would show up as pixel errors.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from posebatch.errors import ConfigError, ModelError

HEAD_OUTPUT_CONV = re.compile(r"/model\.\d+/cv[234]\.\d+/cv[234]\.\d+\.2/Conv$")


def int8_path(fp32: Path) -> Path:
    return fp32.with_name(fp32.stem + ".int8.onnx")


def calibration_tensors(images: list[Path], imgsz: int) -> Iterator[dict[str, np.ndarray]]:
    from workers.engine.decode import decode_image
    from workers.engine.letterbox import letterbox, to_input_tensor

    for path in images:
        img = decode_image(path.read_bytes(), target=imgsz)
        canvas, _ = letterbox(img.rgb, (imgsz, imgsz))
        yield {"images": to_input_tensor(canvas)[None]}


def quantize(fp32: Path, out: Path, calib_dir: Path, imgsz: int = 640,
             max_images: int = 200) -> Path:
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as err:
        raise ConfigError(f"quantization needs the onnx package ({err}); "
                          "pip install 'posebatch[quantize]'") from err
    from posebatch.keys import is_image_key

    images = sorted(p for p in calib_dir.rglob("*") if p.is_file() and is_image_key(p.name))
    if not images:
        raise ConfigError(f"no calibration images under {calib_dir}")
    images = images[:max_images]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = calibration_tensors(images, imgsz)

        def get_next(self):  # noqa: ANN202 - onnxruntime's interface
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        graph = onnx.load(str(pre)).graph
        keep_float = [n.name for n in graph.node if HEAD_OUTPUT_CONV.search(n.name)]
        if graph.input[0].name != "images":
            raise ModelError(f"{fp32}: expected input 'images', got {graph.input[0].name}")
        tmp_out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(pre), str(tmp_out), Reader(), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"], nodes_to_exclude=keep_float, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out.replace(out)
    return out
