"""``posebatch eval`` metrics on tiny hand-made ground truth, where every number is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from posebatch.evaluate import COCO17, evaluate, format_report, match_people
from posebatch.schema import API21_NAMES


def person(x0: float, y0: float, size: float = 100.0) -> np.ndarray:
    """21 visible points spread over a size x size box at (x0, y0)."""
    rng = np.random.default_rng(int(x0 + y0))
    kp = np.ones((21, 3))
    kp[:, :2] = [x0, y0] + rng.uniform(0, size, (21, 2))
    kp[:, 2] = 2
    return kp


def write(tmp: Path, gt_people: list[np.ndarray], pred_people: list[np.ndarray],
          scores: list[float] | None = None) -> tuple[Path, Path]:
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "keypoints": p.ravel().tolist(), "num_keypoints": 21,
             "bbox": [float(p[:, 0].min()), float(p[:, 1].min()),
                      float(np.ptp(p[:, 0])), float(np.ptp(p[:, 1]))],
             "area": float(np.ptp(p[:, 0]) * np.ptp(p[:, 1]))} for i, p in enumerate(gt_people)]
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "width": 1000, "height": 1000}],
          "annotations": anns,
          "categories": [{"id": 1, "name": "person", "keypoints": list(API21_NAMES)}]}
    gt_path = tmp / "gt.json"
    gt_path.write_text(json.dumps(gt))
    persons = [{"body_parts": {n: {"x": float(p[j, 0]), "y": float(p[j, 1]), "score": 0.9}
                               for j, n in enumerate(API21_NAMES)},
                "location": {"left": float(p[:, 0].min()), "top": float(p[:, 1].min()),
                             "width": float(np.ptp(p[:, 0])), "height": float(np.ptp(p[:, 1])),
                             "score": s}}
               for p, s in zip(pred_people, scores or [0.9] * len(pred_people), strict=True)]
    pred = tmp / "pred"
    pred.mkdir()
    (pred / "a.jpg.json").write_text(json.dumps({"person_num": len(persons),
                                                 "person_info": persons, "log_id": 1}))
    return gt_path, pred


def test_perfect_predictions_score_one(tmp_path):
    people = [person(0, 0), person(500, 500)]
    r = evaluate(*map(str, write(tmp_path, people, people)))
    assert r["recall"] == 1.0 and r["PCK21_05"] == 1.0 and r["PCK21_10"] == 1.0
    assert r["AP"] == pytest.approx(1.0) and r["AP17"] == pytest.approx(1.0)
    assert all(v["AP"] == pytest.approx(1.0) for v in r["per_keypoint"].values())
    text = format_report(r)
    assert "recall 1.000  AP17 1.000  PCK21@0.1 1.000  PCK21@0.05 1.000" in text


def test_shifted_points_count_by_threshold(tmp_path):
    gt = person(0, 0)
    size = max(np.ptp(gt[:, 0]), np.ptp(gt[:, 1]))
    pred = gt.copy()
    pred[:7, 0] += 0.07 * size      # 7 points between 5% and 10% of the box size away
    pred[7:10, 0] += 0.2 * size     # 3 points beyond 10%
    r = evaluate(*map(str, write(tmp_path, [gt], [pred])))
    assert r["PCK21_05"] == pytest.approx(11 / 21)
    assert r["PCK21_10"] == pytest.approx(18 / 21)
    first = r["per_keypoint"][API21_NAMES[0]]
    assert first["within_5pct"] == 0.0 and first["within_10pct"] == 1.0


def test_missed_person_lowers_recall_and_pck(tmp_path):
    people = [person(0, 0), person(500, 500)]
    r = evaluate(*map(str, write(tmp_path, people, people[:1])))
    assert r["recall"] == 0.5 and r["PCK21_05"] == 0.5


def test_matching_takes_best_pairs_first_not_gt_order():
    """GT 0 overlaps detection 0 only weakly, GT 1 matches it perfectly: GT-order greedy
    matching would give detection 0 to GT 0 and leave GT 1 unmatched."""
    near = person(0, 0)
    far = near.copy()
    far[:, 0] += 30
    anns = [{"keypoints": far.ravel().tolist(), "area": 10000.0},
            {"keypoints": near.ravel().tolist(), "area": 10000.0}]
    m = match_people(anns, [near])
    assert set(m) == {1} and m[1][0] == 0 and m[1][1] == pytest.approx(1.0)
    assert len(COCO17) == 17
