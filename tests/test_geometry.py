"""Letterbox round trip, NMS and the per-image result rules of SPEC (pure functions)."""

from __future__ import annotations

import numpy as np
import pytest

from posebatch.schema import PoseResult, error_result
from workers.engine.layouts import decode_yolo_raw, nms
from workers.engine.letterbox import (
    input_shape_for,
    letterbox,
    letterbox_params,
    to_source_xy,
)


@pytest.mark.parametrize("src_hw", [(1080, 1920), (3024, 4032), (240, 320), (15, 4096),
                                    (4096, 15), (640, 640), (333, 777)])
@pytest.mark.parametrize("out_hw", [(640, 640), (480, 640), (384, 640)])
def test_letterbox_round_trip_is_exact(src_hw, out_hw):
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, (50, 2)) * np.array([src_hw[1], src_hw[0]])
    img = np.zeros((*src_hw, 3), np.uint8)
    canvas, lb = letterbox(img, out_hw)
    assert canvas.shape == (*out_hw, 3)
    model_xy = xy * lb.scale + np.array([lb.pad_x, lb.pad_y])  # the documented forward map
    back = to_source_xy(model_xy, lb)
    np.testing.assert_allclose(back, xy, atol=1e-2)


def test_letterbox_puts_pixels_where_the_mapping_says():
    img = np.zeros((300, 600, 3), np.uint8)
    img[100:110, 400:410] = 255  # a white square centred at (405, 105)
    canvas, lb = letterbox(img, (640, 640))
    ys, xs = np.nonzero(canvas[..., 0] > 128)
    centre = np.array([[xs.mean(), ys.mean()]])
    np.testing.assert_allclose(to_source_xy(centre, lb), [[405, 105]], atol=1.5)
    assert lb.pad_x == 0 and lb.pad_y == 160  # 600x300 -> 640x320, centred vertically


def test_letterbox_params_rejects_empty_sizes():
    with pytest.raises(ValueError, match="expected positive sizes"):
        letterbox_params((0, 10), (640, 640))


@pytest.mark.parametrize(("src_hw", "expected"), [((3024, 4032), (480, 640)),
                                                   ((1080, 1920), (384, 640)),
                                                   ((4032, 3024), (640, 480)),
                                                   ((500, 500), (640, 640))])
def test_rect_input_shape_is_stride_aligned(src_hw, expected):
    assert input_shape_for(src_hw, 640) == expected


def test_nms_keeps_best_of_overlapping_boxes():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.8, 0.9, 0.7], np.float32)
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.99).tolist() == [1, 0, 2]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []


def test_decode_yolo_raw_reads_the_ultralytics_layout():
    out = np.zeros((56, 4), np.float32)
    out[:4, 0] = [100, 200, 40, 80]  # cx, cy, w, h
    out[4, 0] = 0.9
    out[5:, 0] = np.tile([100, 190, 0.8], 17)
    out[4, 1] = 0.01  # below the threshold
    det = decode_yolo_raw(out, conf=0.05, iou=0.6, max_det=10)
    assert len(det) == 1
    np.testing.assert_allclose(det.boxes_xyxy[0], [80, 160, 120, 240])
    assert det.kpts.shape == (1, 17, 3)
    with pytest.raises(ValueError, match=r"expected raw YOLO-pose output \(56, N\)"):
        decode_yolo_raw(np.zeros((57, 3)), 0.1, 0.5, 10)


def _result(n: int, w: int = 100, h: int = 80) -> PoseResult:
    rng = np.random.default_rng(n)
    kpts = rng.uniform(-50, 150, (n, 21, 3)).astype(np.float32)
    kpts[..., 2] = rng.uniform(0, 1, (n, 21))
    boxes = np.tile(np.array([[-10, 5, 120, 90]], np.float32), (n, 1))
    return PoseResult(kpts, boxes, rng.uniform(0, 1, n).astype(np.float32), w, h)


def test_api_result_has_21_keypoints_and_person_num():
    api = _result(3).clamped().to_api()
    assert api["person_num"] == len(api["person_info"]) == 3
    names = list(api["person_info"][0]["body_parts"])
    assert len(names) == 21 and names[0] == "top_head" and names[-1] == "right_ankle"
    for p in api["person_info"]:
        assert set(p["location"]) == {"left", "top", "width", "height", "score"}
        for part in p["body_parts"].values():
            assert set(part) == {"x", "y", "score"}
            assert 0 <= part["score"] <= 1
            assert all(isinstance(part[k], float) for k in ("x", "y", "score"))
    scores = [p["location"]["score"] for p in api["person_info"]]
    assert scores == sorted(scores, reverse=True)


def test_keypoints_outside_the_image_are_clamped_to_the_border_keeping_score():
    res = _result(4, w=100, h=80)
    api = res.clamped().to_api()
    for p in api["person_info"]:
        for part in p["body_parts"].values():
            assert 0 <= part["x"] <= 99 and 0 <= part["y"] <= 79
        loc = p["location"]
        assert loc["left"] >= 0 and loc["top"] >= 0
        assert loc["left"] + loc["width"] <= 100 and loc["top"] + loc["height"] <= 80
    outside = np.nonzero(res.kpts[0, :, 0] > 99)[0][0]
    clamped = res.clamped()
    assert clamped.kpts[0, outside, 0] == 99
    assert clamped.kpts[0, outside, 2] == res.kpts[0, outside, 2]


def test_log_ids_are_unique_unsigned_64_bit():
    ids = [_result(1).to_api()["log_id"] for _ in range(2000)]
    ids += [error_result(216201, "x")["log_id"] for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(0 <= i < 2**64 for i in ids)


def test_empty_result_and_error_shape():
    api = _result(0).to_api()
    assert api["person_num"] == 0 and api["person_info"] == []
    err = error_result(216202, "too big")
    assert set(err) == {"error_code", "error_msg", "log_id"}


@pytest.mark.parametrize(("kpts_shape", "boxes_shape", "n", "message"), [
    ((2, 17, 3), (2, 4), 2, r"expected kpts of shape \(2, 21, 3\), got \(2, 17, 3\)"),
    ((2, 21, 3), (2, 5), 2, r"expected boxes_xyxy of shape \(2, 4\), got \(2, 5\)"),
])
def test_pose_result_validates_shapes(kpts_shape, boxes_shape, n, message):
    with pytest.raises(ValueError, match=message):
        PoseResult(np.zeros(kpts_shape), np.zeros(boxes_shape), np.zeros(n), 10, 10)
