"""``posebatch model fp16``: a float16 copy of an ONNX pose model for GPU providers.

Why a copy on disk, made once: converting takes about a second and needs the ``onnx`` package,
which a worker should not repeat in every process; the copy sits beside the FP32 file
(``<name>.fp16.onnx``) and has its own sha256, so outputs made with it say so in their manifest.

How: ONNX Runtime's own converter (``onnxruntime.transformers.float16``, shipped in the
onnxruntime and onnxruntime-gpu wheels; onnxconverter-common 1.16's copy of it casts Resize's
scales wrongly on YOLO11 and the result does not load). Inputs and outputs stay float32, so the
engine feeds and reads the same arrays. The decode tail (everything after the last learned
convolution: anchors, strides, the DFL expectation) stays float32: it turns grid offsets into
pixel coordinates, and float16 has a step of 0.5 between 512 and 1024, which alone would move
points by up to 0.25 model pixels.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from posebatch.errors import ConfigError, ModelError
from posebatch.modelstore import fp16_path

FP32_OPS_AFTER = ("Softmax",)
"""A convolution fed by one of these is an arithmetic step (YOLO's DFL expectation), not a
learned layer: it belongs to the float32 tail."""


def decode_tail(graph) -> list[str]:  # noqa: ANN001 - an onnx GraphProto
    """Names of the nodes between the last learned convolutions and the outputs."""
    producer = {out: node for node in graph.node for out in node.output}
    tail: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in tail:
            continue
        if node.op_type == "Conv":
            feeder = producer.get(node.input[0])
            if feeder is None or feeder.op_type not in FP32_OPS_AFTER:
                continue
        tail.add(node.name)
        if node.op_type != "Shape":  # a shape needs no values: do not climb into the backbone
            stack.extend(node.input)
    return sorted(tail)


def drop_repeated_nodes(graph) -> int:  # noqa: ANN001 - an onnx GraphProto
    """Remove nodes that repeat an earlier node exactly (same op, inputs, outputs, attributes),
    in place; return how many were removed.

    onnxruntime 1.31.1's converter inserts one Cast per float32 consumer of a float16 tensor,
    all with the same name and output, and ONNX Runtime refuses that model ("two nodes with same
    node name"), seen on an H100; 1.32's converter does not. One of them computes the same tensor.
    """
    kept: dict[str, object] = {}
    repeated = []
    for node in graph.node:
        for out in node.output:
            first = kept.get(out)
            if first is None:
                kept[out] = node
            elif first.SerializeToString() == node.SerializeToString():
                repeated.append(node)
                break
            else:
                raise ModelError(f"the fp16 graph defines {out!r} twice with different nodes; "
                                 "convert with another onnxruntime version or run FP32")
    for node in repeated:
        graph.node.remove(node)
    return len(repeated)


def convert_fp16(fp32: Path, out: Path | None = None) -> Path:
    """Write the float16 copy of ``fp32`` (atomically: workers may start side by side)."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as err:
        raise ConfigError(f"fp16 conversion needs the onnx package ({err}); "
                          "pip install 'posebatch[fp16]'") from err
    out = out or fp16_path(fp32)
    model = onnx.load(str(fp32))
    try:
        half = convert_float_to_float16(model, keep_io_types=True,
                                        node_block_list=decode_tail(model.graph))
    except Exception as err:  # the converter raises plain exceptions on graphs it cannot take
        raise ModelError(f"cannot convert {fp32} to fp16: {err}") from err
    drop_repeated_nodes(half.graph)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=out.name, suffix=".tmp", dir=out.parent)
        os.close(fd)
        onnx.save(half, tmp)
        os.replace(tmp, out)
    except OSError as err:
        raise ModelError(f"cannot write the fp16 model {out}: {err}; make its folder writable "
                         "or run `posebatch model fp16` where it is") from err
    return out
