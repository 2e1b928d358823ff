"""The head's best candidates picked in the graph (``workers.engine.output_tail``) give exactly the
persons of the full head: decoding, the graph edit, both session paths, and the dev set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from posebatch.settings import JobSettings
from tests.devdata import require_dev_data
from tests.test_batched_results import random_heads, same
from tests.test_uint8_input import default_model
from workers.engine.layouts import PersonBatch, decode_yolo_raw_batch, decode_yolo_top_batch
from workers.engine.output_tail import TOP, TOP_INDEX, add_top_candidates
from workers.engine.pipeline import PoseEngine
from workers.engine.runner import PoseModel


def top_of(out: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """What the graph's TopK gives: per image the k best anchors, by descending score."""
    index = np.argsort(-out[:, 4, :], axis=1, kind="stable")[:, :k]
    return np.take_along_axis(out, index[:, None, :], axis=2), index


def same_persons(a: PersonBatch, b: PersonBatch) -> bool:
    return all(same(getattr(a, f), getattr(b, f))
               for f in ("image", "counts", "boxes_xyxy", "scores", "kpts"))


@pytest.mark.parametrize("case", range(4))
def test_top_candidates_decode_to_the_full_heads_persons_bit_for_bit(case: int):
    rng = np.random.default_rng(100 + case)
    decoded = fell_back = 0
    for _trial in range(80):
        out = random_heads(rng, int(rng.integers(1, 5)), int(rng.integers(1, 500)))
        if case == 1:
            out[:, 4] = np.round(out[:, 4], 1)  # ties: the anchor order must come back
        if case == 2:
            out[:, 4, :5] = np.nan  # NaN scores are never candidates, wherever TopK puts them
        conf = float(rng.choice([0.0, 0.05, 0.3]))
        k = int(rng.integers(1, 80)) if case == 3 else 300
        top, index = top_of(out, min(k, out.shape[2]))
        got = decode_yolo_top_batch(top, index, conf, 0.6, 100)
        if got is None:  # more may pass than were kept: the caller decodes the full head
            fell_back += 1
            assert not (top[:, 4, -1] < conf).all()
            continue
        decoded += 1
        assert same_persons(got, decode_yolo_raw_batch(out, conf, 0.6, 100))
    assert decoded and (fell_back or case in (0, 1))


def test_graph_outputs_the_best_columns_of_the_head():
    model = add_top_candidates(Path(default_model()).read_bytes(), k=50)
    assert model is not None
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()][1:] == [TOP, TOP_INDEX]
    x = np.random.default_rng(0).random((2, 3, 320, 256), dtype=np.float32)
    head, top, index = session.run(None, {session.get_inputs()[0].name: x})
    assert top.shape == (2, 56, 50) and index.shape == (2, 50)
    assert np.array_equal(np.take_along_axis(head, index[:, None, :], axis=2), top)
    best = np.sort(head[:, 4], axis=1)[:, ::-1][:, :50]
    assert np.array_equal(top[:, 4], best)
    # a grid smaller than K keeps every anchor
    _h, small, _i = session.run(None, {session.get_inputs()[0].name: x[:, :, :32, :32]})
    assert small.shape == (2, 56, 21)  # 4x4 + 2x2 + 1x1 anchors


def test_graphs_without_a_raw_head_are_left_alone():
    assert add_top_candidates(b"not a model") is None
    assert add_top_candidates(b"") is None


@pytest.mark.parametrize("io_binding", [False, True])
def test_model_head_equals_the_full_heads_persons_including_the_fall_back(io_binding: bool):
    plain = PoseModel(default_model(), "cpu", io_binding=io_binding, output_tail=True)
    assert plain.tail
    x = (np.random.default_rng(1).random((2, 3, 640, 640)) * 255).astype(np.uint8)
    full = plain.run_raw(x)[0]
    assert full.shape == (2, 56, 8400)
    for conf in (0.05, 0.0):  # 0.0: every anchor passes, the K-th too: the full head is fetched
        head = plain.run_head(x)
        assert head.top is not None and head.raw is None
        got = head.persons(2, conf, 0.6, 300)
        assert same_persons(got, decode_yolo_raw_batch(full, conf, 0.6, 300))


def test_tail_is_on_for_gpus_and_where_the_environment_asks(monkeypatch):
    assert not PoseModel(default_model(), "cpu").tail  # auto: a CPU's head is host memory
    monkeypatch.setenv("POSEBATCH_OUTPUT_TAIL", "1")
    assert PoseModel(default_model(), "cpu").tail


def test_dev_set_results_with_and_without_the_tail_are_identical():
    dev = require_dev_data()
    images = sorted((dev / "images").rglob("*.jpg"))
    items = [(p.name, p.read_bytes) for p in images]
    job = JobSettings()
    with_tail = PoseModel(default_model(), "cpu", output_tail=True)
    without = PoseModel(default_model(), "cpu", output_tail=False)
    assert with_tail.tail and not without.tail
    a = dict(PoseEngine(with_tail, job, 4, 2).run(items))
    b = dict(PoseEngine(without, job, 4, 2).run(items))
    assert a.keys() == b.keys() and len(a) == len(images)
    for key in a:
        a[key].pop("log_id"), b[key].pop("log_id")
        assert a[key] == b[key], key
