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

import struct
from collections.abc import Iterator

import numpy as np

FLOAT, UINT8 = 1, 2  # TensorProto.DataType
_LEN, _VARINT, _I64, _I32 = 2, 0, 1, 5
INPUT_SUFFIX = "_uint8"
RTMO_OUTPUTS = {"dets", "keypoints"}

# field numbers (onnx.proto3)
MODEL_GRAPH = 7
GRAPH_NODE, GRAPH_INPUT, GRAPH_OUTPUT = 1, 11, 12
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR = 1
TENSOR_ELEM, TENSOR_SHAPE = 1, 2
INT64 = 7
MODEL_OPSET = 8
MIN_OPSET = 10  # DequantizeLinear


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes, bytes | int]]:
    """``(field number, wire type, the field's raw bytes, its value)`` in order."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        value: bytes | int
        if wire == _VARINT:
            value, i = _read_varint(buf, i)
        elif wire == _LEN:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == _I64:
            value, i = buf[i:i + 8], i + 8
        elif wire == _I32:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, buf[start:i], value


def _len_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3 | _VARINT) + _varint(value)


def _opset(model: bytes) -> int:
    """The model's version of the default ONNX domain (0 when it names none)."""
    for number, _w, _raw, value in _fields(model):
        if number == MODEL_OPSET and isinstance(value, bytes):
            domain, version = "", 0
            for n2, _w2, _r2, v2 in _fields(value):
                if n2 == 1 and isinstance(v2, bytes):
                    domain = v2.decode()
                elif n2 == 2:
                    version = int(v2)  # type: ignore[arg-type]
            if domain in ("", "ai.onnx"):
                return version
    return 0


def _name(value_info: bytes) -> str:
    for number, _w, _raw, value in _fields(value_info):
        if number == VALUE_NAME and isinstance(value, bytes):
            return value.decode()
    return ""


def _elem_type(value_info: bytes) -> int | None:
    for number, _w, _raw, value in _fields(value_info):
        if number == VALUE_TYPE and isinstance(value, bytes):
            for n2, _w2, _r2, tensor in _fields(value):
                if n2 == TYPE_TENSOR and isinstance(tensor, bytes):
                    for n3, _w3, _r3, elem in _fields(tensor):
                        if n3 == TENSOR_ELEM:
                            return int(elem)  # type: ignore[arg-type]
    return None


def _retyped(value_info: bytes, name: str, elem: int) -> bytes:
    """``value_info`` renamed to ``name`` with tensor element type ``elem``, shape kept."""
    out = b""
    for number, _w, raw, value in _fields(value_info):
        if number == VALUE_NAME:
            out += _len_field(VALUE_NAME, name.encode())
        elif number == VALUE_TYPE and isinstance(value, bytes):
            type_bytes = b""
            for n2, _w2, r2, tensor in _fields(value):
                if n2 == TYPE_TENSOR and isinstance(tensor, bytes):
                    t = b""
                    for n3, _w3, r3, _v3 in _fields(tensor):
                        if n3 == TENSOR_ELEM:
                            t += _int_field(TENSOR_ELEM, elem)
                        else:
                            t += r3
                    type_bytes += _len_field(TYPE_TENSOR, t)
                else:
                    type_bytes += r2
            out += _len_field(VALUE_TYPE, type_bytes)
        else:
            out += raw
    return out


def _node(op: str, inputs: list[str], outputs: list[str], attributes: bytes = b"") -> bytes:
    body = b"".join(_len_field(1, s.encode()) for s in inputs)
    body += b"".join(_len_field(2, s.encode()) for s in outputs)
    body += _len_field(3, f"posebatch_{op.lower()}_{outputs[0]}".encode())
    body += _len_field(4, op.encode()) + attributes
    return _len_field(GRAPH_NODE, body)


def _int_attribute(name: str, value: int) -> bytes:
    return _len_field(5, _len_field(1, name.encode()) + _int_field(3, value) + _int_field(20, 2))


def _ints_attribute(name: str, values: list[int]) -> bytes:
    body = _len_field(1, name.encode()) + b"".join(_int_field(8, v) for v in values)
    return _len_field(5, body + _int_field(20, 7))


