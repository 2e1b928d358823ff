"""ONNX models read and edited at the protobuf wire level, without the ``onnx`` package.

Why: CPU workers do not install ``onnx`` (a build-time tool), yet the engine edits the graphs it
opens (a uint8 input, ``uint8_input``; the head's top candidates, ``output_tail``). The few
ModelProto fields those edits touch are read and written here; everything else is copied as it
came, byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

FLOAT, UINT8 = 1, 2  # TensorProto.DataType
INT64 = 7
LEN, VARINT, I64, I32 = 2, 0, 1, 5

# field numbers (onnx.proto3)
MODEL_GRAPH = 7
MODEL_OPSET = 8
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 1, 5, 11, 12
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR = 1
TENSOR_ELEM, TENSOR_SHAPE = 1, 2
SHAPE_DIM, DIM_VALUE, DIM_PARAM = 1, 1, 2


def varint(n: int) -> bytes:
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


def read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def fields(buf: bytes) -> Iterator[tuple[int, int, bytes, bytes | int]]:
    """``(field number, wire type, the field's raw bytes, its value)`` in order."""
    i = 0
    while i < len(buf):
        start = i
        key, i = read_varint(buf, i)
        number, wire = key >> 3, key & 7
        value: bytes | int
        if wire == VARINT:
            value, i = read_varint(buf, i)
        elif wire == LEN:
            n, i = read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == I64:
            value, i = buf[i:i + 8], i + 8
        elif wire == I32:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, buf[start:i], value


def len_field(number: int, payload: bytes) -> bytes:
    return varint(number << 3 | LEN) + varint(len(payload)) + payload


def int_field(number: int, value: int) -> bytes:
    return varint(number << 3 | VARINT) + varint(value)


def opset(model: bytes) -> int:
    """The model's version of the default ONNX domain (0 when it names none)."""
    for number, _w, _raw, value in fields(model):
        if number == MODEL_OPSET and isinstance(value, bytes):
            domain, version = "", 0
            for n2, _w2, _r2, v2 in fields(value):
                if n2 == 1 and isinstance(v2, bytes):
                    domain = v2.decode()
                elif n2 == 2:
                    version = int(v2)  # type: ignore[arg-type]
            if domain in ("", "ai.onnx"):
                return version
    return 0


def value_name(value_info: bytes) -> str:
    for number, _w, _raw, value in fields(value_info):
        if number == VALUE_NAME and isinstance(value, bytes):
            return value.decode()
    return ""


def elem_type(value_info: bytes) -> int | None:
    for number, _w, _raw, value in fields(value_info):
        if number == VALUE_TYPE and isinstance(value, bytes):
            for n2, _w2, _r2, tensor in fields(value):
                if n2 == TYPE_TENSOR and isinstance(tensor, bytes):
                    for n3, _w3, _r3, elem in fields(tensor):
                        if n3 == TENSOR_ELEM:
                            return int(elem)  # type: ignore[arg-type]
    return None


def retyped(value_info: bytes, name: str, elem: int) -> bytes:
    """``value_info`` renamed to ``name`` with tensor element type ``elem``, shape kept."""
    out = b""
    for number, _w, raw, value in fields(value_info):
        if number == VALUE_NAME:
            out += len_field(VALUE_NAME, name.encode())
        elif number == VALUE_TYPE and isinstance(value, bytes):
            type_bytes = b""
            for n2, _w2, r2, tensor in fields(value):
                if n2 == TYPE_TENSOR and isinstance(tensor, bytes):
                    t = b""
                    for n3, _w3, r3, _v3 in fields(tensor):
                        if n3 == TENSOR_ELEM:
                            t += int_field(TENSOR_ELEM, elem)
                        else:
                            t += r3
                    type_bytes += len_field(TYPE_TENSOR, t)
                else:
                    type_bytes += r2
            out += len_field(VALUE_TYPE, type_bytes)
        else:
            out += raw
    return out


def node(op: str, inputs: list[str], outputs: list[str], attributes: bytes = b"") -> bytes:
    body = b"".join(len_field(1, s.encode()) for s in inputs)
    body += b"".join(len_field(2, s.encode()) for s in outputs)
    body += len_field(3, f"posebatch_{op.lower()}_{outputs[0]}".encode())
    body += len_field(4, op.encode()) + attributes
    return len_field(GRAPH_NODE, body)


def int_attribute(name: str, value: int) -> bytes:
    return len_field(5, len_field(1, name.encode()) + int_field(3, value) + int_field(20, 2))


def ints_attribute(name: str, values: list[int]) -> bytes:
    body = len_field(1, name.encode()) + b"".join(int_field(8, v) for v in values)
    return len_field(5, body + int_field(20, 7))


def uint8_attribute(name: str, value: int) -> bytes:
    tensor = int_field(2, UINT8) + len_field(9, bytes([value]))
    return len_field(5, len_field(1, name.encode()) + len_field(5, tensor)
                      + int_field(20, 4))


def int64s_attribute(name: str, values: list[int]) -> bytes:
    tensor = (int_field(1, len(values)) + int_field(2, INT64)
              + len_field(9, struct.pack(f"<{len(values)}q", *values)))
    return len_field(5, len_field(1, name.encode()) + len_field(5, tensor)
                      + int_field(20, 4))


def scalar_attribute(name: str, value: np.float32) -> bytes:
    tensor = int_field(2, FLOAT) + len_field(9, struct.pack("<f", float(value)))
    return len_field(5, len_field(1, name.encode()) + len_field(5, tensor)
                      + int_field(20, 4))


def dims(value_info: bytes) -> list[int | str | None]:
    """A tensor value's shape: an int per fixed dimension, its name for a named one, None for
    an unknown one; [] when the value has no shape."""
    out: list[int | str | None] = []
    for number, _w, _raw, value in fields(value_info):
        if number != VALUE_TYPE or not isinstance(value, bytes):
            continue
        for n2, _w2, _r2, tensor in fields(value):
            if n2 != TYPE_TENSOR or not isinstance(tensor, bytes):
                continue
            for n3, _w3, _r3, shape in fields(tensor):
                if n3 != TENSOR_SHAPE or not isinstance(shape, bytes):
                    continue
                for n4, _w4, _r4, dim in fields(shape):
                    if n4 != SHAPE_DIM or not isinstance(dim, bytes):
                        continue
                    d: int | str | None = None
                    for n5, _w5, _r5, v5 in fields(dim):
                        if n5 == DIM_VALUE:
                            d = int(v5)  # type: ignore[arg-type]
                        elif n5 == DIM_PARAM and isinstance(v5, bytes):
                            d = v5.decode()
                    out.append(d)
    return out


def split_model(model: bytes) -> tuple[list[tuple[int, bytes, bytes | int]], bytes | None]:
    """The model's top-level fields ``(number, raw, value)`` and its graph's bytes (None when
    the bytes hold no graph)."""
    top: list[tuple[int, bytes, bytes | int]] = []
    graph = None
    for number, _w, raw, value in fields(model):
        top.append((number, raw, value))
        if number == MODEL_GRAPH and isinstance(value, bytes):
            graph = value
    return top, graph


def join_model(top: list[tuple[int, bytes, bytes | int]], graph: bytes) -> bytes:
    """``split_model``'s fields again, with ``graph`` as the graph."""
    return b"".join(len_field(MODEL_GRAPH, graph) if n == MODEL_GRAPH else raw
                    for n, raw, _v in top)
