"""uint8 model input, the normalisation folded into the graph (issue 20)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from posebatch.evaluate import evaluate
from posebatch.modelstore import resolve_model
from posebatch.settings import JobSettings, RuntimeSettings, from_env
from tests import onnx_graphs as G
from tests.devdata import require_dev_data
from workers.engine.letterbox import fit, write_input
from workers.engine.pipeline import PoseEngine
from workers.engine.runner import PoseModel
from workers.engine.uint8_input import fold_uint8_input

GOLDEN = Path(__file__).parent / "data" / "golden_dev_ort_fp32.json"
CLI = [sys.executable, "-m", "posebatch.cli"]


def default_model() -> str:
    rt = from_env(RuntimeSettings)
    return str(resolve_model(rt.model, rt.cache_dir).path)


def test_folded_default_model_gives_the_float_models_outputs_bit_for_bit():
    path = default_model()
    folded, name = fold_uint8_input(Path(path).read_bytes())
    assert name == "images_uint8"
    plain, u8 = ort.InferenceSession(path), ort.InferenceSession(folded)
    assert u8.get_inputs()[0].type == "tensor(uint8)"
    x = np.random.default_rng(0).integers(0, 256, (2, 3, 320, 480), dtype=np.uint8)
    a = plain.run(None, {"images": x * np.float32(1 / 255)})[0]
    b = u8.run(None, {name: x})[0]
    assert np.array_equal(a, b)


def test_rtmo_layout_takes_bgr_0_255_without_scaling(tmp_path: Path):
    path = G.rtmo(tmp_path / "rtmo.onnx", np.array([[10.0, 20.0, 110.0, 220.0]]),
                  np.array([0.9]), np.zeros((1, 17, 3)), score_from_input=True)
    model = PoseModel(str(path), "cpu")
    assert model.input_dtype == np.uint8
    rgb = np.random.default_rng(1).random((1, 3, 64, 64), dtype=np.float32)
    rgb[0, 2] = np.float32(200 / 255)  # blue: the graph's first (B) channel peaks at 200
    as_u8 = model.as_input(rgb)
    assert as_u8.dtype == np.uint8 and as_u8.shape == (1, 3, 64, 64)
    assert np.allclose(model.infer(as_u8, 0.05, 0.6, 10)[0].scores, [0.2], atol=1e-6)
    float_model = PoseModel(str(path), "cpu", uint8_input=False)
    # the same persons from the float path (BGR * 255 in numpy) and the folded one
    a = float_model.infer(rgb, 0.05, 0.6, 10)[0]
    b = model.infer(rgb, 0.05, 0.6, 10)[0]
    assert np.allclose(a.scores, b.scores, atol=1e-2) and np.allclose(a.kpts, b.kpts, atol=1e-3)


def test_graph_without_a_float_input_is_left_as_it_is(tmp_path: Path):
    path = G.yolo_raw(tmp_path / "m.onnx", np.array([[50.0, 50.0, 20.0, 20.0]]),
                      np.array([0.9]), np.zeros((1, 17, 3)))
    folded, _name = fold_uint8_input(path.read_bytes())
    assert fold_uint8_input(folded) is None  # already uint8: nothing to fold


def test_uint8_slot_holds_the_pixels_and_gray_bands():
    rgb = np.random.default_rng(2).integers(0, 256, (36, 64, 3), dtype=np.uint8)
    resized, box = fit(rgb, (64, 64))
    slot = np.zeros((3, 64, 64), np.uint8)
    write_input(resized, box, slot)
    top = int(box.pad_y)
    assert (slot[:, :top] == 114).all() and (slot[:, top + 36:] == 114).all()
    assert np.array_equal(slot[:, top:top + 36], rgb.transpose(2, 0, 1))
    as_float = np.zeros((3, 64, 64), np.float32)
    write_input(resized, box, as_float)
    assert np.array_equal(as_float[:, top:top + 36], slot[:, top:top + 36] * np.float32(1 / 255))
    odd = np.ascontiguousarray(rgb[::2, ::2])[:, ::-1]  # a non-contiguous decoded array
    resized, box = fit(odd, (32, 32))
    small = np.zeros((3, 32, 32), np.uint8)
    write_input(resized, box, small)
    assert np.array_equal(small[:, int(box.pad_y):int(box.pad_y) + 18], odd.transpose(2, 0, 1))


def test_engine_batches_are_uint8_for_the_default_model():
    model = PoseModel(default_model(), "cpu")
    engine = PoseEngine(model, JobSettings(), 4, 2)
    assert engine.input_dtype == np.uint8
    seen: list[np.dtype] = []
    run_head = model.run_head
    model.run_head = lambda batch: (seen.append(batch.dtype), run_head(batch))[1]  # type: ignore[method-assign]
    dev = require_dev_data()
    one = next(p for p in sorted((dev / "images").rglob("*.jpg")))
    results = dict(engine.run([("a", one.read_bytes)]))
    assert seen == [np.dtype(np.uint8)] and results["a"]["person_num"] >= 1


def test_dev_set_accuracy_with_uint8_input_equals_the_float_inputs(tmp_path: Path):
    """The gray bands move one float32 step: AP and PCK stay within 0.005 of the float input's
    (``POSEBATCH_UINT8_INPUT=0``: the engine's path before the fold), both run here, with this
    host's model and kernels (a golden file from one host skipped everywhere else)."""
    dev = require_dev_data()
    outs = {}
    for name, flag in (("float", "0"), ("uint8", "1")):
        outs[name] = tmp_path / name
        proc = subprocess.run([*CLI, "run", str(dev / "images"), "--out", str(outs[name]),
                               "--backend", "ort", "--precision", "fp32", "--providers", "cpu",
                               "--force", "--no-progress"], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "POSEBATCH_UINT8_INPUT": flag})
        assert proc.returncode == 0, proc.stderr[-3000:]
    gt = str(dev / "annotations.json")
    before, after = evaluate(gt, str(outs["float"])), evaluate(gt, str(outs["uint8"]))
    for metric in ("AP", "AP50", "AP17", "PCK21_05", "PCK21_10"):
        assert abs(after[metric] - before[metric]) <= 0.005, (metric, before, after)


def test_model_with_external_weights_runs_with_its_float_input(tmp_path: Path):
    # A graph given to ONNX Runtime as bytes cannot find weights in a file beside it: the
    # folded model does not load, and the model runs as before (float input) instead of failing.
    import onnx

    path = G.yolo_raw(tmp_path / "m.onnx", np.array([[50.0, 50.0, 20.0, 20.0]]),
                      np.array([0.9]), np.zeros((1, 17, 3)))
    external = tmp_path / "ext" / "m.onnx"
    external.parent.mkdir()
    onnx.save(onnx.load(str(path)), str(external), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.data", size_threshold=0,
              convert_attribute=True)
    assert (external.parent / "m.data").is_file()
    model = PoseModel(str(external), "cpu")
    assert model.input_dtype == np.float32
    dets = model.infer(np.zeros((1, 3, 64, 64), np.float32), 0.05, 0.6, 10)
    assert len(dets[0]) == 1


def test_bytes_that_are_no_model_are_left_to_the_runtime():
    assert fold_uint8_input(b"not an onnx model") is None
    assert fold_uint8_input(b"") is None
