"""Turn raw model outputs into persons: decode each supported layout, then NMS.

Every function takes and returns plain arrays whose shapes are in the docstrings; coordinates stay
in model-input pixels here (the letterbox inverse is applied by the caller).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

MAX_CANDIDATES = 3000  # cap before NMS; a 640x640 YOLO grid has 8400 anchors
BATCH_NMS_CELLS = 4_000_000
"""Largest images x candidates^2 suppressed as one padded block (``nms_batch``); beyond it each
image runs ``nms`` on its own (the same answer, less memory)."""


@dataclass(frozen=True)
class Detections:
    """Persons of one image in model-input pixels.

    boxes_xyxy (n, 4), scores (n,), kpts (n, 17, 3) with x, y, score per keypoint.
    """

    boxes_xyxy: np.ndarray
    scores: np.ndarray
    kpts: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True)
class PersonBatch:
    """The persons of a batch of images, in one set of arrays: persons of image 0 first, each
    image's by descending score. ``image (m,)`` index per person, ``counts (B,)`` per image;
    boxes_xyxy (m, 4), scores (m,), kpts (m, 17, 3) as in Detections.

    Why: per-image arrays made the model's thread loop over images and persons in Python; this
    lets decoding, back-projection and the 21 keypoints run once per batch.
    """

    image: np.ndarray
    counts: np.ndarray
    boxes_xyxy: np.ndarray
    scores: np.ndarray
    kpts: np.ndarray

    @classmethod
    def from_list(cls, dets: list[Detections]) -> PersonBatch:
        counts = np.array([len(d) for d in dets], np.int64)
        if not len(dets):
            return cls(np.zeros(0, np.int64), counts, np.zeros((0, 4), np.float32),
                       np.zeros(0, np.float32), np.zeros((0, 17, 3), np.float32))
        return cls(np.repeat(np.arange(len(dets)), counts), counts,
                   np.concatenate([d.boxes_xyxy.reshape(-1, 4) for d in dets]),
                   np.concatenate([d.scores.reshape(-1) for d in dets]),
                   np.concatenate([d.kpts.reshape(-1, 17, 3) for d in dets]))

    @classmethod
    def concat(cls, parts: list[PersonBatch]) -> PersonBatch:
        """The persons of consecutive batches as one (image indices follow on)."""
        offsets = np.cumsum([0] + [len(p.counts) for p in parts[:-1]])
        return cls(np.concatenate([p.image + o for p, o in zip(parts, offsets, strict=True)]),
                   np.concatenate([p.counts for p in parts]),
                   np.concatenate([p.boxes_xyxy for p in parts]),
                   np.concatenate([p.scores for p in parts]),
                   np.concatenate([p.kpts for p in parts]))

    def split(self) -> list[Detections]:
        """One Detections per image (views)."""
        cuts = np.cumsum(self.counts)[:-1]
        return [Detections(b, s, k) for b, s, k in zip(
            np.split(self.boxes_xyxy, cuts), np.split(self.scores, cuts),
            np.split(self.kpts, cuts), strict=True)]


@dataclass
class Head:
    """One model call's raw YOLO-pose head, as little of it on the host as decoding needs.

    Either ``raw (B, 56, N)``, or the best columns ``top``/``index`` (``output_tail``) with
    ``full()`` to fetch the whole head when they do not suffice (valid until the model's next
    call: decode before running the next batch).
    """

    raw: np.ndarray | None = None
    top: np.ndarray | None = None
    index: np.ndarray | None = None
    full: Callable[[], np.ndarray] | None = None

    def persons(self, real: int, conf: float, iou: float, max_det: int) -> PersonBatch:
        """The persons of the first ``real`` images (the rest pad a fixed-size batch)."""
        if self.top is not None and self.index is not None:
            persons = decode_yolo_top_batch(self.top[:real], self.index[:real], conf, iou,
                                            max_det)
            if persons is not None:
                return persons
        raw = self.raw if self.raw is not None else self.full() if self.full else None
        if raw is None:
            raise ValueError("a Head needs its raw output or a way to fetch it")
        return decode_yolo_raw_batch(raw[:real], conf, iou, max_det)


def nms(boxes_xyxy: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices ``(k,)`` by descending score."""
    if len(scores) == 0:
        return np.zeros((0,), dtype=np.int64)
    x1, y1, x2, y2 = boxes_xyxy.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def nms_batch(boxes_xyxy: np.ndarray, scores: np.ndarray, image: np.ndarray, images: int,
              iou_threshold: float) -> np.ndarray:
    """``nms`` for every image at once: candidates ``(m, ...)`` of image ``image (m,)`` (sorted
    by image); returns the kept indices, image by image, each image's by descending score,
    exactly as ``nms`` per image would (same float32 arithmetic, same tie order).

    Greedy NMS keeps candidate j (in score order) when no kept candidate before it overlaps it
    by more than the threshold. Iterating ``keep = no kept earlier one suppresses me`` from "all
    kept" fixes one more candidate per round and stops at the only solution of that rule, in a
    few rounds for real detections; each round is one array operation over all images.
    """
    m = len(scores)
    if m == 0:
        return np.zeros((0,), np.int64)
    order = np.lexsort((-scores, image))  # stable: ties keep anchor order, as in ``nms``
    counts = np.bincount(image, minlength=images)
    g = int(counts.max())
    if images * g * g > BATCH_NMS_CELLS:
        starts = np.concatenate([[0], np.cumsum(counts)])
        return np.concatenate([
            starts[b] + nms(boxes_xyxy[starts[b]:starts[b + 1]], scores[starts[b]:starts[b + 1]],
                            iou_threshold)
            for b in range(images) if counts[b]])
    sorted_image = image[order]
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(m) - first[sorted_image]  # rank within its image
    slots = np.full((images, g), -1, np.int64)
    slots[sorted_image, pos] = order
    valid = slots >= 0
    b = boxes_xyxy[np.where(valid, slots, 0)]  # (images, g, 4)
    x1, y1, x2, y2 = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    w = np.clip(np.minimum(x2[:, :, None], x2[:, None, :])
                - np.maximum(x1[:, :, None], x1[:, None, :]), 0, None)
    h = np.clip(np.minimum(y2[:, :, None], y2[:, None, :])
                - np.maximum(y1[:, :, None], y1[:, None, :]), 0, None)
    inter = w * h
    iou = inter / np.maximum(areas[:, :, None] + areas[:, None, :] - inter, 1e-9)
    # suppress[b, i, j]: i (earlier) would remove j; NaN removes, as ``iou <= t`` is False.
    earlier = np.triu(np.ones((g, g), bool), 1)
    suppress = ~(iou <= iou_threshold) & earlier & valid[:, :, None] & valid[:, None, :]
    by = suppress.astype(np.float32)
    keep = valid.copy()
    while True:  # counts of kept suppressors: exact in float32 (g <= MAX_CANDIDATES)
        nxt = valid & (np.matmul(keep[:, None, :].astype(np.float32), by)[:, 0] == 0)
        if np.array_equal(nxt, keep):
            break
        keep = nxt
    return slots[keep]


