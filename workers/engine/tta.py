"""The ``best`` quality mode: horizontal-flip test-time augmentation and a second, larger scale.

Why these two and how they are merged (measured on the dev set; README "Quality"):

- **Flip**: the model runs on the mirrored input too; its persons are mirrored back with left
  and right swapped, matched to the plain pass's persons by OKS, and their coordinates averaged
  weighted by keypoint score. A person of the plain pass is never dropped (unmatched ones stay
  as they are, unmatched flipped ones are not added), and a fused person keeps the higher of the
  two person scores: averaging scores instead pushes people under the threshold.
- **Second scale**: small people are missed at 640; a pass at ``SECOND_SCALE`` times the input
  side finds them. Its persons are mapped into the plain pass's model pixels and the union is
  de-duplicated by OKS-NMS, the same person found at both scales kept once, at its higher score.

Everything here is numpy on :class:`Detections`; the model calls stay batched (``infer`` gets
the mirrored images of a whole batch at once, and the second scale's images of a whole batch).

``JobSettings.quality`` picks the passes: ``fast`` (none), ``flip``, ``scale``, ``best`` (both);
the two single ones exist so each component can be measured on its own (README "Quality").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from workers.engine.layouts import Detections
from workers.engine.letterbox import (
    Letterbox,
    input_shape_for,
    letterbox,
    to_input_tensor,
    to_source_xy,
)

# COCO-17 order with left and right exchanged (nose stays).
FLIP_INDEX = np.array([0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15])
# COCO's per-keypoint OKS sigmas.
COCO_SIGMAS = np.array([0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062,
                        0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089])
FLIP_MATCH_OKS = 0.5   # a flipped person is the same person at this OKS (COCO's loosest AP level)
SCALE_NMS_OKS = 0.5    # across scales, persons this similar are one person
SECOND_SCALE = 1.5     # second pass at 1.5 x imgsz (960 for 640), rounded to the stride
# ... and only when their boxes overlap this much: keypoints alone can make two people look
# alike (all unseen points piled up in one place, or a detector that gives no keypoints).
MIN_BOX_IOU = 0.3

Infer = Callable[[np.ndarray], list[Detections]]
"""Runs a batch (B, 3, H, W) float32 in [0, 1] and decodes one Detections per image."""


def second_side(imgsz: int, stride: int = 32) -> int:
    return int(round(imgsz * SECOND_SCALE / stride) * stride)


def passes(quality: str) -> tuple[bool, bool]:
    """(flip, second scale) for a ``JobSettings.quality``."""
    return quality in ("flip", "best"), quality in ("scale", "best")


def decode_side(quality: str, imgsz: int) -> int:
    """The long side images must keep when decoded (JPEG draft mode may shrink them to it)."""
    return second_side(imgsz) if passes(quality)[1] else imgsz


def flip_back(det: Detections, width: float) -> Detections:
    """Persons found on a horizontally mirrored input of ``width`` model pixels -> the input's
    own frame: x -> width - x (continuous pixel coordinates), left and right keypoints swapped."""
    k = det.kpts[:, FLIP_INDEX].copy()
    k[..., 0] = width - k[..., 0]
    b = det.boxes_xyxy
    boxes = np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1)
    return Detections(boxes.astype(np.float32), det.scores.copy(), k.astype(np.float32))


def oks_matrix(kpa: np.ndarray, kpb: np.ndarray, boxes_a: np.ndarray) -> np.ndarray:
    """OKS (COCO sigmas, all 17 points) between persons ``kpa (n, 17, 3)`` and ``kpb (m, 17, 3)``,
    with the object scale taken from a's boxes ``(n, 4)`` xyxy: ``(n, m)``."""
    if len(kpa) == 0 or len(kpb) == 0:
        return np.zeros((len(kpa), len(kpb)))
    wh = np.clip(boxes_a[:, 2:] - boxes_a[:, :2], 1.0, None)
    area = wh[:, 0] * wh[:, 1]
    d2 = ((kpa[:, None, :, :2] - kpb[None, :, :, :2]) ** 2).sum(-1)
    e = d2 / (2 * COCO_SIGMAS) ** 2 / area[:, None, None] / 2
    return np.exp(-e).mean(-1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``a (n, 4)`` and ``b (m, 4)`` (xyxy): ``(n, m)``."""
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area = lambda z: np.clip(z[:, 2:] - z[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def similarity(a: Detections, b: Detections) -> np.ndarray:
    """OKS between the persons of ``a`` and ``b``, zero where their boxes barely overlap."""
    oks = oks_matrix(a.kpts, b.kpts, a.boxes_xyxy)
    return np.where(box_iou(a.boxes_xyxy, b.boxes_xyxy) >= MIN_BOX_IOU, oks, 0.0)


def greedy_match(sim: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Pairs (i, j) taken in order of decreasing similarity, each index at most once."""
    ii, jj = np.nonzero(sim >= threshold)
    order = np.argsort(-sim[ii, jj], kind="stable")
    used_i: set[int] = set()
    used_j: set[int] = set()
    pairs = []
    for i, j in zip(ii[order].tolist(), jj[order].tolist(), strict=True):
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            pairs.append((i, j))
    return pairs


def fuse_flip(plain: Detections, flipped: Detections, threshold: float = FLIP_MATCH_OKS
              ) -> Detections:
    """The plain pass's persons, each refined by its flipped twin when there is one (module
    docstring). ``flipped`` must already be in the plain pass's frame (:func:`flip_back`)."""
    boxes, scores, kpts = plain.boxes_xyxy.copy(), plain.scores.copy(), plain.kpts.copy()
    sim = similarity(plain, flipped)
    for i, j in greedy_match(sim, threshold):
        wa, wb = plain.kpts[i, :, 2:3], flipped.kpts[j, :, 2:3]
        w = np.clip(wa + wb, 1e-6, None)
        kpts[i, :, :2] = (plain.kpts[i, :, :2] * wa + flipped.kpts[j, :, :2] * wb) / w
        kpts[i, :, 2] = 0.5 * (plain.kpts[i, :, 2] + flipped.kpts[j, :, 2])
        sa, sb = float(plain.scores[i]), float(flipped.scores[j])
        boxes[i] = (plain.boxes_xyxy[i] * sa + flipped.boxes_xyxy[j] * sb) / max(sa + sb, 1e-6)
        scores[i] = max(sa, sb)
    return Detections(boxes, scores, kpts)


def oks_nms(det: Detections, threshold: float = SCALE_NMS_OKS, max_det: int = 100
            ) -> Detections:
    """Keep persons by decreasing score; drop one whose OKS with a kept person >= threshold."""
    order = np.argsort(-det.scores, kind="stable")
    keep: list[int] = []
    for i in order.tolist():
        if keep and similarity(_take(det, [i]), _take(det, keep)).max() >= threshold:
            continue
        keep.append(i)
        if len(keep) >= max_det:
            break
    idx = np.asarray(keep, dtype=np.int64)
    return Detections(det.boxes_xyxy[idx], det.scores[idx], det.kpts[idx])


def _take(det: Detections, idx: list[int]) -> Detections:
    return Detections(det.boxes_xyxy[idx], det.scores[idx], det.kpts[idx])


def concat(a: Detections, b: Detections) -> Detections:
    return Detections(np.concatenate([a.boxes_xyxy, b.boxes_xyxy]),
                      np.concatenate([a.scores, b.scores]), np.concatenate([a.kpts, b.kpts]))


def _to_model_xy(xy: np.ndarray, lb: Letterbox) -> np.ndarray:
    """The letterbox's forward map: source-array pixels -> its model pixels."""
    return xy * lb.scale + np.array([lb.pad_x, lb.pad_y], dtype=np.float32)


def reframe(det: Detections, src: Letterbox, dst: Letterbox) -> Detections:
    """Model pixels of letterbox ``src`` -> model pixels of letterbox ``dst`` (same image)."""
    k = det.kpts.copy()
    k[..., :2] = _to_model_xy(to_source_xy(det.kpts[..., :2], src), dst)
    corners = _to_model_xy(to_source_xy(det.boxes_xyxy.reshape(-1, 2, 2), src), dst)
    return Detections(corners.reshape(-1, 4).astype(np.float32), det.scores.copy(),
                      k.astype(np.float32))


def with_flip(infer: Infer, batch: np.ndarray) -> list[Detections]:
    """Plain pass and mirrored pass, fused per image."""
    plain = infer(batch)
    mirrored = infer(np.ascontiguousarray(batch[..., ::-1]))
    width = batch.shape[3]
    return [fuse_flip(p, flip_back(m, width)) for p, m in zip(plain, mirrored, strict=True)]


def second_scale_inputs(images: Sequence[np.ndarray], side: int, rect: bool
                        ) -> tuple[list[np.ndarray], list[Letterbox]]:
    """Letterbox each ``rgb (h, w, 3) uint8`` to the second scale: (3, H, W) float32 tensors."""
    tensors, boxes = [], []
    for rgb in images:
        out_hw = input_shape_for(rgb.shape[:2], side) if rect else (side, side)
        canvas, lb = letterbox(rgb, out_hw)
        tensors.append(to_input_tensor(canvas))
        boxes.append(lb)
    return tensors, boxes


def infer_best(infer: Infer, batch: np.ndarray, images: Sequence[np.ndarray],
               boxes: Sequence[Letterbox], imgsz: int, rect: bool, max_det: int,
               flip: bool = True, scale: bool = True) -> list[Detections]:
    """Persons of each image of ``batch`` in its model pixels, with the ``best`` passes.

    ``images`` are the decoded ``rgb`` arrays the batch was letterboxed from (by ``boxes``); the
    second scale letterboxes them again at :func:`second_side` (``imgsz``).
    """
    dets = with_flip(infer, batch) if flip else infer(batch)
    if not scale:
        return dets
    tensors, lbs = second_scale_inputs(images, second_side(imgsz), rect)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.shape, []).append(i)
    out = list(dets)
    for idx in groups.values():
        found = infer(np.stack([tensors[i] for i in idx]))
        for i, d in zip(idx, found, strict=False):
            out[i] = oks_nms(concat(dets[i], reframe(d, lbs[i], boxes[i])), max_det=max_det)
    return out