def _uint8_attribute(name: str, value: int) -> bytes:
    tensor = _int_field(2, UINT8) + _len_field(9, bytes([value]))
    return _len_field(5, _len_field(1, name.encode()) + _len_field(5, tensor)
                      + _int_field(20, 4))


def _int64s_attribute(name: str, values: list[int]) -> bytes:
    tensor = (_int_field(1, len(values)) + _int_field(2, INT64)
              + _len_field(9, struct.pack(f"<{len(values)}q", *values)))
    return _len_field(5, _len_field(1, name.encode()) + _len_field(5, tensor)
                      + _int_field(20, 4))


def _scalar_attribute(name: str, value: np.float32) -> bytes:
    tensor = _int_field(2, FLOAT) + _len_field(9, struct.pack("<f", float(value)))
    return _len_field(5, _len_field(1, name.encode()) + _len_field(5, tensor)
                      + _int_field(20, 4))


def fold_uint8_input(model: bytes) -> tuple[bytes, str] | None:
    """``(model bytes with a uint8 (B, 3, H, W) RGB input, that input's name)``, or None when
    the graph has not exactly one float image input or its opset is below 10 (nothing to
    fold: it runs as it is), or the bytes are no ONNX model (the runtime then says so)."""
    try:
        return _fold(model)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _fold(model: bytes) -> tuple[bytes, str] | None:
    graph_raw = None
    top: list[tuple[int, bytes, bytes | int]] = []
    for number, _w, raw, value in _fields(model):
        top.append((number, raw, value))
        if number == MODEL_GRAPH and isinstance(value, bytes):
            graph_raw = value
    if graph_raw is None or _opset(model) < MIN_OPSET:
        return None
    graph = list(_fields(graph_raw))
    initializers = {_name(v) for n, _w, _r, v in graph if n == 5 and isinstance(v, bytes)}
    inputs = [(k, v) for k, (n, _w, _r, v) in enumerate(graph)
              if n == GRAPH_INPUT and isinstance(v, bytes) and _name(v) not in initializers]
    outputs = {_name(v) for n, _w, _r, v in graph if n == GRAPH_OUTPUT and isinstance(v, bytes)}
    if len(inputs) != 1 or _elem_type(inputs[0][1]) != FLOAT:  # type: ignore[arg-type]
        return None
    index, value_info = inputs[0]
    name = _name(value_info)  # type: ignore[arg-type]
    new_name = name + INPUT_SUFFIX
    if outputs >= RTMO_OUTPUTS:
        bgr, idx = f"{name}_posebatch_bgr", f"{name}_posebatch_bgr_index"
        nodes = (_node("Constant", [], [idx], _int64s_attribute("value", [2, 1, 0]))
                 + _node("Gather", [new_name, idx], [bgr], _int_attribute("axis", 1))
                 + _node("Cast", [bgr], [name], _int_attribute("to", FLOAT)))
    else:
        inv, zero = f"{name}_posebatch_inv255", f"{name}_posebatch_zero"
        nodes = (_node("Constant", [], [inv], _scalar_attribute("value", np.float32(1 / 255)))
                 + _node("Constant", [], [zero], _uint8_attribute("value", 0))
                 + _node("DequantizeLinear", [new_name, inv, zero], [name]))
    body = nodes + b"".join(
        _len_field(GRAPH_INPUT, _retyped(v, new_name, UINT8)) if k == index else raw  # type: ignore[arg-type]
        for k, (_n, _w, raw, v) in enumerate(graph))
    out = b"".join(_len_field(MODEL_GRAPH, body) if n == MODEL_GRAPH else raw
                   for n, raw, _v in top)
    return out, new_name


def as_uint8(batch: np.ndarray) -> np.ndarray:
    """A float32 ``(B, 3, H, W)`` RGB batch in [0, 1] (the engine's documented input) as the
    folded graph takes it, uint8 ``(B, 3, H, W)``; a uint8 batch as it is."""
    if batch.dtype == np.uint8:
        return batch
    return np.rint(np.clip(batch, 0.0, 1.0) * 255.0).astype(np.uint8)
