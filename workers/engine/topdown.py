"""Top-down pose: person boxes from a detector, then a SimCC model on a crop of each person.

Why crops from the decoded image and not from the detector's letterboxed input: a small person
in a large photo keeps its detail (the crop is cut at the image's own resolution and scaled once
to the model's input), which is where a top-down model beats a one-stage one.

Crop geometry is MMPose's: the box, enlarged by ``PADDING``, widened or heightened to the model's
aspect ratio, mapped onto the input so that its centre lands on (W/2, H/2) in pixel-index
coordinates; outside the image is black (0), as MMPose pads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from posebatch.errors import ModelError
from workers.engine.layouts import Detections
from workers.engine.letterbox import Letterbox, to_source_xy
from workers.engine.runner import LAYOUT_YOLO_DET, PoseModel, choose_providers
from workers.engine.simcc import NotSimcc, SimccModel, normalise
from workers.engine.tta import FLIP_INDEX

PADDING = 1.25          # MMPose's top-down bbox padding for RTMPose
MAX_CROPS_PER_CALL = 64  # crops per model call; all crops of a batch go in ceil(n / 64) calls

SimccRun = Callable[[np.ndarray], np.ndarray]
"""``(B, 3, H, W) float32`` normalised crops -> ``(B, 17, 3)`` keypoints in crop pixels."""


def crop_regions(boxes_xyxy: np.ndarray, input_hw: tuple[int, int], padding: float = PADDING
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(n, 2)`` and sizes ``(n, 2)`` (width, height, image pixels) of the crops."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    centres = 0.5 * (b[:, :2] + b[:, 2:])
    wh = np.clip(b[:, 2:] - b[:, :2], 1.0, None) * padding
    aspect = input_hw[1] / input_hw[0]
    wide = wh[:, 0] > wh[:, 1] * aspect
    sizes = np.where(wide[:, None], np.stack([wh[:, 0], wh[:, 0] / aspect], 1),
                     np.stack([wh[:, 1] * aspect, wh[:, 1]], 1))
    return centres, sizes


def warp(rgb: np.ndarray, centre: np.ndarray, size: np.ndarray, input_hw: tuple[int, int]
         ) -> np.ndarray:
    """Cut one crop: ``rgb (h, w, 3) uint8`` -> ``(H, W, 3) uint8``.

    Crop pixel (u, v) (pixel-index coordinates) shows image point
    ``centre + ((u, v) - (W/2, H/2)) * size / (W, H)``; Pillow's affine map works on continuous
    coordinates (pixel centres at +0.5), hence the half-pixel terms."""
    h_in, w_in = input_hw
    ax, ay = size[0] / w_in, size[1] / h_in
    cx = centre[0] + 0.5 - (w_in / 2 + 0.5) * ax
    cy = centre[1] + 0.5 - (h_in / 2 + 0.5) * ay
    im = Image.fromarray(rgb).transform((w_in, h_in), Image.Transform.AFFINE,
                                        (ax, 0.0, cx, 0.0, ay, cy),
                                        resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return np.asarray(im)


def back_project(kp_crop: np.ndarray, centres: np.ndarray, sizes: np.ndarray,
                 input_hw: tuple[int, int]) -> np.ndarray:
    """``(n, K, 3)`` keypoints in crop pixels -> image pixels (the inverse of :func:`warp`)."""
    out = kp_crop.astype(np.float32).copy()
    h_in, w_in = input_hw
    out[..., 0] = centres[:, None, 0] + (kp_crop[..., 0] - w_in / 2) * (sizes[:, None, 0] / w_in)
    out[..., 1] = centres[:, None, 1] + (kp_crop[..., 1] - h_in / 2) * (sizes[:, None, 1] / h_in)
    return out


def estimate(run: SimccRun, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
             input_hw: tuple[int, int], max_per_call: int = MAX_CROPS_PER_CALL,
             flip: bool = False) -> list[np.ndarray]:
    """Keypoints ``(n_i, 17, 3)`` in image pixels for the ``n_i`` boxes ``(n_i, 4)`` (image
    pixels) of each image.

    The crops of all images are stacked and sent in calls of at most ``max_per_call``: never
    one call per box. With ``flip`` each crop's mirror image goes along too; its keypoints are
    mirrored back (``u -> W - 1 - u`` in pixel-index coordinates), left and right swapped, and
    averaged with the crop's own, weighted by score (score: the mean of the two)."""
    regions = [crop_regions(b, input_hw) for b in boxes]
    crops = [warp(rgb, c, s, input_hw) for rgb, (cs, ss) in zip(images, regions, strict=True)
             for c, s in zip(cs, ss, strict=True)]
    if not crops:
        return [np.zeros((0, 17, 3), np.float32) for _ in boxes]
    stack = np.stack(crops)
    if flip:
        stack = np.concatenate([stack, stack[:, :, ::-1]])
    kp = np.concatenate([run(normalise(stack[i:i + max_per_call]))
                         for i in range(0, len(stack), max_per_call)])
    if flip:
        n = len(crops)
        mirrored = kp[n:, FLIP_INDEX].copy()
        mirrored[..., 0] = input_hw[1] - 1 - mirrored[..., 0]
        kp = _average(kp[:n], mirrored)
    out, start = [], 0
    for cs, ss in regions:
        n = len(cs)
        out.append(back_project(kp[start:start + n], cs, ss, input_hw))
        start += n
    return out


