"""The ``best`` quality passes: flip-back, fusion, OKS-NMS and scale changes, exactly; and on the
dev set, ``best`` against ``fast`` (the issue's acceptance rule)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from posebatch.errors import ConfigError
from posebatch.evaluate import evaluate
from posebatch.modelstore import resolve_model
from posebatch.settings import JobSettings, RuntimeSettings
from tests.devdata import require_dev_data
from workers.engine import tta
from workers.engine.layouts import Detections
from workers.engine.letterbox import letterbox, to_source_xy


def person(x: float, y: float, size: float = 100.0, score: float = 0.9, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = np.zeros((17, 3), np.float32)
    k[:, 0] = x + rng.uniform(0, size, 17)
    k[:, 1] = y + rng.uniform(0, size, 17)
    k[:, 2] = rng.uniform(0.3, 1.0, 17)
    return np.array([x, y, x + size, y + size], np.float32), np.float32(score), k


def nobody() -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                      np.zeros((0, 17, 3), np.float32))


def dets(*people) -> Detections:
    if not people:
        return nobody()
    b, s, k = zip(*people, strict=True)
    return Detections(np.stack(b), np.array(s, np.float32), np.stack(k))


def test_flip_back_mirrors_and_swaps_sides():
    box, score, k = person(100, 50)
    back = tta.flip_back(dets((box, score, k)), 640.0)
    np.testing.assert_allclose(back.kpts[0, :, 0], 640.0 - k[tta.FLIP_INDEX, 0])
    np.testing.assert_allclose(back.kpts[0, :, 1:], k[tta.FLIP_INDEX, 1:])
    np.testing.assert_allclose(back.boxes_xyxy[0], [640 - box[2], box[1], 640 - box[0], box[3]])
    # mirroring twice is the identity
    again = tta.flip_back(back, 640.0)
    np.testing.assert_allclose(again.kpts, k[None], rtol=1e-6)


def test_fusion_keeps_every_plain_person_and_adds_none():
    a, b = person(0, 0, seed=1), person(300, 300, seed=2)
    twin = (a[0] + 2, np.float32(0.95), a[2].copy())
    twin[2][:, :2] += 2.0                              # the same person, 2 px off
    stranger = person(600, 0, seed=3)                   # only the mirrored pass saw it
    fused = tta.fuse_flip(dets(a, b), dets(twin, stranger))
    assert len(fused) == 2
    w1, w2 = a[2][:, 2:3], twin[2][:, 2:3]
    want = (a[2][:, :2] * w1 + twin[2][:, :2] * w2) / (w1 + w2)
    np.testing.assert_allclose(fused.kpts[0, :, :2], want, rtol=1e-5)
    np.testing.assert_allclose(fused.kpts[0, :, 2], (a[2][:, 2] + twin[2][:, 2]) / 2, rtol=1e-6)
    assert fused.scores[0] == pytest.approx(0.95)       # the higher person score
    np.testing.assert_array_equal(fused.kpts[1], b[2])  # unmatched: unchanged
    assert fused.scores[1] == b[1]


def test_fusion_with_nothing_mirrored_is_the_plain_pass():
    a = person(0, 0)
    fused = tta.fuse_flip(dets(a), nobody())
    np.testing.assert_array_equal(fused.kpts, dets(a).kpts)


def test_oks_nms_drops_duplicates_and_keeps_distinct_people():
    a = person(0, 0, score=0.6, seed=1)
    dup = (a[0], np.float32(0.8), a[2].copy())
    dup[2][:, :2] += 1.0
    b = person(400, 400, score=0.3, seed=2)
    kept = tta.oks_nms(dets(a, dup, b))
    assert list(kept.scores) == pytest.approx([0.8, 0.3])


def test_reframe_maps_a_second_scale_onto_the_first_exactly():
    rgb = np.zeros((480, 720, 3), np.uint8)
    _, lb640 = letterbox(rgb, (640, 640))
    _, lb960 = letterbox(rgb, (960, 960))
    src = np.array([[[100.0, 200.0, 0.5]] * 17], np.float32)     # one person, source pixels
    in960 = src.copy()
    in960[..., 0] = src[..., 0] * lb960.scale + lb960.pad_x
    in960[..., 1] = src[..., 1] * lb960.scale + lb960.pad_y
    moved = tta.reframe(Detections(np.zeros((1, 4), np.float32), np.ones(1, np.float32), in960),
                        lb960, lb640)
    np.testing.assert_allclose(to_source_xy(moved.kpts[..., :2], lb640), src[..., :2], atol=1e-3)


def test_infer_best_runs_the_passes_it_is_asked_for():
    calls: list[tuple[int, ...]] = []

    def infer(batch: np.ndarray) -> list[Detections]:
        calls.append(batch.shape)
        return [nobody() for _ in batch]

    rgb = np.zeros((48, 64, 3), np.uint8)
    canvas, lb = letterbox(rgb, (64, 64))
    batch = np.zeros((2, 3, 64, 64), np.float32)
    tta.infer_best(infer, batch, [rgb, rgb], [lb, lb], 64, False, 10, flip=True, scale=True)
    assert calls == [(2, 3, 64, 64), (2, 3, 64, 64), (2, 3, 96, 96)]
    calls.clear()
    tta.infer_best(infer, batch, [rgb, rgb], [lb, lb], 64, True, 10, flip=False, scale=True)
    assert calls == [(2, 3, 64, 64), (2, 3, 96, 96)]           # rect: 72x96 -> 96 wide


def test_quality_is_a_checked_job_setting_that_travels():
    job = JobSettings(quality="best")
    assert JobSettings.from_dict(job.to_dict()) == job
    with pytest.raises(ConfigError, match="quality must be one of fast, flip, scale, best"):
        JobSettings(quality="max")
    assert tta.passes("fast") == (False, False) and tta.passes("best") == (True, True)
    assert tta.decode_side("best", 640) == 960 and tta.decode_side("flip", 640) == 640


# ---------------------------------------------------------------- the acceptance rule, dev set
def _run_dev(quality: str, out: Path) -> dict:
    from workers.engine.pipeline import PoseEngine
    from workers.engine.runner import PoseModel

    dev = require_dev_data()
    gt = json.loads((dev / "annotations.json").read_text())
    rt = RuntimeSettings()
    model = PoseModel(str(resolve_model(rt.model, rt.cache_dir).path), "cpu")
    items = [(im["file_name"], lambda p=dev / "images" / im["file_name"]: p.read_bytes())
             for im in gt["images"]]
    for key, result in PoseEngine(model, JobSettings(quality=quality), 4, 2).run(items):
        path = out / (key + ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return evaluate(str(dev / "annotations.json"), str(out), per_keypoint_ap=False)


def test_best_beats_fast_on_the_dev_set(tmp_path):
    """Measured (README "Quality"): fast recall 0.581, AP17 0.288, PCK21@0.05 0.378;
    best 0.742, 0.307, 0.423."""
    fast = _run_dev("fast", tmp_path / "fast")
    best = _run_dev("best", tmp_path / "best")
    assert best["recall"] >= fast["recall"]
    assert best["AP17"] > fast["AP17"] and best["AP"] > fast["AP"]
    assert best["PCK21_05"] > fast["PCK21_05"]


def test_people_with_alike_keypoints_but_apart_are_not_merged():
    """A detector without keypoints (all at 0, 0) makes every pair look alike by OKS alone."""
    a = (np.array([0, 0, 100, 100], np.float32), np.float32(0.9), np.zeros((17, 3), np.float32))
    b = (np.array([300, 0, 400, 100], np.float32), np.float32(0.8), np.zeros((17, 3), np.float32))
    assert len(tta.oks_nms(dets(a, b))) == 2
    assert tta.fuse_flip(dets(a), dets(b)).scores[0] == pytest.approx(0.9)   # not fused


def test_quality_flag_rejects_unknown_values_with_the_choices():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "posebatch.cli", "run", "in", "--out", "out",
                           "--quality", "max"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "fast" in proc.stderr and "best" in proc.stderr
