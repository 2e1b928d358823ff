"""``posebatch eval``: accuracy of a run's per-image JSON against COCO keypoints ground truth.

Why these measures: OKS AP (pycocotools) is the number the field compares models by, on the 17
COCO points (``AP17``, comparable with published figures) and on all 21 (``AP``); recall says how
many annotated people were found at all; the per-keypoint share within 5% / 10% of the box size
(PCK) and the per-keypoint AP say which of the 21 points (the four derived ones above all) can be
trusted, which the overall AP averages away.

Matching for recall and PCK: each annotated person gets at most one detection, pairs taken in
order of decreasing OKS over the 17 COCO points (so a derived point cannot change who matches
whom, and a person in front of the list cannot take another's better match). A person is
*recalled* when its match has OKS >= 0.5 (COCO's loosest AP level); PCK counts unmatched people
as misses.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from posebatch.errors import ConfigError
from posebatch.keys import result_key
from posebatch.schema import API21_NAMES, Failure, read_result

# Per-keypoint OKS sigmas. The 17 COCO points use COCO's published values; the others are ours:
# top_head and neck as loose as a shoulder (0.079, as MPII-style head-top/neck evaluations use),
# mouth corners as tight as the eyes (0.025), since they are facial points of the same scale.
SIGMAS = {
    "top_head": 0.079, "left_ear": 0.035, "right_ear": 0.035, "left_eye": 0.025,
    "right_eye": 0.025, "nose": 0.026, "left_mouth_corner": 0.025, "right_mouth_corner": 0.025,
    "neck": 0.079, "left_shoulder": 0.079, "right_shoulder": 0.079, "left_elbow": 0.072,
    "right_elbow": 0.072, "left_wrist": 0.062, "right_wrist": 0.062, "left_hip": 0.107,
    "right_hip": 0.107, "left_knee": 0.087, "right_knee": 0.087, "left_ankle": 0.089,
    "right_ankle": 0.089,
}
COCO17 = [i for i, n in enumerate(API21_NAMES)
          if n not in ("top_head", "neck", "left_mouth_corner", "right_mouth_corner")]
THRESHOLDS = (0.05, 0.10)
RECALL_OKS = 0.5
COCO_MAX_DETS = 20


def load_predictions(gt: dict[str, Any], pred_dir: Path) -> list[dict[str, Any]]:
    """COCO-format detections from ``pred_dir/<file_name>.json`` (or its sharded place,
    ``pred_dir/<shard>/<file_name>.json``); a missing file is an error."""
    dets = []
    for img in gt["images"]:
        path = pred_dir / result_key(img["file_name"])
        if not path.is_file() and (pred_dir / result_key(img["file_name"], "sharded")).is_file():
            path = pred_dir / result_key(img["file_name"], "sharded")
        if not path.is_file():
            raise ConfigError(f"no prediction for {img['file_name']}: expected {path}")
        typed = read_result(json.loads(path.read_text()))
        if isinstance(typed, Failure):
            continue  # an image that failed has no persons
        for kpts, (x1, y1, x2, y2), score in zip(typed.kpts.tolist(),
                                                 typed.boxes_xyxy.tolist(),
                                                 typed.box_scores.tolist(), strict=True):
            dets.append({"image_id": img["id"], "category_id": 1,
                         "keypoints": [v for point in kpts for v in point], "score": score,
                         "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return dets


def coco_ap(gt: dict[str, Any], dets: list[dict[str, Any]], points: list[int],
            max_dets: int = COCO_MAX_DETS) -> list[float]:
    """pycocotools' keypoint [AP, AP50, AP75, AR] on the keypoints ``points`` (API21 indices)
    only; people with none of them annotated are ignored, as COCOeval does. ``max_dets``:
    detections per image that count (see :func:`evaluate`)."""
    if not dets:
        return [0.0, 0.0, 0.0, 0.0]
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    sub = {**gt, "annotations": [], "categories": [
        {**gt["categories"][0], "keypoints": [API21_NAMES[i] for i in points], "skeleton": []}]}
    for a in gt["annotations"]:
        k = np.asarray(a["keypoints"], dtype=np.float64).reshape(21, 3)[points]
        sub["annotations"].append({**a, "keypoints": k.ravel().tolist(),
                                   "num_keypoints": int((k[:, 2] > 0).sum())})
    sub_dets = [{**d, "keypoints": np.asarray(d["keypoints"]).reshape(21, 3)[points].ravel()
                 .tolist()} for d in dets]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = sub
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(sub_dets), "keypoints")
        ev.params.kpt_oks_sigmas = np.array([SIGMAS[API21_NAMES[i]] for i in points])
        if max_dets != COCO_MAX_DETS:
            ev.params.maxDets = [max_dets]
        ev.evaluate()
        ev.accumulate()
        if max_dets == COCO_MAX_DETS:
            ev.summarize()
    if max_dets == COCO_MAX_DETS:
        stats = [float(ev.stats[i]) for i in (0, 1, 2, 5)]
    else:  # summarize() hard-codes 20: the same means, taken from the arrays
        stats = list(_stats(ev).values())
    return [max(v, 0.0) for v in stats]


def _stats(ev: Any) -> dict[str, float]:
    """AP, AP50, AP75 and AR over all areas at the one maxDets setting, as summarize() does."""
    prec = ev.eval["precision"][:, :, :, 0, -1]  # [iou thr, recall, class, area=all, maxDets]
    rec = ev.eval["recall"][:, :, 0, -1]
    thr = ev.params.iouThrs

    def mean(a: np.ndarray) -> float:
        a = a[a > -1]
        return float(a.mean()) if a.size else -1.0

    return {"AP": mean(prec), "AP50": mean(prec[np.isclose(thr, 0.5)]),
            "AP75": mean(prec[np.isclose(thr, 0.75)]), "AR": mean(rec)}


def evaluate(gt_path: str, pred_dir: str, max_dets: int = COCO_MAX_DETS,
             per_keypoint_ap: bool = True) -> dict[str, Any]:
    """``max_dets``: detections per image that count in AP (COCO's keypoint default, 20,
    truncates crowded images; 100, the jobs' ``max_persons``, scores every person a run can
    report). Recall and PCK always use every detection."""
    gt = json.loads(Path(gt_path).read_text())
    names = gt["categories"][0]["keypoints"]
    if list(names) != list(API21_NAMES):
        raise ConfigError(f"{gt_path}: expected the 21 API keypoints in API order, got {names}")
    dets = load_predictions(gt, Path(pred_dir))
    report: dict[str, Any] = {"images": len(gt["images"]),
                              "persons": sum(1 for a in gt["annotations"]
                                             if a.get("num_keypoints", 0) > 0),
                              "detections": len(dets), "sigmas": SIGMAS}
    ap, ap50, ap75, ar = coco_ap(gt, dets, list(range(21)), max_dets)
    report.update(AP=ap, AP50=ap50, AP75=ap75, AR=ar, max_dets=max_dets,
                  AP17=coco_ap(gt, dets, COCO17, max_dets)[0])
    matched = per_keypoint_accuracy(gt, dets)
    report.update(recall=matched["recall"], PCK21_05=matched["pck"][0],
                  PCK21_10=matched["pck"][1])
    report["per_keypoint"] = matched["per_keypoint"]
    for j, name in enumerate(API21_NAMES):
        entry = report["per_keypoint"][name]
        entry["AP"] = (coco_ap(gt, dets, [j], max_dets)[0] if per_keypoint_ap and entry["n"]
                       else None)
    return report


def _oks(gt_kp: np.ndarray, dt_kp: np.ndarray, area: float, sigmas: np.ndarray) -> float:
    vis = gt_kp[:, 2] > 0
    if not vis.any():
        return 0.0
    d2 = ((gt_kp[:, :2] - dt_kp[:, :2]) ** 2).sum(axis=1)
    var = (2 * sigmas) ** 2
    e = d2 / var / (area + np.spacing(1)) / 2
    return float(np.exp(-e[vis]).mean())


def match_people(anns: list[dict[str, Any]], preds: list[np.ndarray]
                 ) -> dict[int, tuple[int, float]]:
    """GT index -> (detection index, OKS over the 17 COCO points); greedy by decreasing OKS."""
    sigmas = np.array([SIGMAS[API21_NAMES[i]] for i in COCO17])
    pairs = []
    for i, a in enumerate(anns):
        g = np.asarray(a["keypoints"], dtype=np.float64).reshape(21, 3)[COCO17]
        for j, p in enumerate(preds):
            o = _oks(g, p[COCO17], a["area"], sigmas)
            if o > 0.0:
                pairs.append((o, i, j))
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    out: dict[int, tuple[int, float]] = {}
    used: set[int] = set()
    for o, i, j in pairs:
        if i not in out and j not in used:
            out[i] = (j, o)
            used.add(j)
    return out


def per_keypoint_accuracy(gt: dict[str, Any], dets: list[dict[str, Any]]) -> dict[str, Any]:
    """Recall, and per keypoint the share of visible GT points within 5% / 10% of max(box width,
    height) of the matched detection's point (module docstring)."""
    by_image: dict[int, list[np.ndarray]] = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(np.array(d["keypoints"]).reshape(21, 3))
    hits = np.zeros((len(THRESHOLDS), 21))
    totals = np.zeros(21)
    people = recalled = 0
    for img in gt["images"]:
        anns = [a for a in gt["annotations"]
                if a["image_id"] == img["id"] and a.get("num_keypoints", 0) > 0]
        preds = by_image.get(img["id"], [])
        matches = match_people(anns, preds)
        for i, a in enumerate(anns):
            g = np.array(a["keypoints"], dtype=np.float64).reshape(21, 3)
            vis = g[:, 2] > 0
            totals += vis
            people += 1
            if i not in matches:
                continue
            j, o = matches[i]
            recalled += o >= RECALL_OKS
            size = max(a["bbox"][2], a["bbox"][3])
            dist = np.hypot(*(g[:, :2] - preds[j][:, :2]).T)
            for t, frac in enumerate(THRESHOLDS):
                hits[t] += vis & (dist <= frac * size)
    per = {}
    for j, name in enumerate(API21_NAMES):
        n = int(totals[j])
        per[name] = {"n": n, **{f"within_{int(f * 100)}pct": (hits[t, j] / n if n else None)
                                for t, f in enumerate(THRESHOLDS)}}
    pck = [float(hits[t].sum() / totals.sum()) if totals.sum() else 0.0
           for t in range(len(THRESHOLDS))]
    return {"per_keypoint": per, "pck": pck, "recall": recalled / people if people else 0.0}


def format_report(r: dict[str, Any]) -> str:
    lines = [f"images {r['images']}, annotated persons {r['persons']}, "
             f"detections {r['detections']}",
             f"recall {r['recall']:.3f}  AP17 {r['AP17']:.3f}  PCK21@0.1 {r['PCK21_10']:.3f}  "
             f"PCK21@0.05 {r['PCK21_05']:.3f}",
             f"OKS AP {r['AP']:.3f}  AP50 {r['AP50']:.3f}  AP75 {r['AP75']:.3f}  AR {r['AR']:.3f}"
             "  (all 21 points)",
             f"{'keypoint':<20}{'n':>5}{'PCK@.05':>9}{'PCK@.1':>8}{'AP':>7}"]
    for name, v in r["per_keypoint"].items():
        if v["n"]:
            ap = "-" if v.get("AP") is None else f"{v['AP']:.3f}"
            lines.append(f"{name:<20}{v['n']:>5}{v['within_5pct']:>9.2f}{v['within_10pct']:>8.2f}"
                         f"{ap:>7}")
        else:
            lines.append(f"{name:<20}{0:>5}{'-':>9}{'-':>8}{'-':>7}")
    return "\n".join(lines)
