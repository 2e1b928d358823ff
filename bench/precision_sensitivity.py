"""Which part of the model moves keypoints when it runs in bf16 or fp16 (issue 20, item 5).

Why a simulation: OpenVINO's CPU plugin in bf16 ignores per-node precision marks (``precise_0``,
``disable_fp16_compression_0``: its runtime model still lists every Convolution in bf16), and a
GPU is not always at hand, so the question "which layers must stay FP32" is asked of the FP32
graph itself: the weights of chosen convolutions (and optionally their inputs) are rounded to
bf16 or fp16 and run with ONNX Runtime FP32 on the CPU, against the untouched graph. The measure
is the test guard's (tests/test_backends.py): model-pixel shifts of confident keypoints
(anchor score > 0.5, keypoint score > 0.5) on the dev images.

    python bench/precision_sensitivity.py --dtype bf16            # all, then each block kept FP32
    python bench/precision_sensitivity.py --dtype fp16 --inputs   # weights and conv inputs

Prints one line per variant: max, 99th and 95th percentile of the shifts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """``a`` (float32) rounded to the nearest bf16 (ties to even) or fp16, back in float32."""
    if dtype == "fp16":
        return a.astype(np.float16).astype(np.float32)
    bits = a.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).view(np.float32)


def shifts(ref: list[np.ndarray], got: list[np.ndarray]) -> np.ndarray:
    out = []
    for r, g in zip(ref, got, strict=True):
        anchors = r[4] > 0.5
        k, kg = (a[5:].reshape(17, 3, -1)[:, :, anchors] for a in (r, g))
        sure = k[:, 2] > 0.5
        out.append(np.hypot(k[:, 0] - kg[:, 0], k[:, 1] - kg[:, 1])[sure])
    return np.concatenate(out)


def variant(path: str, dtype: str, keep: set[str], inputs: bool):  # noqa: ANN201 - a session
    """The FP32 graph with the weights (and with ``inputs`` the inputs) of every convolution
    not in ``keep`` rounded to ``dtype``."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    convs = [n for n in graph.node if n.op_type == "Conv" and n.name not in keep]
    weights = {n.input[1] for n in convs}
    for init in graph.initializer:
        if init.name in weights:
            a = numpy_helper.to_array(init).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(round_to(a, dtype), init.name))
    if inputs:
        to = TensorProto.BFLOAT16 if dtype == "bf16" else TensorProto.FLOAT16
        for k, name in enumerate(sorted({n.input[0] for n in convs})):
            low, back = f"{name}_low{k}", f"{name}_back{k}"
            for n in convs:
                n.input[0] = back if n.input[0] == name else n.input[0]
            producer = next((i for i, n in enumerate(graph.node) if name in n.output), -1)
            graph.node.insert(producer + 1, helper.make_node("Cast", [name], [low], to=to))
            graph.node.insert(producer + 2, helper.make_node("Cast", [low], [back],
                                                             to=TensorProto.FLOAT))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--inputs", action="store_true", help="round the convolutions' inputs too")
    ap.add_argument("--model", help="ONNX file (default: the default model)")
    ns = ap.parse_args()
    import onnx
    import onnxruntime as ort

    from posebatch.modelstore import resolve_model
    from posebatch.settings import JobSettings, RuntimeSettings, from_env
    from tests.devdata import require_dev_data
    from workers.engine.pipeline import prepare

    rt = from_env(RuntimeSettings)
    path = ns.model or str(resolve_model(rt.model, rt.cache_dir).path)
    dev = require_dev_data()
    gt = json.loads((dev / "annotations.json").read_text())
    xs = []
    for im in gt["images"]:
        data = (dev / "images" / im["file_name"]).read_bytes()
        xs.append(prepare("x", lambda d=data: d, JobSettings(), None).tensor[None])
    base = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = base.get_inputs()[0].name
    ref = [base.run(None, {name: x})[0][0] for x in xs]
    convs = [n.name for n in onnx.load(path).graph.node if n.op_type == "Conv"]
    blocks: dict[str, set[str]] = {}
    for c in convs:
        blocks.setdefault(c.split("/")[1] if c.count("/") > 1 else c, set()).add(c)
    variants = [("all rounded", set())] + [(f"{b} kept FP32", s) for b, s in blocks.items()]
    firsts = list(blocks)
    variants += [(f"{firsts[0]}..{firsts[k - 1]} kept FP32",
                  set().union(*(blocks[b] for b in firsts[:k]))) for k in (2, 5, 10)]
    print(f"{ns.dtype}, weights{' and inputs' if ns.inputs else ''}, {len(xs)} images: "
          "confident keypoint shifts in model px")
    for label, keep in variants:
        session = variant(path, ns.dtype, keep, ns.inputs)
        s = shifts(ref, [session.run(None, {name: x})[0][0] for x in xs])
        print(f"{label:40s} n={len(s)} max {s.max():.2f} p99 {np.percentile(s, 99):.2f} "
              f"p95 {np.percentile(s, 95):.2f}", flush=True)


if __name__ == "__main__":
    main()
