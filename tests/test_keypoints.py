"""COCO-17 -> API-21 keypoints: layout, derived points, scores, and accuracy on the dev set.

Tolerances come from scripts/fit_derived_keypoints.py (docs/keypoints.md): on the seed's example
the derived points land within 0.013 of the box size; on the dev set, through the model, the
module's top_head is within 5% of the box for 0.67 of the matched people against 0.56 for the
issue's plain rule.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from posebatch.schema import API21_NAMES
from tests.devdata import require_dev_data
from workers.engine import keypoints as K
from workers.engine.keypoints import COCO17_NAMES, to_api21

ROOT = Path(__file__).resolve().parent.parent
A = {n: i for i, n in enumerate(API21_NAMES)}
C = {n: i for i, n in enumerate(COCO17_NAMES)}


def _load_fit_script():
    spec = importlib.util.spec_from_file_location(
        "fit_derived_keypoints", ROOT / "scripts" / "fit_derived_keypoints.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FIT = _load_fit_script()
SEED, SEED_BOX, seed_kp17 = FIT.SEED, FIT.SEED_BOX, FIT.seed_kp17


def rotate(kp: np.ndarray, degrees: float, centre=(640.0, 480.0)) -> np.ndarray:
    t = np.deg2rad(degrees)
    r = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    out = kp.astype(np.float64).copy()
    out[..., :2] = (kp[..., :2] - centre) @ r.T + centre
    return out


def mirror(kp: np.ndarray, width: float = 1280.0) -> np.ndarray:
    """Mirror x; the person's left stays its left (a mirrored person is still a person)."""
    out = kp.astype(np.float64).copy()
    out[..., 0] = width - out[..., 0]
    return out


# ---------------------------------------------------------------------------------- layout
@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (np.zeros((17, 3)), ValueError, r"expected kp17 of shape \(n, 17, 3\), got \(17, 3\)"),
        (np.zeros((1, 21, 3)), ValueError,
         r"expected kp17 of shape \(n, 17, 3\), got \(1, 21, 3\)"),
        (np.zeros((2, 17, 2)), ValueError, r"got \(2, 17, 2\)"),
        (np.zeros(0), ValueError, r"got \(0,\)"),
        (np.full((1, 17, 3), "a"), ValueError, "numeric"),
        (np.zeros((0, 17, 3), dtype=np.float32), None, None),
        (np.zeros((3, 17, 3), dtype=np.float64), None, None),
        ([[[1.0, 2.0, 0.5]] * 17], None, None),
    ],
)
def test_shape_validation(value, error, match):
    if error is None:
        out = to_api21(value)
        assert out.shape == (len(np.asarray(value)), 21, 3)
        assert out.dtype == np.float32
    else:
        with pytest.raises(error, match=match):
            to_api21(value)


def test_names():
    assert len(COCO17_NAMES) == 17 and len(API21_NAMES) == 21
    assert set(API21_NAMES) - set(COCO17_NAMES) == set(K.DERIVED_NAMES)


def test_coco_points_copy_through():
    rng = np.random.default_rng(0)
    kp = rng.uniform(0, 1000, (5, 17, 3)).astype(np.float32)
    kp[..., 2] = rng.uniform(0, 1, (5, 17))
    out = to_api21(kp)
    for name in COCO17_NAMES:
        np.testing.assert_array_equal(out[:, A[name]], kp[:, C[name]])


def test_batch_equals_one_by_one():
    rng = np.random.default_rng(1)
    kp = rng.uniform(0, 800, (40, 17, 3))
    kp[..., 2] = rng.choice([0.0, 0.3, 0.6, 0.95], (40, 17))
    batch = to_api21(kp)
    for i in range(len(kp)):
        np.testing.assert_array_equal(batch[i], to_api21(kp[i:i + 1])[0])


# ----------------------------------------------------------------------------- the rules
def test_rules_in_closed_form():
    """An upright frontal face: eyes at y=100, nose 10 px below, ears 60 px apart."""
    kp = np.zeros((1, 17, 3))
    kp[..., 2] = 0.9
    pts = {"nose": (50, 110), "left_eye": (60, 100), "right_eye": (40, 100),
           "left_ear": (80, 105), "right_ear": (20, 105), "left_shoulder": (90, 200),
           "right_shoulder": (10, 200)}
    for name, xy in pts.items():
        kp[0, C[name], :2] = xy
    d = {n: v[0] for n, v in K.derive(kp).items()}
    head = max(K.EAR_RATIO * 60, K.NOSE_RATIO * 10)            # 54: the ears set the length
    np.testing.assert_allclose(d["top_head"][:2], [50, 100 - K.TOP_HEAD_K * head])
    np.testing.assert_allclose(d["neck"][:2], [50, 200 + K.NECK_F * (110 - 200)])
    drop = K.MOUTH_DROP * 10
    for side, eye_x in (("left", 60), ("right", 40)):
        corner = np.array([eye_x, 100 + drop])
        want = corner + K.MOUTH_PULL * (np.array([50, 110]) - corner)
        np.testing.assert_allclose(d[f"{side}_mouth_corner"][:2], want)


