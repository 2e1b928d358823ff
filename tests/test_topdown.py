"""Every model layout, on small synthesized ONNX graphs (tests/onnx_graphs.py) whose outputs are
known in closed form: layout detection, decoding, crops and back-projection, checked exactly
through the whole engine."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from posebatch.errors import ModelError
from posebatch.schema import API21_NAMES
from posebatch.settings import JobSettings, RuntimeSettings
from tests import onnx_graphs as G
from workers.engine import topdown
from workers.engine.keypoints import COCO17_NAMES
from workers.engine.pipeline import PoseEngine
from workers.engine.runner import LAYOUT_RTMO, LAYOUT_YOLO_E2E, LAYOUT_YOLO_RAW, PoseModel
from workers.engine.simcc import decode_simcc, detect_simcc
from workers.engine.topdown import TopDownModel
from workers.loading import open_model as open_for_runtime


def open_model(path: str, providers: str = "cpu", intra_threads: int = 1,
               detector: str | None = None):
    """The model as ``run``, ``worker`` and ``serve`` open it (workers.loading)."""
    return open_for_runtime(RuntimeSettings(model=path, detector=detector, providers=providers,
                                            intra_threads=intra_threads))


W, H = 640, 480          # letterboxed into 640x640 at scale 1 with 80 px of padding on top
PAD_Y = 80.0


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def run_engine(model, images: dict[str, bytes], job: JobSettings | None = None) -> dict:
    engine = PoseEngine(model, job or JobSettings(), batch_size=4, io_threads=2)
    return dict(engine.run([(k, lambda b=b: b) for k, b in images.items()]))


def coco_points(result: dict, person: int = 0) -> np.ndarray:
    parts = result["person_info"][person]["body_parts"]
    return np.array([[parts[n]["x"], parts[n]["y"], parts[n]["score"]] for n in COCO17_NAMES])


# A person in MODEL pixels (the 640x640 letterboxed input): every coordinate a multiple of 0.25,
# so the JSON's 2 decimals hold it exactly.
KPTS = np.stack([100.0 + 8.25 * np.arange(17), 200.0 + 4.5 * np.arange(17),
                 np.linspace(0.5, 0.9, 17)], axis=1)[None].astype(np.float32)
BOX_XYXY = np.array([[90.0, 180.0, 290.0, 300.0]], np.float32)
SCORE = np.array([0.75], np.float32)


def expected_image_points() -> np.ndarray:
    want = KPTS[0].astype(np.float64).copy()
    want[:, 1] -= PAD_Y
    return want


@pytest.mark.parametrize("layout", [LAYOUT_YOLO_RAW, LAYOUT_YOLO_E2E, LAYOUT_RTMO])
def test_one_stage_layouts_decode_and_map_back_exactly(tmp_path, layout):
    path = tmp_path / f"{layout}.onnx"
    if layout == LAYOUT_YOLO_RAW:
        cxcywh = np.concatenate([(BOX_XYXY[:, :2] + BOX_XYXY[:, 2:]) / 2,
                                 BOX_XYXY[:, 2:] - BOX_XYXY[:, :2]], axis=1)
        G.yolo_raw(path, cxcywh, SCORE, KPTS)
    elif layout == LAYOUT_YOLO_E2E:
        G.yolo_e2e(path, BOX_XYXY, SCORE, KPTS)
    else:
        G.rtmo(path, BOX_XYXY, SCORE, KPTS)
    model = open_model(str(path), "cpu", 1)
    assert model.info.layout == layout
    blank = png(np.zeros((H, W, 3), np.uint8))
    results = run_engine(model, {"a": blank, "b": blank})
    for result in results.values():
        assert result["person_num"] == 1
        np.testing.assert_allclose(coco_points(result)[:, :2], expected_image_points()[:, :2])
        np.testing.assert_allclose(coco_points(result)[:, 2], KPTS[0, :, 2], atol=1e-4)
        loc = result["person_info"][0]["location"]
        assert (loc["left"], loc["top"], loc["width"], loc["height"]) == (90.0, 100.0, 200.0,
                                                                           120.0)
        assert loc["score"] == pytest.approx(0.75)


def test_rtmo_gets_bgr_0_to_255(tmp_path):
    path = G.rtmo(tmp_path / "rtmo.onnx", BOX_XYXY, SCORE, KPTS, score_from_input=True)
    blue = np.zeros((H, W, 3), np.uint8)
    blue[..., 2] = 255
    red = np.zeros((H, W, 3), np.uint8)
    red[..., 0] = 255
    results = run_engine(open_model(str(path), "cpu", 1), {"blue": png(blue), "red": png(red)})
    assert results["blue"]["person_info"][0]["location"]["score"] == pytest.approx(0.255)
    # red has no blue: the brightest blue is the letterbox's gray padding, 114
    assert results["red"]["person_info"][0]["location"]["score"] == pytest.approx(0.114)


# ------------------------------------------------------------------------------------- SimCC
def test_decode_simcc_is_argmax_over_ratio_with_the_lower_maximum_as_score():
    x = np.zeros((2, 17, 384), np.float32)
    y = np.zeros((2, 17, 512), np.float32)
    x[0, :, 101], y[0, :, 33] = 0.8, 0.6       # x = 50.5, y = 16.5, score min(0.8, 0.6)
    x[1, :, 0], y[1, :, 511] = 3.0, 2.0        # scores above 1 are clipped
    kp = decode_simcc(x, y, 2.0)
    np.testing.assert_allclose(kp[0], np.tile([50.5, 16.5, 0.6], (17, 1)), rtol=1e-6)
    np.testing.assert_allclose(kp[1], np.tile([0.0, 255.5, 1.0], (17, 1)), rtol=1e-6)


@pytest.mark.parametrize(("outputs", "want"), [
    ([("simcc_x", ["B", 17, 384]), ("simcc_y", ["B", 17, 512])], (0, 1, 2.0)),
    ([("simcc_y", ["B", 17, 512]), ("simcc_x", ["B", 17, 384])], (1, 0, 2.0)),
    ([("out0", ["B", 17, 576]), ("out1", ["B", 17, 768])], (0, 1, 3.0)),    # by ratio
    ([("out0", ["B", 17, 768]), ("out1", ["B", 17, 576])], (1, 0, 3.0)),
    ([("a", ["B", 17, 384]), ("b", ["B", 17, 500])], None),                  # ratios differ
    ([("dets", ["B", 10, 5]), ("keypoints", ["B", 10, 17, 3])], None),       # RTMO
])
def test_simcc_layout_is_read_from_the_graph(outputs, want):
    layout = detect_simcc("input", ["B", 3, 256, 192], outputs)
    if want is None:
        assert layout is None
    else:
        assert (layout.x_output, layout.y_output, layout.split_ratio) == want
        assert layout.input_hw == (256, 192) and layout.num_keypoints == 17


def test_crop_and_back_projection_are_inverse():
    rgb = np.zeros((300, 400, 3), np.uint8)
    rgb[120, 210] = 255                                 # one bright pixel at x=210, y=120
    for k in (1, 2):                                    # crop scale 1 and 2: exact sampling
        box = np.array([[200 - 76.8 * k, 100 - 102.4 * k, 200 + 76.8 * k, 100 + 102.4 * k]])
        centres, sizes = topdown.crop_regions(box, (256, 192))
        np.testing.assert_allclose(sizes, [[192 * k, 256 * k]])
        crop = topdown.warp(rgb, centres[0], sizes[0], (256, 192))
        v, u = np.unravel_index(crop[..., 0].argmax(), crop.shape[:2])
        back = topdown.back_project(np.array([[[u, v, 1.0]]]), centres, sizes, (256, 192))
        np.testing.assert_allclose(back[0, 0, :2], [210, 120])


def test_crops_of_a_batch_go_in_one_call_not_one_per_box():
    calls = []

    def run(crops):
        calls.append(len(crops))
        return np.zeros((len(crops), 17, 3), np.float32)

    rgb = np.zeros((100, 100, 3), np.uint8)
    boxes = [np.array([[0, 0, 50, 50], [10, 10, 60, 90.0]]), np.zeros((0, 4)),
             np.array([[5, 5, 20, 20.0]])]
    out = topdown.estimate(run, [rgb, rgb, rgb], boxes, (64, 48))
    assert calls == [3] and [len(o) for o in out] == [2, 0, 1]
    calls.clear()
    topdown.estimate(run, [rgb, rgb, rgb], boxes, (64, 48), max_per_call=2)
    assert calls == [2, 1]


def test_flip_averages_each_crop_with_its_mirror_image_sides_swapped():
    """A fake model that answers the same points for any crop: keypoint k at (k, 2k) with
    score 0.5 + k / 40. The mirrored crop's answer, mirrored back, puts keypoint k at
    (W - 1 - FLIP[k], 2 FLIP[k]) with FLIP[k]'s score: the result is their weighted mean."""
    from workers.engine.tta import FLIP_INDEX

    k = np.arange(17)
    fixed = np.stack([k, 2 * k, 0.5 + k / 40], axis=1).astype(np.float32)

    def run(crops):
        return np.repeat(fixed[None], len(crops), axis=0)

    rgb = np.zeros((100, 100, 3), np.uint8)
    box = np.array([[10.0, 10.0, 58.0, 74.0]])
    hw = (64, 48)
    got = topdown.estimate(run, [rgb], [box], hw, flip=True)[0][0]
    mirrored = fixed[FLIP_INDEX].copy()
    mirrored[:, 0] = hw[1] - 1 - mirrored[:, 0]
    w1, w2 = fixed[:, 2:3], mirrored[:, 2:3]
    crop_xy = (fixed[:, :2] * w1 + mirrored[:, :2] * w2) / (w1 + w2)
    centres, sizes = topdown.crop_regions(box, hw)
    want = topdown.back_project(np.concatenate([crop_xy, (w1 + w2) / 2], 1)[None], centres,
                                sizes, hw)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def dots_image() -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Two people's boxes, one bright pixel in each (image pixels, x then y)."""
    rgb = np.zeros((H, W, 3), np.uint8)
    dots = [(210, 120), (464, 302)]     # offsets from the crop centres: even at scale 2
    for x, y in dots:
        rgb[y, x] = 255
    return rgb, dots