def decode_yolo_raw_batch(out: np.ndarray, conf: float, iou: float, max_det: int,
                          nk: int = 17) -> PersonBatch:
    """``decode_yolo_raw`` for a whole batch ``out (B, 4+1+nk*3, N)`` in array operations: the
    same persons in the same order (the tests compare them), without a loop over images."""
    expected_rows = 5 + nk * 3
    if out.ndim != 3 or out.shape[1] != expected_rows:
        raise ValueError(f"expected raw YOLO-pose output (B, {expected_rows}, N), got "
                         f"{out.shape}")
    images, anchors = out.shape[0], out.shape[2]
    flat = np.flatnonzero(out[:, 4, :] >= conf)
    b_idx, a_idx = np.divmod(flat, anchors)
    if len(flat) > MAX_CANDIDATES and np.bincount(b_idx).max() > MAX_CANDIDATES:
        # rare: the per-image cap keeps each image's top candidates, as decode_yolo_raw does
        return PersonBatch.from_list([decode_yolo_raw(o, conf, iou, max_det, nk) for o in out])
    sel = out[b_idx, :, a_idx]  # (m, rows), image by image, anchors ascending
    return _persons(sel, b_idx, images, iou, max_det, nk)


def decode_yolo_top_batch(top: np.ndarray, index: np.ndarray, conf: float, iou: float,
                          max_det: int, nk: int = 17) -> PersonBatch | None:
    """``decode_yolo_raw_batch`` from the head's best K columns per image (``output_tail``):
    ``top (B, 4+1+nk*3, K)`` by descending score, ``index (B, K)`` their anchors. None when an
    image's K-th score passes ``conf`` (or is NaN): more anchors may pass than were kept, and
    the caller decodes the full head. Otherwise the same persons in the same order."""
    expected_rows = 5 + nk * 3
    if top.ndim != 3 or top.shape[1] != expected_rows or index.shape != (top.shape[0],
                                                                        top.shape[2]):
        raise ValueError(f"expected top candidates (B, {expected_rows}, K) and (B, K), got "
                         f"{top.shape}, {index.shape}")
    images = top.shape[0]
    if top.shape[2] and not (top[:, 4, -1] < conf).all():
        return None
    b_idx, col = np.nonzero(top[:, 4, :] >= conf)
    a_idx = index[b_idx, col]
    order = np.lexsort((a_idx, b_idx))  # the full head's order: image by image, by anchor
    b_idx, col = b_idx[order], col[order]
    return _persons(top[b_idx, :, col], b_idx, images, iou, max_det, nk)