# Tolerance: 2% of the seed's box (14 px); the module lands at 8.9 px (top_head), 7.0 (neck) and
# 3.7 (mouth corners): scripts/fit_derived_keypoints.py prints them.
@pytest.mark.parametrize("name", K.DERIVED_NAMES)
def test_seed_example(name):
    out = to_api21(seed_kp17())[0]
    assert np.linalg.norm(out[A[name], :2] - SEED[name]) <= 0.02 * SEED_BOX


def test_seed_example_ordering():
    out = to_api21(seed_kp17())[0]
    y = {n: out[A[n], 1] for n in API21_NAMES}
    shoulders_y = (y["left_shoulder"] + y["right_shoulder"]) / 2
    assert y["top_head"] < min(y["left_eye"], y["right_eye"], y["left_ear"], y["right_ear"])
    assert y["nose"] < y["left_mouth_corner"] == y["right_mouth_corner"] < y["neck"]
    assert y["neck"] < shoulders_y


@pytest.mark.parametrize("kp", [seed_kp17(), mirror(seed_kp17()), rotate(seed_kp17(), 90),
                                rotate(seed_kp17(), 180)],
                         ids=["seed", "mirrored", "rot90", "upside-down"])
def test_mouth_corners_follow_own_eyes(kp):
    out = to_api21(kp)[0]
    lm, rm = out[A["left_mouth_corner"], :2], out[A["right_mouth_corner"], :2]
    le, re_ = out[A["left_eye"], :2], out[A["right_eye"], :2]
    assert np.linalg.norm(lm - le) < np.linalg.norm(lm - re_)
    assert np.linalg.norm(rm - re_) < np.linalg.norm(rm - le)
    nose = out[A["nose"], :2]
    eye_mid = (le + re_) / 2
    down = (nose - eye_mid) / np.linalg.norm(nose - eye_mid)
    assert np.dot(lm - eye_mid, down) > np.dot(nose - eye_mid, down)


@pytest.mark.parametrize("degrees", [90, 180, 270, 37])
def test_rotation_equivariance(degrees):
    kp = seed_kp17()
    np.testing.assert_allclose(to_api21(rotate(kp, degrees)),
                               rotate(to_api21(kp).astype(np.float64), degrees), atol=1e-2)


def test_mirror_and_scale_equivariance():
    kp = seed_kp17()
    np.testing.assert_allclose(to_api21(mirror(kp)), mirror(to_api21(kp)), atol=1e-2)
    big = kp.astype(np.float64).copy()
    big[..., :2] *= 3.0
    want = to_api21(kp).astype(np.float64)
    want[..., :2] *= 3.0
    np.testing.assert_allclose(to_api21(big), want, rtol=1e-5)


@pytest.mark.parametrize(("degrees", "head_side"), [(180, (0, 1)), (90, (1, 0)), (-90, (-1, 0))])
def test_top_head_on_the_head_side(degrees, head_side):
    out = to_api21(rotate(seed_kp17(), degrees))[0]
    s_mid = (out[A["left_shoulder"], :2] + out[A["right_shoulder"], :2]) / 2
    side = np.asarray(head_side, dtype=float)
    top, neck, nose = out[A["top_head"], :2], out[A["neck"], :2], out[A["nose"], :2]
    assert np.dot(top - s_mid, side) > np.dot(nose - s_mid, side) > np.dot(neck - s_mid, side) > 0