def test_top_down_finds_each_dot_exactly_through_detector_crop_and_back_projection(tmp_path):
    rgb, dots = dots_image()
    # Boxes (model pixels) whose padded crops are exactly 192x256 (scale 1) and 384x512
    # (scale 2) image pixels around centres (200, 100) and (450, 300).
    boxes = np.array([[200 - 76.8, 100 - 102.4, 200 + 76.8, 100 + 102.4],
                      [450 - 153.6, 300 - 204.8, 450 + 153.6, 300 + 204.8]])
    boxes[:, [1, 3]] += PAD_Y
    cxcywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
    det = G.yolo_raw(tmp_path / "det.onnx", cxcywh, np.array([0.9, 0.8]),
                     np.zeros((2, 17, 3)))
    pose = G.simcc(tmp_path / "rtmpose.onnx")
    model = open_model(str(pose), "cpu", 1, detector=str(det))
    assert isinstance(model, TopDownModel)
    result = run_engine(model, {"img": png(rgb)})["img"]
    # flip averaging of the crops: the mirrored crop finds each dot where it is, too
    flipped = run_engine(model, {"img": png(rgb)}, JobSettings(quality="flip"))["img"]
    for person in range(2):
        np.testing.assert_allclose(coco_points(flipped, person), coco_points(result, person))
    assert result["person_num"] == 2
    for person, (x, y) in enumerate(dots):
        kp = coco_points(result, person)
        np.testing.assert_allclose(kp[:, :2], np.tile([x, y], (17, 1)))
        assert (kp[:, 2] == 1.0).all()
    # the derived points follow (all 17 at one spot: so are they)
    parts = result["person_info"][0]["body_parts"]
    assert (parts["top_head"]["x"], parts["top_head"]["y"]) == dots[0]
    assert set(parts) == set(API21_NAMES)


