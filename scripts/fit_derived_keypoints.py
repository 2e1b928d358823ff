"""Fit and measure the derived keypoints (top_head, neck, mouth corners) of engine/keypoints.py.

Usage (from the repository root):

    python scripts/fit_derived_keypoints.py [--gt ../shared/data/dev/annotations.json]

Input of every derivation here is the GROUND-TRUTH COCO-17 points (score 1 where annotated,
0 where not), so the numbers measure the derivation itself, not the pose model. Errors are
distances normalised by the GT box size max(w, h); "w5"/"w10" are the shares within 5% / 10%.

It (1) refits every constant by least squares on normalised residuals, with leave-one-person-out
(LOO) errors, (2) evaluates the module (its constants, not the refit) per top_head path, forcing
each path by zeroing the scores of the points the path must not use, and derives the score
factors Q = (hits within 5% + 1) / (n + 2), (3) evaluates simple baselines, (4) checks the seed's
example. Exit status 1 when a module constant differs from its refit (rounded to 3 decimals).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posebatch.devdata import dev_data_dir  # noqa: E402
from workers.engine import keypoints as K  # noqa: E402


def default_gt() -> Path:
    """The dev set's annotations (``posebatch.devdata``), or where they would be."""
    found = dev_data_dir()
    return (found or ROOT.parent / "shared" / "data" / "dev") / "annotations.json"


UP = np.array([0.0, -1.0])

# The seed's example (shared/SPEC.md, shared/seeds/000_77f146afea5b95e7.txt), all 21 points;
# its box is 652.6 x 703.2.
SEED = {
    "top_head": (620.0, 242.53125), "left_ear": (659.65625, 295.40625),
    "right_ear": (593.5625, 282.1875), "left_eye": (633.21875, 282.1875),
    "right_eye": (606.78125, 282.1875), "nose": (620.0, 295.40625),
    "left_mouth_corner": (633.21875, 308.625), "right_mouth_corner": (606.78125, 308.625),
    "neck": (620.0, 335.0625), "left_shoulder": (699.3125, 361.5),
    "right_shoulder": (553.90625, 348.28125), "left_elbow": (791.84375, 361.5),
    "right_elbow": (461.375, 348.28125), "left_wrist": (884.375, 374.71875),
    "right_wrist": (368.84375, 348.28125), "left_hip": (686.09375, 573.0),
    "right_hip": (593.5625, 586.21875), "left_knee": (699.3125, 731.625),
    "right_knee": (580.34375, 744.84375), "left_ankle": (725.75, 877.03125),
    "right_ankle": (580.34375, 890.25),
}
SEED_BOX = 703.20654296875


def seed_kp17() -> np.ndarray:
    return np.array([[[*SEED[n], 0.9] for n in K.COCO17_NAMES]], dtype=np.float32)