# ------------------------------------------------------------------------------- scores
def test_scores_are_the_minimum_of_their_sources():
    rng = np.random.default_rng(2)
    n = 2000
    kp = rng.uniform(-100, 1500, (n, 17, 3))
    kp[..., 2] = rng.uniform(0, 1, (n, 17))
    out = to_api21(kp)
    sc = kp[..., 2]
    face = sc[:, [C["nose"], C["left_eye"], C["right_eye"]]].min(1)
    ears = sc[:, [C["left_ear"], C["right_ear"]]].min(1)
    np.testing.assert_allclose(out[:, A["left_mouth_corner"], 2], face, rtol=1e-6)
    np.testing.assert_allclose(out[:, A["right_mouth_corner"], 2], face, rtol=1e-6)
    np.testing.assert_allclose(out[:, A["neck"], 2],
                               sc[:, [C["nose"], C["left_shoulder"], C["right_shoulder"]]].min(1),
                               rtol=1e-6)
    top = out[:, A["top_head"], 2]
    xy = kp[..., :2]
    ear_len = K.EAR_RATIO * np.linalg.norm(xy[:, C["left_ear"]] - xy[:, C["right_ear"]], axis=1)
    nose_len = K.NOSE_RATIO * np.linalg.norm(
        xy[:, C["nose"]] - (xy[:, C["left_eye"]] + xy[:, C["right_eye"]]) / 2, axis=1)
    by_ears = ear_len > nose_len
    assert by_ears.any() and (~by_ears).any()
    np.testing.assert_allclose(top[by_ears], np.minimum(face, ears)[by_ears], rtol=1e-6)
    np.testing.assert_allclose(top[~by_ears], face[~by_ears], rtol=1e-6)


# ------------------------------------------------------------------------- degenerate input
def _all_at(x, y, score):
    return np.tile(np.array([x, y, score], dtype=np.float32), (1, 17, 1))


@pytest.mark.parametrize(
    "kp",
    [
        np.zeros((1, 17, 3), dtype=np.float32),
        _all_at(100.0, 100.0, 1.0),
        np.full((1, 17, 3), np.nan, dtype=np.float32),
        np.full((1, 17, 3), np.inf, dtype=np.float32),
        np.full((1, 17, 3), 1e30, dtype=np.float32),
        np.where(np.arange(17)[None, :, None] == C["nose"], np.nan, seed_kp17()),
        np.where(np.isin(np.arange(17), [C["left_eye"], C["right_eye"], C["nose"]])[None, :, None],
                 np.array([620.0, 290.0, 1.0]), seed_kp17()),   # eyes and nose coincide
    ],
    ids=["zeros", "coincident", "nan", "inf", "huge", "nan-nose", "same-eyes-nose"],
)
def test_degenerate_input_is_finite(kp):
    with np.errstate(all="raise"):
        out = to_api21(kp)
    assert out.shape == (1, 21, 3)
    assert np.isfinite(out).all()
    assert ((out[..., 2] >= 0) & (out[..., 2] <= 1)).all()


def test_coincident_eyes_and_nose_put_top_head_above_the_shoulders():
    kp = seed_kp17()
    for name in ("nose", "left_eye", "right_eye"):
        kp[0, C[name], :2] = (620.0, 290.0)
    out = to_api21(kp)[0]
    assert out[A["top_head"], 1] < 290.0   # up from the shoulders through the eyes


def test_non_finite_point_scores_zero():
    kp = seed_kp17()
    kp[0, C["nose"], 0] = np.nan
    out = to_api21(kp)[0]
    assert out[A["nose"], 2] == 0 and np.isfinite(out).all()
    assert out[A["left_mouth_corner"], 2] == 0      # built from the nose


# ---------------------------------------------------------- accuracy on the dev set, end to end
@pytest.fixture(scope="module")
def dev_predictions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dev = require_dev_data()
    out = tmp_path_factory.mktemp("dev640")
    # ORT FP32: the constant was fitted on its output (OpenVINO bf16 refits 0.79, not 0.80).
    subprocess.run([sys.executable, "-m", "posebatch.cli", "run", str(dev / "images"), "--out",
                    str(out), "--no-progress", "--backend", "ort", "--precision", "fp32"],
                   check=True, capture_output=True, timeout=300)
    return out


def test_fit_script_reproduces_the_constant_and_beats_the_plain_rule(dev_predictions, capsys):
    gt = require_dev_data() / "annotations.json"
    assert FIT.main(["--pred", str(dev_predictions), "--gt", str(gt)]) == 0, \
        capsys.readouterr().out[-2000:]
    out = capsys.readouterr().out
    assert "top_head: plain rule" in out and "leaving each source out" in out


def test_top_head_on_the_dev_set(dev_predictions):
    """Measured 0.67 of 18 matched people within 5% (plain rule 0.56); a rule pointing the
    wrong way or at the wrong scale falls far below."""
    gt = require_dev_data() / "annotations.json"
    rows = [r for r in FIT.matched_people(json.loads(gt.read_text()), dev_predictions)
            if r["gt"][A["top_head"], 2] > 0]
    err = FIT.errors(rows, "top_head")
    assert len(rows) >= 15
    assert np.mean(err < 0.05) >= 0.6, np.round(err, 3)
    assert np.mean(err < 0.05) >= np.mean(FIT.errors(rows, "top_head", 1.0) < 0.05)
