"""COCO-17 keypoints -> the product's 21 keypoints (pure numpy).

The pose model gives the 17 COCO keypoints. The product (the cloud API we mimic) returns 21:
the 17 plus ``top_head``, ``neck`` and the two mouth corners, which are DERIVED here from the
17 by fixed geometry. The formulas, the fitted constants and their measured error are documented
in ``docs/keypoints.md``; ``scripts/fit_derived_keypoints.py`` refits every constant below from
``shared/data/dev/annotations.json`` and prints the error table (it fails if a constant here no
longer matches its refit).

Geometry (all rotation- and scale-equivariant except the last top_head fallback):

- ``S`` shoulder midpoint, ``W`` shoulder width, ``Hm`` hip midpoint, torso axis
  ``ut = unit(S - Hm)`` with torso length ``L = |S - Hm|``; ``p`` the unit perpendicular to the
  shoulder line on the side of the head anchor (``p_up``: on the image-up side).
- head anchor ``A``: the nose if confident, else the mean of the confident eyes/ears.
- top_head, first applicable path:
    0 face+torso:  ``A + TOP_HEAD_FACE_TORSO_K * L * ut``
    1 face only:   ``A + TOP_HEAD_FACE_K * W * p``
    2 torso only:  ``S + TOP_HEAD_TORSO_K * L * ut``
    3 shoulders:   ``S + TOP_HEAD_SHOULDERS_K * W * p_up``  (no face, no hips: which side of
                   the shoulder line is up is unknown, so the image's up side is taken)
- neck: ``S + NECK_F * (top_head - S)``.
- mouth corners: each eye + ``MOUTH_DROP`` * (the nose's offset from the eye midpoint,
  projected on the perpendicular of the eye line; on the body's up axis when the eye line is
  too short to be trusted). Each corner sits under its own eye, so left/right stay the
  person's own.

Scores: a derived point scores ``min(scores of the points it is built from) * Q`` where ``Q < 1``
is the derivation's own reliability, measured on the dev set as the Laplace-smoothed share of
people whose derived point falls within 5% of the box size, ``(hits + 1) / (n + 2)``.
"""

from __future__ import annotations

import numpy as np

from posebatch.schema import API21_NAMES

COCO17_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
DERIVED_NAMES: tuple[str, ...] = ("top_head", "left_mouth_corner", "right_mouth_corner", "neck")

_C = {name: i for i, name in enumerate(COCO17_NAMES)}
_A = {name: i for i, name in enumerate(API21_NAMES)}
NOSE, L_EYE, R_EYE, L_EAR, R_EAR = (_C[k] for k in COCO17_NAMES[:5])
L_SH, R_SH = _C["left_shoulder"], _C["right_shoulder"]
L_HIP, R_HIP = _C["left_hip"], _C["right_hip"]
# Copy-through map: API21 slot <- COCO17 index.
_COPY_DST = np.array([_A[n] for n in COCO17_NAMES])
_COPY_SRC = np.arange(len(COCO17_NAMES))

# A source point is "confident" (usable to pick a derivation path) at this score. Not fitted:
# it is the visibility threshold Ultralytics itself uses when drawing keypoints.
KP_CONF = 0.5

# ---- fitted constants: `python scripts/fit_derived_keypoints.py` reproduces each of them ----
# Fit data: shared/data/dev/annotations.json, GT COCO points as input (score 1 where annotated),
# least squares on residuals normalised by the GT box size max(w, h); "err" below is the median
# normalised distance of the fit, "LOO" the same under leave-one-person-out refits.
# top_head, path 0 (nose + hips): PoseTrack18, n=12 people, err 0.029, LOO 0.029.
TOP_HEAD_FACE_TORSO_K = 0.296
# top_head, path 1 (nose, hips ignored): PoseTrack18, n=13, err 0.047, LOO 0.047.
TOP_HEAD_FACE_K = 0.361
# top_head, path 2 (no face): PoseTrack18 + ExLPose, n=19, err 0.049, LOO 0.050.
TOP_HEAD_TORSO_K = 0.623
# top_head, path 3 (shoulders only): PoseTrack18 + ExLPose + MHP, n=23, err 0.052, LOO 0.053.
TOP_HEAD_SHOULDERS_K = 0.842
# neck = S + f * (top_head - S), fitted with the GT top_head: ExLPose, n=6, err 0.016, LOO 0.019.
NECK_F = 0.339
# Mouth corners: no annotation anywhere; calibrated on the seed's single example (eyes y=282.19,
# nose y=295.41, corners y=308.63 under the eyes: drop = 26.44 / 13.22 = 2.0 exactly). The seed's
# coordinates sit on a 13.22 px grid: half a cell on the nose drop alone spans [1.3, 4].
MOUTH_DROP = 2.0
# The eye-line perpendicular is trusted as the face's down axis only when the eyes are at least
# this many times as far apart as the nose is from their midpoint (frontal-ish faces; the seed
# has 2.0); in profile the body axis is used instead. A heuristic, not fitted.
EYE_LINE_MIN_RATIO = 1.0

