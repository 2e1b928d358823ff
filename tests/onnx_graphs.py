"""Small ONNX graphs of every supported model layout, whose outputs are known in closed form.

Why synthesized graphs: a real RTMPose or RTMO file is tens of megabytes and its outputs are only
known approximately; these graphs are a few kilobytes, build in milliseconds with onnx.helper,
and make the decoding and back-projection checkable to the pixel.

- detector layouts (YOLO raw, YOLO end-to-end, RTMO) output CONSTANT persons, repeated over the
  batch, in model-input pixels: the engine must map them back through its letterbox exactly.
- the SimCC graph looks at its input: for each crop, ``simcc_x`` peaks (for every keypoint) at
  the brightest column and ``simcc_y`` at the brightest row, each bin repeated ``ratio`` times,
  so a single bright pixel in the image is found exactly where it is, through crop and
  back-projection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _image_input(hw: tuple[int | str, int | str] = ("H", "W"), name: str = "images",
                 batch: int | str = "B"):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [batch, 3, *hw])


def _constant_per_image(name: str, value: np.ndarray, out_name: str, input_name: str) -> list:
    """Nodes that output ``value`` (leading dim 1) repeated over the input's batch."""
    c = numpy_helper.from_array(value.astype(np.float32), f"{name}_value")
    nodes = [
        helper.make_node("Shape", [input_name], [f"{name}_shape"], start=0, end=1),
        helper.make_node("Constant", [], [f"{name}_rest"], value=numpy_helper.from_array(
            np.array(value.shape[1:], dtype=np.int64), f"{name}_rest_v")),
        helper.make_node("Concat", [f"{name}_shape", f"{name}_rest"], [f"{name}_target"], axis=0),
        helper.make_node("Constant", [], [f"{name}_c"], value=c),
        helper.make_node("Expand", [f"{name}_c", f"{name}_target"], [out_name]),
    ]
    return nodes


def yolo_raw_output(boxes_cxcywh: np.ndarray, scores: np.ndarray, kpts: np.ndarray,
                    anchors: int = 64) -> np.ndarray:
    """The ``(1, 56, anchors)`` tensor of a YOLO-pose head holding these persons (rest score 0)."""
    out = np.zeros((1, 56, anchors), dtype=np.float32)
    n = len(scores)
    out[0, :4, :n] = boxes_cxcywh.T
    out[0, 4, :n] = scores
    out[0, 5:, :n] = kpts.reshape(n, 51).T
    return out


def yolo_raw(path: Path, boxes_cxcywh, scores, kpts, anchors: int = 64) -> Path:
    value = yolo_raw_output(np.asarray(boxes_cxcywh), np.asarray(scores), np.asarray(kpts),
                            anchors)
    nodes = _constant_per_image("o", value, "output0", "images")
    graph = helper.make_graph(nodes, "yolo_raw", [_image_input()], [
        helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["B", 56, anchors])])
    return _save(graph, path)


def yolo_det(path: Path, boxes_cxcywh, class_scores, anchors: int = 32) -> Path:
    """Ultralytics detection head ``(B, 4 + classes, anchors)``: ``class_scores (n, classes)``."""
    scores = np.asarray(class_scores, dtype=np.float32)
    n, classes = scores.shape
    value = np.zeros((1, 4 + classes, anchors), dtype=np.float32)
    value[0, :4, :n] = np.asarray(boxes_cxcywh).T
    value[0, 4:, :n] = scores.T
    nodes = _constant_per_image("o", value, "output0", "images")
    graph = helper.make_graph(nodes, "yolo_det", [_image_input()], [
        helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["B", 4 + classes, anchors])])
    return _save(graph, path)


def yolo_e2e(path: Path, boxes_xyxy, scores, kpts, slots: int = 10, width: int = 57) -> Path:
    """End-to-end head (K slots of x1, y1, x2, y2, score, class, 51 keypoint values); another
    ``width`` makes a graph of no supported layout."""
    value = np.zeros((1, slots, width), dtype=np.float32)
    n = len(scores)
    value[0, :n, :4] = boxes_xyxy
    value[0, :n, 4] = scores
    value[0, :n, 6:57] = np.asarray(kpts).reshape(n, 51)[:, :width - 6]
    nodes = _constant_per_image("o", value, "output0", "images")
    graph = helper.make_graph(nodes, "yolo_e2e", [_image_input()], [
        helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["B", slots, width])])
    return _save(graph, path)


