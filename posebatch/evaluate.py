"""``posebatch eval``: accuracy of a run's per-image JSON against COCO keypoints ground truth.

Why two measures: OKS AP (pycocotools) is the number the field compares models by; the per-keypoint
share within 5% / 10% of the box size says which of the 21 points (the four derived ones above
all) can be trusted, which AP averages away.
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
from posebatch.schema import API21_NAMES

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
THRESHOLDS = (0.05, 0.10)
COCO_MAX_DETS = 20


def load_predictions(gt: dict[str, Any], pred_dir: Path) -> list[dict[str, Any]]:
    """COCO-format detections from ``pred_dir/<file_name>.json``; a missing file is an error."""
    dets = []
    for img in gt["images"]:
        path = pred_dir / result_key(img["file_name"])
        if not path.is_file():
            raise ConfigError(f"no prediction for {img['file_name']}: expected {path}")
        result = json.loads(path.read_text())
        for person in result.get("person_info", []):
            kp = []
            for name in API21_NAMES:
                part = person["body_parts"][name]
                kp += [part["x"], part["y"], part["score"]]
            loc = person["location"]
            dets.append({"image_id": img["id"], "category_id": 1, "keypoints": kp,
                         "score": loc["score"],
                         "bbox": [loc["left"], loc["top"], loc["width"], loc["height"]]})
    return dets


def evaluate(gt_path: str, pred_dir: str, max_dets: int = COCO_MAX_DETS) -> dict[str, Any]:
    """``max_dets``: detections per image that count (COCO's keypoint default, 20, truncates
    crowded images; 100, the jobs' ``max_persons``, scores every person a run can report)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = json.loads(Path(gt_path).read_text())
    names = gt["categories"][0]["keypoints"]
    if list(names) != list(API21_NAMES):
        raise ConfigError(f"{gt_path}: expected the 21 API keypoints in API order, got {names}")
    dets = load_predictions(gt, Path(pred_dir))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets) if dets else None
    report: dict[str, Any] = {"images": len(gt["images"]),
                              "persons": sum(1 for a in gt["annotations"]
                                             if a.get("num_keypoints", 0) > 0),
                              "detections": len(dets), "sigmas": SIGMAS}
    if coco_dt is None:
        report.update(AP=0.0, AP50=0.0, AP75=0.0, AR=0.0)
    else:
        ev = COCOeval(coco_gt, coco_dt, "keypoints")
        ev.params.kpt_oks_sigmas = np.array([SIGMAS[n] for n in API21_NAMES])
        if max_dets != COCO_MAX_DETS:
            ev.params.maxDets = [max_dets]
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            if max_dets == COCO_MAX_DETS:
                ev.summarize()
        if max_dets == COCO_MAX_DETS:
            report.update(AP=float(ev.stats[0]), AP50=float(ev.stats[1]),
                          AP75=float(ev.stats[2]), AR=float(ev.stats[5]))
        else:  # summarize() hard-codes 20: the same means, taken from the arrays
            report.update(_stats(ev))
        report["max_dets"] = max_dets
    report["per_keypoint"] = per_keypoint_accuracy(gt, dets)
    return report


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


def _oks(gt_kp: np.ndarray, dt_kp: np.ndarray, area: float, sigmas: np.ndarray) -> float:
    vis = gt_kp[:, 2] > 0
    if not vis.any():
        return 0.0
    d2 = ((gt_kp[:, :2] - dt_kp[:, :2]) ** 2).sum(axis=1)
    var = (2 * sigmas) ** 2
    e = d2 / var / (area + np.spacing(1)) / 2
    return float(np.exp(-e[vis]).mean())


def per_keypoint_accuracy(gt: dict[str, Any], dets: list[dict[str, Any]]) -> dict[str, Any]:
    """Match GT persons to detections greedily by OKS, then per keypoint the share of visible GT
    points within 5% / 10% of max(box width, height). Unmatched GT persons count as misses."""
    sigmas = np.array([SIGMAS[n] for n in API21_NAMES])
    by_image: dict[int, list[np.ndarray]] = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(np.array(d["keypoints"]).reshape(21, 3))
    hits = np.zeros((len(THRESHOLDS), 21))
    totals = np.zeros(21)
    for img in gt["images"]:
        anns = [a for a in gt["annotations"]
                if a["image_id"] == img["id"] and a.get("num_keypoints", 0) > 0]
        preds = by_image.get(img["id"], [])
        used: set[int] = set()
        for a in anns:
            g = np.array(a["keypoints"], dtype=np.float64).reshape(21, 3)
            vis = g[:, 2] > 0
            totals += vis
            scores = [(_oks(g, p, a["area"], sigmas), j) for j, p in enumerate(preds)
                      if j not in used]
            best = max(scores, default=(0.0, -1))
            if best[1] < 0 or best[0] <= 0.0:
                continue
            used.add(best[1])
            size = max(a["bbox"][2], a["bbox"][3])
            dist = np.hypot(*(g[:, :2] - preds[best[1]][:, :2]).T)
            for t, frac in enumerate(THRESHOLDS):
                hits[t] += vis & (dist <= frac * size)
    out = {}
    for j, name in enumerate(API21_NAMES):
        n = int(totals[j])
        out[name] = {"n": n, **{f"within_{int(f * 100)}pct": (hits[t, j] / n if n else None)
                                for t, f in enumerate(THRESHOLDS)}}
    return out


def format_report(r: dict[str, Any]) -> str:
    lines = [f"images {r['images']}, annotated persons {r['persons']}, "
             f"detections {r['detections']}",
             f"OKS AP {r['AP']:.3f}  AP50 {r['AP50']:.3f}  AP75 {r['AP75']:.3f}  AR {r['AR']:.3f}",
             f"{'keypoint':<20}{'n':>5}{'<=5%':>8}{'<=10%':>8}"]
    for name, v in r["per_keypoint"].items():
        if v["n"]:
            lines.append(f"{name:<20}{v['n']:>5}{v['within_5pct']:>8.2f}{v['within_10pct']:>8.2f}")
        else:
            lines.append(f"{name:<20}{0:>5}{'-':>8}{'-':>8}")
    return "\n".join(lines)