def _persons(sel: np.ndarray, b_idx: np.ndarray, images: int, iou: float, max_det: int,
             nk: int) -> PersonBatch:
    """NMS and ``max_det`` over candidate rows ``sel (m, rows)`` of images ``b_idx (m,)``
    (image by image, anchors ascending)."""
    cx, cy, w, h = sel[:, 0], sel[:, 1], sel[:, 2], sel[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keep = nms_batch(boxes, sel[:, 4], b_idx, images, iou)
    kept_image = b_idx[keep]
    if max_det < len(keep):
        starts = np.searchsorted(kept_image, kept_image, side="left")
        top = np.arange(len(keep)) - starts < max_det
        keep, kept_image = keep[top], kept_image[top]
    return PersonBatch(
        kept_image, np.bincount(kept_image, minlength=images).astype(np.int64),
        boxes[keep].astype(np.float32), sel[keep, 4].astype(np.float32),
        sel[keep, 5:].reshape(-1, nk, 3).astype(np.float32))


def decode_yolo_raw(
    out: np.ndarray, conf: float, iou: float, max_det: int, nk: int = 17
) -> Detections:
    """Ultralytics YOLOv8/11-pose export, one image: ``out (4+1+nk*3, N)``, no NMS in graph.

    Rows: centre-x, centre-y, w, h (model pixels), person score, then x, y, score per keypoint.
    """
    expected_rows = 5 + nk * 3
    if out.ndim != 2 or out.shape[0] != expected_rows:
        raise ValueError(f"expected raw YOLO-pose output ({expected_rows}, N), got {out.shape}")
    scores = out[4]
    idx = np.nonzero(scores >= conf)[0]
    if idx.size > MAX_CANDIDATES:
        idx = idx[np.argsort(-scores[idx])[:MAX_CANDIDATES]]
    sel = out[:, idx].T  # (m, rows)
    cx, cy, w, h = sel[:, 0], sel[:, 1], sel[:, 2], sel[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keep = nms(boxes, sel[:, 4], iou)[:max_det]
    kpts = sel[keep, 5:].reshape(-1, nk, 3)
    return Detections(boxes[keep].astype(np.float32), sel[keep, 4].astype(np.float32),
                      kpts.astype(np.float32))


def decode_yolo_e2e(out: np.ndarray, conf: float, max_det: int, nk: int = 17) -> Detections:
    """End-to-end YOLO26-style head, one image: ``out (K, 6 + nk*3)`` = x1, y1, x2, y2, score,
    class, keypoints. Already de-duplicated by the model, so no NMS."""
    if out.ndim != 2 or out.shape[1] != 6 + nk * 3:
        raise ValueError(f"expected end-to-end output (K, {6 + nk * 3}), got {out.shape}")
    sel = out[out[:, 4] >= conf]
    sel = sel[np.argsort(-sel[:, 4], kind="stable")][:max_det]
    return Detections(sel[:, :4].astype(np.float32), sel[:, 4].astype(np.float32),
                      sel[:, 6:].reshape(-1, nk, 3).astype(np.float32))


def decode_rtmo(dets: np.ndarray, kpts: np.ndarray, conf: float, max_det: int) -> Detections:
    """RTMO end-to-end export, one image: ``dets (N, 5)`` x1, y1, x2, y2, score and
    ``kpts (N, 17, 3)``; NMS is inside the graph."""
    if dets.ndim != 2 or dets.shape[1] != 5 or kpts.shape[:1] != dets.shape[:1]:
        raise ValueError(f"expected dets (N, 5) and keypoints (N, 17, 3), got {dets.shape}, "
                         f"{kpts.shape}")
    mask = dets[:, 4] >= conf
    order = np.argsort(-dets[mask, 4], kind="stable")[:max_det]
    d, k = dets[mask][order], kpts[mask][order].astype(np.float32)
    k[..., 2] = np.clip(k[..., 2], 0.0, 1.0)
    return Detections(d[:, :4].astype(np.float32), d[:, 4].astype(np.float32), k)


def decode_yolo_det(out: np.ndarray, conf: float, iou: float, max_det: int) -> Detections:
    """Ultralytics YOLO *detection* export, one image: ``out (4 + classes, N)``: cx, cy, w, h,
    then one score per class; class 0 is the person (COCO). No keypoints (all 0, score 0): only
    a top-down model's detector may be such a model."""
    if out.ndim != 2 or out.shape[0] < 5:
        raise ValueError(f"expected raw YOLO detection output (4 + classes, N), got {out.shape}")
    person = out[4]
    best_other = out[5:].max(axis=0) if out.shape[0] > 5 else np.zeros_like(person)
    idx = np.nonzero((person >= conf) & (person >= best_other))[0]
    if idx.size > MAX_CANDIDATES:
        idx = idx[np.argsort(-person[idx])[:MAX_CANDIDATES]]
    cx, cy, w, h = out[0, idx], out[1, idx], out[2, idx], out[3, idx]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    keep = nms(boxes, person[idx], iou)[:max_det]
    return Detections(boxes[keep].astype(np.float32), person[idx][keep].astype(np.float32),
                      np.zeros((len(keep), 17, 3), np.float32))