def rtmo(path: Path, boxes_xyxy, scores, kpts, score_from_input: bool = False) -> Path:
    """Constant persons; with ``score_from_input`` one person whose score is the largest value
    of the input's FIRST channel / 1000: RTMO reads BGR 0..255, so a pure blue image scores
    0.255 only when the engine feeds it what RTMO expects."""
    n = len(scores)
    k = np.asarray(kpts)[None]
    nodes = _constant_per_image("k", k, "keypoints", "input")
    if score_from_input:
        box = np.asarray(boxes_xyxy, dtype=np.float32)[:1][None]             # (1, 1, 4)
        nodes += _constant_per_image("b", box, "boxes", "input")
        consts = {"starts": [0], "ends": [1], "axes": [1], "shape": [0, 1, 1]}
        for name, value in consts.items():
            nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
                np.array(value, np.int64), name + "_v")))
        nodes += [
            helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["first"]),
            helper.make_node("ReduceMax", ["first"], ["peak"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Reshape", ["peak", "shape"], ["peak3"]),
            helper.make_node("Constant", [], ["milli"], value=numpy_helper.from_array(
                np.array(0.001, np.float32), "milli_v")),
            helper.make_node("Mul", ["peak3", "milli"], ["score"]),
            helper.make_node("Concat", ["boxes", "score"], ["dets"], axis=2),
        ]
        n = 1
    else:
        dets = np.concatenate([np.asarray(boxes_xyxy), np.asarray(scores)[:, None]], 1)[None]
        nodes += _constant_per_image("d", dets, "dets", "input")
    graph = helper.make_graph(nodes, "rtmo", [_image_input(name="input")], [
        helper.make_tensor_value_info("dets", TensorProto.FLOAT, ["B", n, 5]),
        helper.make_tensor_value_info("keypoints", TensorProto.FLOAT, ["B", k.shape[1], 17, 3])])
    return _save(graph, path)


def simcc(path: Path, input_hw: tuple[int, int] = (256, 192), keypoints: int = 17,
          ratio: int = 2, names: tuple[str, str] = ("simcc_x", "simcc_y"),
          batch: int | str = "B") -> Path:
    """SimCC graph: simcc_x[b, k, ratio*u + i] = max over channels and rows of column u."""
    h, w = input_hw
    nodes = []
    outputs = []
    for axis_name, reduce_axes, length, out_name in (("x", [1, 2], w, names[0]),
                                                     ("y", [1, 3], h, names[1])):
        p = f"{axis_name}_"
        nodes += [
            helper.make_node("ReduceMax", ["input"], [p + "m"], axes=reduce_axes, keepdims=0),
            helper.make_node("Constant", [], [p + "ax1"], value=numpy_helper.from_array(
                np.array([1], np.int64), p + "ax1v")),
            helper.make_node("Unsqueeze", [p + "m", p + "ax1"], [p + "u"]),           # (B,1,L)
            helper.make_node("Constant", [], [p + "rep"], value=numpy_helper.from_array(
                np.array([1, keypoints, 1], np.int64), p + "repv")),
            helper.make_node("Tile", [p + "u", p + "rep"], [p + "t"]),                # (B,K,L)
            helper.make_node("Constant", [], [p + "ax3"], value=numpy_helper.from_array(
                np.array([3], np.int64), p + "ax3v")),
            helper.make_node("Unsqueeze", [p + "t", p + "ax3"], [p + "t4"]),         # (B,K,L,1)
            helper.make_node("Concat", [p + "t4"] * ratio, [p + "c"], axis=3),       # (B,K,L,r)
            helper.make_node("Constant", [], [p + "shape"], value=numpy_helper.from_array(
                np.array([0, keypoints, length * ratio], np.int64), p + "shapev")),
            helper.make_node("Reshape", [p + "c", p + "shape"], [out_name]),
        ]
        outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT,
                                                     [batch, keypoints, length * ratio]))
    graph = helper.make_graph(nodes, "simcc", [_image_input((h, w), "input", batch)], outputs)
    return _save(graph, path)