# ---- score factors Q (per top_head path; see module docstring) ----
# top_head: smoothed share within 5% of box size of the derivation forced onto each path, on the
# same people as the fits above (hits/n: 9/12, 7/13, 10/19, 11/23).
TOP_HEAD_Q = np.array([0.714, 0.533, 0.524, 0.480])
# neck: ExLPose n=6, derived end to end from the 17 GT points (path 2): 6/6 within 5% -> 7/8.
NECK_Q = 0.875
# mouth corners: no GT to measure; one quantised example cannot establish reliability, so the
# factor is a policy (half), not a measurement.
MOUTH_Q = 0.5

PATH_FACE_TORSO, PATH_FACE, PATH_TORSO, PATH_SHOULDERS = 0, 1, 2, 3
PATH_NAMES = ("face+torso", "face", "torso", "shoulders")

_EPS = 1e-6
_MAX_COORD = 1e9
_IMAGE_UP = np.array([0.0, -1.0])


def _unit(v: np.ndarray, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors of v (n, 2) and their lengths; ``fallback`` where v is (nearly) zero."""
    length = np.linalg.norm(v, axis=-1)
    ok = length > _EPS
    safe = np.where(ok, length, 1.0)[:, None]
    return np.where(ok[:, None], v / safe, fallback), length


def _check(kp17: np.ndarray) -> np.ndarray:
    arr = np.asarray(kp17)
    if arr.ndim != 3 or arr.shape[1:] != (17, 3):
        raise ValueError(f"expected kp17 of shape (n, 17, 3), got {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"expected kp17 to be numeric, got dtype {arr.dtype}")
    return arr


def _sanitize(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 coordinates and scores in [0, 1]; a point with a non-finite (or absurd, beyond
    +-1e9 px, whose squares would overflow) value becomes (0, 0) with score 0."""
    a = arr.astype(np.float64, copy=True)
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(a).all(axis=-1) | (np.abs(a[..., :2]) > _MAX_COORD).any(axis=-1)
    a[bad] = 0.0
    xy = a[..., :2]
    score = np.clip(a[..., 2], 0.0, 1.0)
    return xy, score


def features(kp17: np.ndarray) -> dict[str, np.ndarray]:
    """The body frame the derivation is built on (also used by the fitting script)."""
    xy, sc = _sanitize(_check(kp17))
    n = xy.shape[0]
    s_mid = 0.5 * (xy[:, L_SH] + xy[:, R_SH])
    s_score = np.minimum(sc[:, L_SH], sc[:, R_SH])
    sh_dir, width = _unit(xy[:, L_SH] - xy[:, R_SH], np.array([1.0, 0.0]))
    # Perpendicular of the shoulder line (image up for a person facing the camera upright;
    # image up as well when the shoulders coincide), then flipped onto the image-up side.
    sh_perp = np.stack([sh_dir[:, 1], -sh_dir[:, 0]], axis=1)
    perp_up = np.where((sh_perp[:, 1] > 0)[:, None], -sh_perp, sh_perp)
    h_mid = 0.5 * (xy[:, L_HIP] + xy[:, R_HIP])
    h_score = np.minimum(sc[:, L_HIP], sc[:, R_HIP])
    torso_up, torso_len = _unit(s_mid - h_mid, _IMAGE_UP)

    # Head anchor: the nose when confident (the fits are on the nose), else the mean of the
    # confident eyes/ears; its score is the lowest score among the points it uses.
    nose_ok = sc[:, NOSE] >= KP_CONF
    ee = [L_EYE, R_EYE, L_EAR, R_EAR]
    ee_ok = sc[:, ee] >= KP_CONF
    ee_cnt = ee_ok.sum(axis=1)
    ee_mean = (xy[:, ee] * ee_ok[..., None]).sum(axis=1) / np.maximum(ee_cnt, 1)[:, None]
    ee_score = np.where(ee_ok, sc[:, ee], np.inf).min(axis=1)
    anchor = np.where(nose_ok[:, None], xy[:, NOSE], ee_mean)
    anchor_score = np.where(nose_ok, sc[:, NOSE], np.where(ee_cnt > 0, ee_score, 0.0))
    face_ok = nose_ok | (ee_cnt > 0)
    # ... and onto the head anchor's side (image-up side when the anchor is on the line).
    side = ((anchor - s_mid) * sh_perp).sum(axis=1)
    perp_face = np.where((side > 0)[:, None], sh_perp, np.where((side < 0)[:, None], -sh_perp,
                                                                   perp_up))
    torso_ok = (h_score >= KP_CONF) & (torso_len > _EPS)

    path = np.full(n, PATH_SHOULDERS, dtype=np.int64)
    path[torso_ok] = PATH_TORSO
    path[face_ok] = PATH_FACE
    path[face_ok & torso_ok] = PATH_FACE_TORSO
    return {
        "xy": xy, "score": sc, "S": s_mid, "S_score": s_score, "W": width,
        "p_face": perp_face, "p_up": perp_up,
        "H": h_mid, "H_score": h_score, "ut": torso_up, "L": torso_len,
        "anchor": anchor, "anchor_score": anchor_score, "face_ok": face_ok,
        "torso_ok": torso_ok, "path": path,
        "face_best": sc[:, [NOSE, *ee]].max(axis=1),
    }


def derive(kp17: np.ndarray) -> dict[str, np.ndarray]:
    """Derived points: {name: (n, 3)} for DERIVED_NAMES, plus "path" (n,) for top_head."""
    f = features(kp17)
    xy, sc, s_mid, s_score = f["xy"], f["score"], f["S"], f["S_score"]
    lt = (f["L"][:, None] * f["ut"])
    cand = np.stack([
        f["anchor"] + TOP_HEAD_FACE_TORSO_K * lt,
        f["anchor"] + TOP_HEAD_FACE_K * f["W"][:, None] * f["p_face"],
        s_mid + TOP_HEAD_TORSO_K * lt,
        s_mid + TOP_HEAD_SHOULDERS_K * f["W"][:, None] * f["p_up"],
    ], axis=1)                                             # (n, 4, 2)
    src = np.stack([
        np.minimum(s_score, np.minimum(f["anchor_score"], f["H_score"])),
        np.minimum(s_score, f["anchor_score"]),
        np.minimum(s_score, f["H_score"]),
        # shoulders only: face and hips are below KP_CONF, i.e. where the head is is unknown
        np.minimum(s_score, np.maximum(f["face_best"], f["H_score"])),
    ], axis=1)                                             # (n, 4)
    path = f["path"]
    rows = np.arange(len(path))
    top = cand[rows, path]
    top_src = src[rows, path]
    top_score = top_src * TOP_HEAD_Q[path]

    neck = s_mid + NECK_F * (top - s_mid)
    neck_score = top_src * NECK_Q

    # Mouth corners.
    body_up, _ = _unit(top - s_mid, _IMAGE_UP)
    l_eye, r_eye, nose = xy[:, L_EYE], xy[:, R_EYE], xy[:, NOSE]
    eye_vec = l_eye - r_eye
    nose_off = nose - 0.5 * (l_eye + r_eye)
    eye_dir, eye_dist = _unit(eye_vec, -body_up)
    perp = np.stack([-eye_dir[:, 1], eye_dir[:, 0]], axis=1)
    nose_dist = np.linalg.norm(nose_off, axis=1)
    use_perp = (eye_dist > _EPS) & (eye_dist >= EYE_LINE_MIN_RATIO * nose_dist)
    axis = np.where(use_perp[:, None], perp, -body_up)
    drop = (nose_off * axis).sum(axis=1, keepdims=True) * axis   # sign-free: (d.a) a
    mouth_src = np.minimum(np.minimum(sc[:, L_EYE], sc[:, R_EYE]), sc[:, NOSE])
    mouth_score = mouth_src * MOUTH_Q

    def pack(p: np.ndarray, s: np.ndarray) -> np.ndarray:
        return np.concatenate([p, s[:, None]], axis=1)

    return {
        "top_head": pack(top, top_score),
        "neck": pack(neck, neck_score),
        "left_mouth_corner": pack(l_eye + MOUTH_DROP * drop, mouth_score),
        "right_mouth_corner": pack(r_eye + MOUTH_DROP * drop, mouth_score),
        "path": path,
    }


def to_api21(kp17: np.ndarray) -> np.ndarray:
    """(n, 17, 3) COCO keypoints (x, y, score; image pixels) -> (n, 21, 3) in API21_NAMES order.

    The 17 COCO points are copied through (non-finite values become 0 with score 0, scores are
    clipped to [0, 1]); top_head, neck and the mouth corners are derived (see module docstring).
    """
    arr = _check(kp17)
    n = arr.shape[0]
    out = np.zeros((n, len(API21_NAMES), 3), dtype=np.float32)
    if n == 0:
        return out
    xy, sc = _sanitize(arr)
    out[:, _COPY_DST, :2] = xy[:, _COPY_SRC]
    out[:, _COPY_DST, 2] = sc[:, _COPY_SRC]
    derived = derive(arr)
    for name in DERIVED_NAMES:
        out[:, _A[name]] = derived[name]
    return out
