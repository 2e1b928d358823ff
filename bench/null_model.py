"""A model that costs nothing: the default model's input and output layout, a fixed answer.

Why: with it, ``posebatch run`` measures what the host side costs (read, decode, letterbox,
copies, post-processing, JSON, writes) without the network in the way (issue 20). The graph takes
``images (B, 3, H, W)`` (float32, as the default YOLO11-pose export) and returns
``output0 (B, 56, 8400)``: the same 6 persons for every image (6 anchors with a person score
above the default threshold, non-overlapping so NMS keeps all of them; every other anchor 0),
in model-input pixels inside the band a 16:9 image covers in a 640x640 letterbox.

``--uint8`` builds ``null-u8.onnx``, whose input is uint8 already: the engine folds nothing into
it, so the pixels' scaling to float (which a real model's graph does, on a GPU on the device)
is not counted either: the host side alone.

    python null_model.py [--uint8] [OUT.onnx]   # default: bench/null.onnx; prints the path
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ANCHORS = 8400
PERSONS = 6
OPSET = 17
IR_VERSION = 8


def null_output(persons: int = PERSONS, anchors: int = ANCHORS) -> np.ndarray:
    """``(1, 56, anchors) float32``: cx, cy, w, h, score, then 17 x (x, y, score) per anchor."""
    rng = np.random.default_rng(20)
    out = np.zeros((1, 56, anchors), np.float32)
    for i in range(persons):
        cx, cy, w, h = 60.0 + i * 104.0, 320.0, 80.0, 300.0  # side by side, y 170..470
        out[0, :4, i] = cx, cy, w, h
        out[0, 4, i] = 0.9 - 0.1 * i
        kx = cx + rng.uniform(-w / 2, w / 2, 17)
        ky = cy + rng.uniform(-h / 2, h / 2, 17)
        ks = rng.uniform(0.05, 0.99, 17)
        out[0, 5::3, i], out[0, 6::3, i], out[0, 7::3, i] = kx, ky, ks
    return out


def build(path: Path, uint8: bool = False) -> Path:
    """Write the null model to ``path`` (onnx package: in the dev extras)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    value = null_output()
    nodes = [
        helper.make_node("Shape", ["images"], ["batch"], start=0, end=1),
        helper.make_node("Constant", [], ["rest"], value=numpy_helper.from_array(
            np.array(value.shape[1:], np.int64), "rest_v")),
        helper.make_node("Concat", ["batch", "rest"], ["target"], axis=0),
        helper.make_node("Constant", [], ["answer"],
                         value=numpy_helper.from_array(value, "answer_v")),
        helper.make_node("Expand", ["answer", "target"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "null_pose",
        [helper.make_tensor_value_info("images", TensorProto.UINT8 if uint8 else TensorProto.FLOAT,
                                       ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT,
                                       ["batch", 56, ANCHORS])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def ensure(path: Path = HERE / "null.onnx", uint8: bool = False) -> Path:
    """The null model at ``path``, built when missing."""
    return path if path.is_file() else build(path, uint8)


def main() -> int:
    args = sys.argv[1:]
    uint8 = "--uint8" in args
    args = [a for a in args if a != "--uint8"]
    out = Path(args[0]) if args else HERE / ("null-u8.onnx" if uint8 else "null.onnx")
    print(build(out, uint8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