def _average(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two estimates ``(n, 17, 3)`` of the same points: score-weighted mean position."""
    wa, wb = a[..., 2:3], b[..., 2:3]
    out = a.copy()
    out[..., :2] = (a[..., :2] * wa + b[..., :2] * wb) / np.clip(wa + wb, 1e-6, None)
    out[..., 2] = 0.5 * (a[..., 2] + b[..., 2])
    return out


class TopDownModel:
    """A detector (any one-stage layout; its keypoints are dropped) plus a SimCC model.

    Quacks like :class:`PoseModel` for the engine (``info``, ``on_cuda``, ``infer`` run the
    detector), and ``refine`` replaces each person's keypoints with the SimCC model's."""

    def __init__(self, detector: PoseModel, simcc: SimccModel) -> None:
        self.detector = detector
        self.simcc = simcc
        self.info = detector.info
        self.on_cuda = detector.on_cuda

    @property
    def wants_fixed_batches(self) -> bool:
        return self.detector.wants_fixed_batches

    def infer(self, batch: np.ndarray, conf: float, iou: float, max_det: int
              ) -> list[Detections]:
        return self.detector.infer(batch, conf, iou, max_det)

    def refine(self, dets: Sequence[Detections], images: Sequence[np.ndarray],
               boxes: Sequence[Letterbox], flip: bool = False) -> list[Detections]:
        """Persons in the detector's model pixels (letterbox ``boxes`` of ``images``) -> the same
        persons with SimCC keypoints (flip-averaged with ``flip``), still in model pixels."""
        src_boxes = [to_source_xy(d.boxes_xyxy.reshape(-1, 2, 2), lb).reshape(-1, 4)
                     for d, lb in zip(dets, boxes, strict=True)]
        kps = estimate(self.simcc.run, images, src_boxes, self.simcc.layout.input_hw, flip=flip)
        out = []
        for d, k, lb in zip(dets, kps, boxes, strict=True):
            k = k.copy()
            k[..., :2] = k[..., :2] * lb.scale + np.array([lb.pad_x, lb.pad_y], np.float32)
            out.append(Detections(d.boxes_xyxy, d.scores, k.astype(np.float32)))
        return out


def open_model(path: str, make_pose: Callable[[str], PoseModel], providers: str = "auto",
               intra_threads: int = 0, detector: str | None = None,
               default_detector: Callable[[], str] | None = None) -> PoseModel | TopDownModel:
    """The engine's model for ``path``: ``make_pose(path)`` for a one-stage pose model, or for a
    SimCC graph a :class:`TopDownModel` whose boxes come from ``make_pose(detector)`` (else
    from ``make_pose(default_detector())``). The SimCC session runs on CUDA when ``providers``
    allows a GPU and this onnxruntime has CUDA, else on the CPU."""
    try:
        model = make_pose(path)
    except ModelError as err:
        import onnxruntime as ort

        wanted = "cuda" if providers == "tensorrt" else providers
        try:
            simcc = SimccModel(path, choose_providers(wanted, ort.get_available_providers()),
                               intra_threads)
        except NotSimcc:
            raise ModelError(f"{err}; or a top-down SimCC graph (outputs simcc_x, simcc_y; "
                             "docs/models.md)") from None
        if detector is None and default_detector is None:
            raise ModelError(f"{path} is a top-down (SimCC) model: it needs person boxes; pass "
                             "--detector DET.onnx") from None
        det_path = detector if detector is not None else default_detector()  # type: ignore[misc]
        return TopDownModel(make_pose(det_path), simcc)
    if model.info.layout == LAYOUT_YOLO_DET:
        raise ModelError(f"{path} is a person detector without keypoints: use it as --detector "
                         "with a top-down (SimCC) --model")
    if detector is not None:
        raise ModelError(f"--detector is for top-down (SimCC) models; {path} is a one-stage "
                         f"{model.info.layout} model that finds people itself")
    return model