def test_fixed_batch_simcc_graph_gets_padded_chunks(tmp_path):
    rgb, dots = dots_image()
    boxes = np.array([[200 - 76.8, 100 - 102.4 + PAD_Y, 200 + 76.8, 100 + 102.4 + PAD_Y]])
    cxcywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
    det = G.yolo_raw(tmp_path / "det.onnx", cxcywh, np.array([0.9]), np.zeros((1, 17, 3)))
    pose = G.simcc(tmp_path / "fixed.onnx", batch=4)
    model = open_model(str(pose), "cpu", 1, detector=str(det))
    assert model.simcc.fixed_batch == 4
    results = run_engine(model, {"a": png(rgb), "b": png(rgb)})
    for result in results.values():
        np.testing.assert_allclose(coco_points(result)[:, :2], np.tile(dots[0], (17, 1)))


def test_model_choice_errors_say_what_to_do(tmp_path):
    one_stage = G.yolo_raw(tmp_path / "y.onnx", np.array([[10, 10, 5, 5.0]]), np.array([0.9]),
                           np.zeros((1, 17, 3)))
    with pytest.raises(ModelError, match="--detector is for top-down"):
        open_model(str(one_stage), "cpu", 1, detector=str(one_stage))
    pose = G.simcc(tmp_path / "p.onnx")
    # without --detector, the default model (posebatch model build) gives the boxes
    default = open_model(str(pose))
    assert isinstance(default, TopDownModel) and default.detector.info.layout == LAYOUT_YOLO_RAW
    with pytest.raises(ModelError, match="pass --detector"):   # ... and with no default either
        topdown.open_model(str(pose), lambda p: PoseModel(p, "cpu", 1), "cpu", 1)
    few = G.simcc(tmp_path / "few.onnx", keypoints=5)
    with pytest.raises(ModelError, match="first 17 must be COCO"):
        open_model(str(few), "cpu", 1, detector=str(one_stage))
    # a graph that is none of the layouts: the one-stage error, plus the SimCC option
    with pytest.raises(ModelError, match=r"neither \[B, 56, N\].*or a top-down SimCC graph"):
        open_model(str(G.yolo_e2e(tmp_path / "odd.onnx", np.zeros((1, 4)), np.ones(1),
                                  np.zeros((1, 17, 3)), slots=3, width=40)), "cpu", 1)


