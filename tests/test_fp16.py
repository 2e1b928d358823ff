"""The fp16 copy of the model, checked against FP32 on dev images, on the CPU.

ONNX Runtime's CPU provider runs the fp16 graph (slowly, casting where it lacks fp16 kernels), so
the weights and activations are rounded as on a GPU; the GPU's own kernels are checked by
bench/gpu_check.py. Coordinates are compared in model-input pixels (after the layout decode),
where the precision of the network shows independent of the photo's size.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from posebatch.modelstore import fp16_path, resolve_model
from posebatch.settings import JobSettings, RuntimeSettings, from_env
from tests.devdata import require_dev_data
from workers.engine.pipeline import prepare
from workers.engine.runner import PoseModel

pytest.importorskip("onnx")

IMAGES = [  # a crowded 1080p frame, a two-person photo, a six-person drawing
    "posetrack18/images_val_012834_mpii_test_000000.jpg",
    "mhp/10084.jpg",
    "humanart/real_human_acrobatics_000000000590.jpg",
]
MAX_PX = 0.5
PERSON_SCORE = 0.25  # persons both models report with confidence
KPT_SCORE = 0.5  # keypoints the FP32 model is sure of


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[PoseModel, PoseModel, Path]:
    from workers.tools.fp16 import convert_fp16

    rt = from_env(RuntimeSettings)
    fp32 = tmp_path_factory.mktemp("fp16") / "pose.onnx"
    shutil.copy(resolve_model(rt.model, rt.cache_dir).path, fp32)
    half = convert_fp16(fp32)
    return PoseModel(str(fp32), "cpu", 1), PoseModel(str(half), "cpu", 1), half


def test_fp16_copy_sits_beside_the_model_with_float32_io_and_a_float32_tail(models):
    import onnx

    _, _, half = models
    assert half == fp16_path(half.with_name("pose.onnx"))
    graph = onnx.load(str(half)).graph
    for value in (*graph.input, *graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    inits = {i.name: i.data_type for i in graph.initializer}
    conv_weights = [inits[n.input[1]] for n in graph.node
                    if n.op_type == "Conv" and n.input[1] in inits]
    halves = sum(t == onnx.TensorProto.FLOAT16 for t in conv_weights)
    assert halves >= len(conv_weights) - 1  # all learned convolutions; the DFL one stays fp32
    assert resolve_model(str(half.with_name("pose.onnx")), half.parent,
                         precision="fp16").precision == "fp16"


def test_fp16_keypoints_within_half_a_pixel_of_fp32(models):
    dev = require_dev_data() / "images"
    fp32, half, _ = models
    job = JobSettings()
    worst, compared = 0.0, 0
    for name in IMAGES:
        data = (dev / name).read_bytes()
        item = prepare(name, lambda d=data: d, job, None)
        assert item.tensor is not None, item.error
        x = item.tensor[None]
        (a,), (b,) = fp32.infer(x, job.det_conf, job.nms_iou, 100), half.infer(
            x, job.det_conf, job.nms_iou, 100)
        for i in np.flatnonzero(a.scores >= PERSON_SCORE):
            sure = a.kpts[i, :, 2] >= KPT_SCORE
            # the fp16 person nearest in keypoints (persons may swap ranks on close scores)
            diffs = np.abs(b.kpts[:, sure, :2] - a.kpts[i, sure, :2]).max(axis=(1, 2))
            worst = max(worst, float(diffs.min()))
            compared += 1
    print(f"fp16 vs fp32: {compared} persons, worst confident keypoint {worst:.3f} model px")
    assert compared >= 10
    assert worst <= MAX_PX


def test_run_settings_make_the_fp16_copy_once_and_auto_stays_fp32_on_cpu(tmp_path):
    from workers.loading import select_model

    rt = from_env(RuntimeSettings)
    model = tmp_path / "pose.onnx"
    shutil.copy(resolve_model(rt.model, rt.cache_dir).path, model)
    auto = select_model(RuntimeSettings(model=str(model), providers="cpu", precision="auto"))
    assert auto.ref.precision == "fp32" and not fp16_path(model).exists()
    wanted = RuntimeSettings(model=str(model), providers="cpu", precision="fp16")
    first = select_model(wanted)
    assert first.ref.path == fp16_path(model) and first.ref.name == "pose-fp16"
    made = first.ref.path.stat().st_mtime_ns
    assert select_model(wanted).ref.path.stat().st_mtime_ns == made  # converted once
    assert first.ref.sha256 != auto.ref.sha256  # the manifest tells fp16 results apart


def _graph_with_two_casts(second_to: int):
    from onnx import TensorProto, helper

    def cast(to: int):
        return helper.make_node("Cast", ["h"], ["h_fp32"], name="h_cast", to=to)

    return helper.make_graph(
        [helper.make_node("Identity", ["x"], ["h"], name="id"), cast(TensorProto.FLOAT),
         cast(second_to), helper.make_node("Relu", ["h_fp32"], ["y"], name="relu")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])


def test_a_cast_the_converter_inserted_twice_is_kept_once():
    # onnxruntime(-gpu) 1.31.1's converter wrote 15 such pairs into YOLO11's fp16 copy, which
    # ONNX Runtime then refused to load ("two nodes with same node name"), seen on an H100.
    from onnx import TensorProto, checker, helper

    from workers.tools.fp16 import drop_repeated_nodes

    graph = _graph_with_two_casts(TensorProto.FLOAT)
    assert drop_repeated_nodes(graph) == 1
    assert [n.name for n in graph.node] == ["id", "h_cast", "relu"]
    checker.check_model(helper.make_model(graph), full_check=True)


def test_two_different_nodes_writing_one_tensor_are_an_error_not_a_silent_pick():
    from onnx import TensorProto

    from posebatch.errors import ModelError
    from workers.tools.fp16 import drop_repeated_nodes

    with pytest.raises(ModelError, match="defines 'h_fp32' twice"):
        drop_repeated_nodes(_graph_with_two_casts(TensorProto.DOUBLE))