def load_gt(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """GT (n, 21, 3) with visibility as third column, box sizes (n,), source per person."""
    gt = json.loads(path.read_text())
    names = gt["categories"][0]["keypoints"]
    if list(names) != list(K.API21_NAMES):
        raise SystemExit(f"{path}: keypoints are not the 21 API keypoints in API order")
    files = {im["id"]: im["file_name"] for im in gt["images"]}
    kps, boxes, srcs = [], [], []
    for a in gt["annotations"]:
        kps.append(np.asarray(a["keypoints"], dtype=np.float64).reshape(21, 3))
        boxes.append(max(a["bbox"][2], a["bbox"][3]))
        srcs.append(files[a["image_id"]].split("/")[0])
    return np.array(kps), np.array(boxes), srcs


def gt_kp17(gt21: np.ndarray) -> np.ndarray:
    """The GT COCO points as model-like input: score 1 where annotated, 0 where not."""
    idx = [K.API21_NAMES.index(n) for n in K.COCO17_NAMES]
    kp = gt21[:, idx].copy()
    kp[..., 2] = (kp[..., 2] > 0).astype(np.float64)
    return kp


def force(kp17: np.ndarray, path: int) -> np.ndarray:
    """Zero the scores a path must not use, so to_api21 takes exactly that path."""
    kp = kp17.copy()
    face = [K.NOSE, K.L_EYE, K.R_EYE, K.L_EAR, K.R_EAR]
    hips = [K.L_HIP, K.R_HIP]
    if path in (K.PATH_FACE, K.PATH_SHOULDERS):
        kp[:, hips, 2] = 0.0
    if path in (K.PATH_TORSO, K.PATH_SHOULDERS):
        kp[:, face, 2] = 0.0
    return kp


def lsq1(x: np.ndarray, y: np.ndarray, box: np.ndarray) -> float:
    """c minimising sum |y - c x|^2 / box^2 over people (x, y: (n, 2))."""
    w = 1.0 / box**2
    return float(np.sum(w * np.sum(x * y, 1)) / np.sum(w * np.sum(x * x, 1)))


def fit_with_loo(x, y, base, target, box):
    """Fit c in target ~ base + c x; return c, normalised errors, LOO normalised errors."""
    c = lsq1(x, y, box)
    err = np.linalg.norm(base + c * x - target, axis=1) / box
    loo = np.empty(len(box))
    for i in range(len(box)):
        keep = np.arange(len(box)) != i
        ci = lsq1(x[keep], y[keep], box[keep])
        loo[i] = np.linalg.norm(base[i] + ci * x[i] - target[i]) / box[i]
    return c, err, loo


def stats(err: np.ndarray) -> str:
    if len(err) == 0:
        return "n=0"
    return (f"n={len(err):2d}  median {np.median(err):.3f}  w5 {np.mean(err < 0.05):.2f}  "
            f"w10 {np.mean(err < 0.10):.2f}")


def row(label: str, err: np.ndarray) -> str:
    if len(err) == 0:
        return f"| {label} | 0 | - | - | - |"
    return (f"| {label} | {len(err)} | {np.median(err):.3f} | {np.mean(err < 0.05):.2f} | "
            f"{np.mean(err < 0.10):.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gt", type=Path, default=None, help="COCO keypoints JSON, 21 API points "
                    "(default: $POSEBATCH_DEV_DATA/annotations.json or ../shared/data/dev)")
    args = ap.parse_args(argv)
    args.gt = args.gt or default_gt()

    gt21, box, srcs = load_gt(args.gt)
    kp17 = gt_kp17(gt21)
    vis = gt21[..., 2] > 0
    a = {n: i for i, n in enumerate(K.API21_NAMES)}
    top_gt, neck_gt = gt21[:, a["top_head"], :2], gt21[:, a["neck"], :2]
    shoulders = vis[:, a["left_shoulder"]] & vis[:, a["right_shoulder"]]
    hips = vis[:, a["left_hip"]] & vis[:, a["right_hip"]]
    nose = vis[:, a["nose"]]
    has_top = vis[:, a["top_head"]] & shoulders
    has_neck = vis[:, a["neck"]] & shoulders
    print(f"GT: {args.gt}  people {len(box)}  with top_head+both shoulders {has_top.sum()}  "
          f"with neck+both shoulders {has_neck.sum()}")
    print("sources:", {s: srcs.count(s) for s in sorted(set(srcs))})

    # ---- 1. fits -------------------------------------------------------------------------
    print("\n## 1. least-squares fits (normalised by box size), with leave-one-out")
    eligible = {
        K.PATH_FACE_TORSO: has_top & nose & hips,
        K.PATH_FACE: has_top & nose,
        K.PATH_TORSO: has_top & hips,
        K.PATH_SHOULDERS: has_top,
    }
    fits: dict[str, float] = {}
    for path, name, const in [
        (K.PATH_FACE_TORSO, "TOP_HEAD_FACE_TORSO_K", K.TOP_HEAD_FACE_TORSO_K),
        (K.PATH_FACE, "TOP_HEAD_FACE_K", K.TOP_HEAD_FACE_K),
        (K.PATH_TORSO, "TOP_HEAD_TORSO_K", K.TOP_HEAD_TORSO_K),
        (K.PATH_SHOULDERS, "TOP_HEAD_SHOULDERS_K", K.TOP_HEAD_SHOULDERS_K),
    ]:
        m = eligible[path]
        f = K.features(force(kp17[m], path))
        assert (f["path"] == path).all(), (name, f["path"])
        tgt, s = top_gt[m], f["S"]
        lt = f["L"][:, None] * f["ut"]
        if path == K.PATH_FACE_TORSO:
            x, base = lt, f["anchor"]
        elif path == K.PATH_FACE:
            x, base = f["W"][:, None] * f["p_face"], f["anchor"]
        elif path == K.PATH_TORSO:
            x, base = lt, s
        else:
            x, base = f["W"][:, None] * f["p_up"], s
        c, err, loo = fit_with_loo(x, tgt - base, base, tgt, box[m])
        fits[name] = c
        print(f"{name:22s} = {c:.3f} (module {const})  fit: {stats(err)}  LOO median "
              f"{np.median(loo):.3f} w5 {np.mean(loo < 0.05):.2f}")
    m = has_neck
    f = K.features(kp17[m])
    s = f["S"]
    c, err, loo = fit_with_loo(top_gt[m] - s, neck_gt[m] - s, s, neck_gt[m], box[m])
    fits["NECK_F"] = c
    print(f"{'NECK_F':22s} = {c:.3f} (module {K.NECK_F})  fit with GT top_head: {stats(err)}  "
          f"LOO median {np.median(loo):.3f}")
    # Pixel-space (unnormalised) least squares, for the record: big people weigh more.
    c_px = lsq1(top_gt[m] - s, neck_gt[m] - s, np.ones(m.sum()))
    print(f"{'':22s}   (pixel least squares would give {c_px:.3f}; per-person ratios "
          f"{np.round(np.sum((neck_gt[m]-s)*(top_gt[m]-s),1)/np.sum((top_gt[m]-s)**2,1), 3)})")
    se = {n: np.array(p) for n, p in SEED.items()}
    drop = (se["left_mouth_corner"][1] - se["left_eye"][1]) / (se["nose"][1] - se["left_eye"][1])
    fits["MOUTH_DROP"] = drop
    print(f"{'MOUTH_DROP':22s} = {drop:.3f} (module {K.MOUTH_DROP})  from the seed's example only")

    # ---- 2. module evaluation per path, score factors ------------------------------------
    print("\n## 2. module derivation forced onto each top_head path (GT COCO points as input)")
    print("| top_head path | n | median | w5 | w10 | Q = (hits5+1)/(n+2) (module) |")
    print("| --- | --- | --- | --- | --- | --- |")
    q_fit = np.zeros(4)
    for path in range(4):
        m = eligible[path]
        out = K.to_api21(force(kp17[m], path))
        err = np.linalg.norm(out[:, a["top_head"], :2] - top_gt[m], axis=1) / box[m]
        hits = int(np.sum(err < 0.05))
        q_fit[path] = (hits + 1) / (len(err) + 2)
        print(row(f"{path} {K.PATH_NAMES[path]}", err)[:-1]
              + f"| {hits}/{len(err)} -> {q_fit[path]:.3f} ({K.TOP_HEAD_Q[path]}) |")
    m = has_neck
    out = K.to_api21(kp17[m])
    err_neck = np.linalg.norm(out[:, a["neck"], :2] - neck_gt[m], axis=1) / box[m]
    hits = int(np.sum(err_neck < 0.05))
    neck_q = (hits + 1) / (len(err_neck) + 2)
    print(f"neck end to end (paths {sorted(set(K.derive(kp17[m])['path'].tolist()))}): "
          f"{stats(err_neck)}  Q = ({hits}+1)/({len(err_neck)}+2) = {neck_q:.3f} "
          f"(module {K.NECK_Q})")
    out3 = K.to_api21(force(kp17[m], K.PATH_SHOULDERS))
    err3 = np.linalg.norm(out3[:, a["neck"], :2] - neck_gt[m], axis=1) / box[m]
    print(f"neck with top_head forced onto path 3 (shoulders only): {stats(err3)}")

    # ---- 3. the module as used (natural path choice) vs baselines ------------------------
    print("\n## 3. derivation as used (natural path from the annotated points) vs baselines")
    print("| point / method | n | median | w5 | w10 |")
    print("| --- | --- | --- | --- | --- |")
    m = has_top
    out = K.to_api21(kp17[m])
    feats = K.features(kp17[m])
    err_top = np.linalg.norm(out[:, a["top_head"], :2] - top_gt[m], axis=1) / box[m]
    print(row("top_head: module (cascade)", err_top))
    for path in range(4):
        sel = feats["path"] == path
        print(row(f"top_head: module, people on path {path} {K.PATH_NAMES[path]}", err_top[sel]))
    s = feats["S"]
    print(row("top_head baseline: shoulder midpoint S",
              np.linalg.norm(s - top_gt[m], axis=1) / box[m]))
    mn = has_top & nose
    fn = K.features(kp17[mn])
    print(row("top_head baseline: nose", np.linalg.norm(fn["anchor"] - top_gt[mn], axis=1)
              / box[mn]))
    # Alternatives that were fitted the same way and rejected (their LOO errors are worse).
    x = fn["anchor"] - fn["S"]
    c, _, loo = fit_with_loo(x, top_gt[mn] - fn["S"], fn["S"], top_gt[mn], box[mn])
    print(row(f"top_head alt (LOO): S + {c:.3f} (nose - S), along the shoulder->nose line", loo))
    x = fn["L"][:, None] * fn["ut"]
    mh = hips[mn]
    c, _, loo = fit_with_loo(x[mh], top_gt[mn][mh] - fn["S"][mh], fn["S"][mh], top_gt[mn][mh],
                             box[mn][mh])
    print(row(f"top_head alt (LOO): S + {c:.3f} L ut, ignoring a confident nose", loo))
    x = feats["W"][:, None] * UP
    c, _, loo = fit_with_loo(x, top_gt[m] - s, s, top_gt[m], box[m])
    print(row(f"top_head alt (LOO): S + {c:.3f} W (0, -1), plain image up", loo))
    m = has_neck
    f = K.features(kp17[m])
    print(row("neck: module S + f (top_head_derived - S)", err_neck))
    print(row("neck baseline: shoulder midpoint S", np.linalg.norm(f["S"] - neck_gt[m], axis=1)
              / box[m]))
    top_derived = K.to_api21(kp17[m])[:, a["top_head"], :2].astype(np.float64)
    s_seed = 0.5 * (se["left_shoulder"] + se["right_shoulder"])
    f_seed = lsq1((se["top_head"] - s_seed)[None], (se["neck"] - s_seed)[None], np.ones(1))
    for f_alt, why in [(c_px, "pixel least squares"), (f_seed, "the seed's own ratio")]:
        alt = f["S"] + f_alt * (top_derived - f["S"])
        print(row(f"neck alt: f = {f_alt:.3f} ({why})",
                  np.linalg.norm(alt - neck_gt[m], axis=1) / box[m]))
    print(row("neck oracle: S + f (top_head_GT - S)",
              np.linalg.norm(f["S"] + K.NECK_F * (top_gt[m] - f["S"]) - neck_gt[m], axis=1)
              / box[m]))

    # ---- 4. the seed's example -------------------------------------------------------------
    print(f"\n## 4. seed example (box {SEED_BOX:.1f} px; its coordinates sit on a 13.22 px grid)")
    out = K.to_api21(seed_kp17())[0]
    for name in K.DERIVED_NAMES:
        p = out[a[name], :2]
        d = float(np.linalg.norm(p - se[name]))
        print(f"{name:20s} derived ({p[0]:7.1f}, {p[1]:7.1f})  seed ({se[name][0]:7.1f}, "
              f"{se[name][1]:7.1f})  off {d:5.1f} px = {d / SEED_BOX:.3f} of box  "
              f"score {out[a[name], 2]:.3f}")

    # ---- consistency of the module with this run ------------------------------------------
    bad = []
    for name, c in fits.items():
        if round(c, 3) != round(getattr(K, name), 3):
            bad.append(f"{name}: module {getattr(K, name)} refit {c:.3f}")
    for path in range(4):
        if round(q_fit[path], 3) != round(float(K.TOP_HEAD_Q[path]), 3):
            bad.append(f"TOP_HEAD_Q[{path}]: module {K.TOP_HEAD_Q[path]} refit {q_fit[path]:.3f}")
    if round(neck_q, 3) != round(K.NECK_Q, 3):
        bad.append(f"NECK_Q: module {K.NECK_Q} refit {neck_q:.3f}")
    print("\nmodule constants match this fit" if not bad else "\nMISMATCH: " + "; ".join(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
