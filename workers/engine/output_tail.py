"""The raw YOLO-pose head's best candidates picked inside the graph: a sliver leaves the model.

Why: the raw head is ``(B, 56, N)`` floats, 1.9 MB per 640x640 image (N = 8400 anchors), and all
of it was copied out of the model (on a GPU, device to host) for the host to keep the few dozen
anchors above the score threshold. Two outputs are added to the graph instead:

- ``TOP (B, 56, K)``: the head's columns of the K anchors with the highest person score, by
  descending score (K = ``TOP_K``, or N when the grid is smaller);
- ``TOP_INDEX (B, K) int64``: those anchors.

The host keeps the columns whose score passes the job's threshold. When an image's K-th score
passes too, more than K anchors may pass: that batch is decoded from the full head instead
(``Head.full``, fetched only then), so the persons are always exactly those of the full head
(``layouts.decode_yolo_top_batch`` re-sorts the kept anchors into the full head's order).

The graph keeps its original output: the paths that need the whole head (``--quality best``, the
top-down detector) still get it.
"""

from __future__ import annotations

from workers.engine.onnxwire import (
    FLOAT,
    GRAPH_OUTPUT,
    INT64,
    TENSOR_ELEM,
    TYPE_TENSOR,
    VALUE_NAME,
    VALUE_TYPE,
    dims,
    elem_type,
    fields,
    int64s_attribute,
    int_attribute,
    int_field,
    ints_attribute,
    join_model,
    len_field,
    node,
    opset,
    split_model,
    value_name,
)

TOP_K = 1024
"""Candidates kept per image: 8x less than the 8400 anchors of a 640x640 grid. On the dev set at
the default threshold (0.05) images have up to 282 candidates (median 27); past K a batch is
decoded from the full head, so K trades copy size against how often that happens."""
TOP, TOP_INDEX = "posebatch_top", "posebatch_top_index"
MIN_OPSET = 12  # Min over int64
SCORE_ROW = 4
RAW_ROWS = 56


def _value(name: str, elem: int) -> bytes:
    """A graph output of tensor type ``elem`` (its shape left to the runtime)."""
    tensor = len_field(TYPE_TENSOR, int_field(TENSOR_ELEM, elem))
    return len_field(GRAPH_OUTPUT, len_field(VALUE_NAME, name.encode())
                     + len_field(VALUE_TYPE, tensor))


def _int64_scalar(name: str, value: int) -> bytes:
    tensor = int_field(2, INT64) + int_field(7, value)  # no dims: a scalar; int64_data
    return len_field(5, len_field(1, name.encode()) + len_field(5, tensor) + int_field(20, 4))


def add_top_candidates(model: bytes, k: int = TOP_K) -> bytes | None:
    """``model`` with the ``TOP``/``TOP_INDEX`` outputs added, or None when it is not a raw
    YOLO-pose graph (one ``(B, 56, N)`` float output) of opset >= 12, or not an ONNX model."""
    try:
        return _add(model, k)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _add(model: bytes, k: int) -> bytes | None:
    top, graph_raw = split_model(model)
    if graph_raw is None or opset(model) < MIN_OPSET:
        return None
    graph = list(fields(graph_raw))
    outputs = [v for n, _w, _r, v in graph if n == GRAPH_OUTPUT and isinstance(v, bytes)]
    if len(outputs) != 1 or elem_type(outputs[0]) != FLOAT:
        return None
    shape = dims(outputs[0])
    if len(shape) != 3 or shape[1] != RAW_ROWS:
        return None
    head = value_name(outputs[0])
    p = f"{head}_posebatch_tail"
    names = {s: f"{p}_{s}" for s in ("row", "scores", "shape", "n", "k_max", "k", "lo", "hi",
                                     "lead_end", "lead", "index3", "expand", "index_full")}
    nodes = (
        node("Constant", [], [names["row"]], _int64_scalar("value", SCORE_ROW))
        + node("Gather", [head, names["row"]], [names["scores"]], int_attribute("axis", 1))
        + node("Shape", [head], [names["shape"]])
        + node("Constant", [], [names["lo"]], int64s_attribute("value", [2]))
        + node("Constant", [], [names["hi"]], int64s_attribute("value", [3]))
        + node("Slice", [names["shape"], names["lo"], names["hi"]], [names["n"]])
        + node("Constant", [], [names["k_max"]], int64s_attribute("value", [k]))
        + node("Min", [names["k_max"], names["n"]], [names["k"]])
        + node("TopK", [names["scores"], names["k"]], [f"{p}_values", TOP_INDEX],
               int_attribute("axis", -1) + int_attribute("largest", 1)
               + int_attribute("sorted", 1))
        + _unsqueeze(TOP_INDEX, names["index3"], opset(model), p)
        + node("Constant", [], [names["lead_end"]], int64s_attribute("value", [2]))
        + node("Constant", [], [f"{p}_zero"], int64s_attribute("value", [0]))
        + node("Slice", [names["shape"], f"{p}_zero", names["lead_end"]], [names["lead"]])
        + node("Concat", [names["lead"], names["k"]], [names["expand"]],
               int_attribute("axis", 0))
        + node("Expand", [names["index3"], names["expand"]], [names["index_full"]])
        + node("GatherElements", [head, names["index_full"]], [TOP], int_attribute("axis", 2))
    )
    body = graph_raw + nodes + _value(TOP, FLOAT) + _value(TOP_INDEX, INT64)
    return join_model(top, body)


def _unsqueeze(src: str, dst: str, model_opset: int, prefix: str) -> bytes:
    """``dst = src`` with a new axis 1 (Unsqueeze takes its axes as an input from opset 13)."""
    if model_opset >= 13:
        axes = f"{prefix}_axes"
        return (node("Constant", [], [axes], int64s_attribute("value", [1]))
                + node("Unsqueeze", [src, axes], [dst]))
    return node("Unsqueeze", [src], [dst], ints_attribute("axes", [1]))