def test_graph_helpers_build_what_they_say(tmp_path):
    path = G.simcc(tmp_path / "s.onnx", input_hw=(64, 48), ratio=2)
    assert Path(path).stat().st_size < 20_000
    x = np.full((1, 17, 96), 0.0)
    assert decode_simcc(x, np.zeros((1, 17, 128)), 2.0).shape == (1, 17, 3)


def test_a_yolo_detection_model_serves_as_detector_only(tmp_path):
    rgb, dots = dots_image()
    boxes = np.array([[200 - 76.8, 100 - 102.4, 200 + 76.8, 100 + 102.4],
                      [450 - 153.6, 300 - 204.8, 450 + 153.6, 300 + 204.8],
                      [300.0, 300.0, 400.0, 400.0]])                  # a car, not a person
    boxes[:, [1, 3]] += PAD_Y
    cxcywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
    scores = np.zeros((3, 80))
    scores[0, 0], scores[1, 0] = 0.9, 0.7
    scores[2, 0], scores[2, 2] = 0.3, 0.95
    det = G.yolo_det(tmp_path / "yolo11n.onnx", cxcywh, scores)
    with pytest.raises(ModelError, match="use it as --detector"):
        open_model(str(det), "cpu", 1)
    model = open_model(str(G.simcc(tmp_path / "p.onnx")), "cpu", 1, detector=str(det))
    result = run_engine(model, {"img": png(rgb)})["img"]
    assert result["person_num"] == 2
    for person, dot in enumerate(dots):
        np.testing.assert_allclose(coco_points(result, person)[:, :2], np.tile(dot, (17, 1)))
    assert [p["location"]["score"] for p in result["person_info"]] == [0.9, 0.7]
