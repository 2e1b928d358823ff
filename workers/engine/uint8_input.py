"""A model's float image input turned into a uint8 one, the normalisation moved into the graph.

Why: the decode threads wrote every pixel as a float32 (4.9 MB per 640x640 image) into the batch,
and the model call copied that again; with a uint8 input they write 1.2 MB, and the scaling runs
inside the model (ONNX Runtime's threads, without the GIL; on a GPU, on the device).

How: the ModelProto is edited at the protobuf wire level (no ``onnx`` package needed, so CPU
workers without it get the same model): the image input ``X (B, 3, H, W) float`` becomes
``X_uint8 (B, 3, H, W) uint8``, and nodes in front of the graph make ``X`` from it again, so no
other node changes:

- YOLO layouts (RGB in [0, 1]): ``X = DequantizeLinear(X_uint8, float32(1/255), 0)``, which is
  ``float(x) * float32(1/255)``: the very product the engine computed before, in one pass
  (a Cast then a Mul cost three times as much: two float tensors written instead of one);
- RTMO (BGR in 0..255, no scaling): ``X = Cast(Gather(X_uint8, [2, 1, 0], axis 1), float)``.

The decode threads write the pixels planar with OpenCV's ``split`` (SIMD; numpy's transposing
copy took ten times as long, as long as the JPEG decode of a 640x360 image).

The letterbox's gray (114) becomes ``114 * float32(1/255)`` there, one float32 step away from
``float32(114 / 255)`` before: results may move in their last digit (tests/test_uint8_input.py
checks the dev set's AP and PCK).
"""

from __future__ import annotations

import numpy as np

from workers.engine.onnxwire import (
    FLOAT,
    GRAPH_INITIALIZER,
    GRAPH_INPUT,
    GRAPH_OUTPUT,
    UINT8,
    elem_type,
    fields,
    int64s_attribute,
    int_attribute,
    join_model,
    len_field,
    node,
    opset,
    retyped,
    scalar_attribute,
    split_model,
    uint8_attribute,
    value_name,
)

INPUT_SUFFIX = "_uint8"
RTMO_OUTPUTS = {"dets", "keypoints"}
MIN_OPSET = 10  # DequantizeLinear


def fold_uint8_input(model: bytes) -> tuple[bytes, str] | None:
    """``(model bytes with a uint8 (B, 3, H, W) RGB input, that input's name)``, or None when
    the graph has not exactly one float image input or its opset is below 10 (nothing to
    fold: it runs as it is), or the bytes are no ONNX model (the runtime then says so)."""
    try:
        return _fold(model)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _fold(model: bytes) -> tuple[bytes, str] | None:
    top, graph_raw = split_model(model)
    if graph_raw is None or opset(model) < MIN_OPSET:
        return None
    graph = list(fields(graph_raw))
    initializers = {value_name(v) for n, _w, _r, v in graph if n == GRAPH_INITIALIZER
                    and isinstance(v, bytes)}
    inputs = [(k, v) for k, (n, _w, _r, v) in enumerate(graph)
              if n == GRAPH_INPUT and isinstance(v, bytes) and value_name(v) not in initializers]
    outputs = {value_name(v) for n, _w, _r, v in graph
               if n == GRAPH_OUTPUT and isinstance(v, bytes)}
    if len(inputs) != 1 or elem_type(inputs[0][1]) != FLOAT:  # type: ignore[arg-type]
        return None
    index, value_info = inputs[0]
    name = value_name(value_info)  # type: ignore[arg-type]
    new_name = name + INPUT_SUFFIX
    if outputs >= RTMO_OUTPUTS:
        bgr, idx = f"{name}_posebatch_bgr", f"{name}_posebatch_bgr_index"
        nodes = (node("Constant", [], [idx], int64s_attribute("value", [2, 1, 0]))
                 + node("Gather", [new_name, idx], [bgr], int_attribute("axis", 1))
                 + node("Cast", [bgr], [name], int_attribute("to", FLOAT)))
    else:
        inv, zero = f"{name}_posebatch_inv255", f"{name}_posebatch_zero"
        nodes = (node("Constant", [], [inv], scalar_attribute("value", np.float32(1 / 255)))
                 + node("Constant", [], [zero], uint8_attribute("value", 0))
                 + node("DequantizeLinear", [new_name, inv, zero], [name]))
    body = nodes + b"".join(
        len_field(GRAPH_INPUT, retyped(v, new_name, UINT8)) if k == index else raw  # type: ignore[arg-type]
        for k, (_n, _w, raw, v) in enumerate(graph))
    return join_model(top, body), new_name


def as_uint8(batch: np.ndarray) -> np.ndarray:
    """A float32 ``(B, 3, H, W)`` RGB batch in [0, 1] (the engine's documented input) as the
    folded graph takes it, uint8 ``(B, 3, H, W)``; a uint8 batch as it is."""
    if batch.dtype == np.uint8:
        return batch
    return np.rint(np.clip(batch, 0.0, 1.0) * 255.0).astype(np.uint8)
