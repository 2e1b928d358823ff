"""Turn raw model outputs into persons: decode each supported layout, then NMS.

Every function takes and returns plain arrays whose shapes are in the docstrings; coordinates stay
in model-input pixels here (the letterbox inverse is applied by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_CANDIDATES = 3000  # cap before NMS; a 640x640 YOLO grid has 8400 anchors


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
