"""The 21-keypoint skeleton every export and overlay shares: limbs, sides, left/right swap.

Why one module: COCO's ``skeleton``, CVAT's skeleton SVG, Ultralytics' ``flip_idx`` and the report's
overlays must describe the same body; a second copy would drift.
"""

from __future__ import annotations

from posebatch.schema import API21_NAMES

NAMES: tuple[str, ...] = tuple(API21_NAMES)

# Limbs as name pairs; COCO wants them 1-based by index (``coco_skeleton``).
LIMBS: tuple[tuple[str, str], ...] = (
    ("left_ankle", "left_knee"), ("left_knee", "left_hip"),
    ("right_ankle", "right_knee"), ("right_knee", "right_hip"),
    ("left_hip", "right_hip"),
    ("left_shoulder", "left_hip"), ("right_shoulder", "right_hip"),
    ("neck", "left_shoulder"), ("neck", "right_shoulder"),
    ("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
    ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
    ("neck", "nose"), ("nose", "left_eye"), ("nose", "right_eye"),
    ("left_eye", "left_ear"), ("right_eye", "right_ear"),
    ("top_head", "left_ear"), ("top_head", "right_ear"),
    ("left_mouth_corner", "right_mouth_corner"),
)


def side(name: str) -> str:
    """"left", "right" or "center": the person's own side, for colouring limbs."""
    return name.split("_", 1)[0] if name.startswith(("left_", "right_")) else "center"


def limb_side(a: str, b: str) -> str:
    sides = {side(a), side(b)} - {"center"}
    return sides.pop() if len(sides) == 1 else "center"


def mirror(name: str) -> str:
    """The keypoint a horizontal flip turns ``name`` into (left_eye <-> right_eye)."""
    if name.startswith("left_"):
        return "right_" + name[len("left_"):]
    if name.startswith("right_"):
        return "left_" + name[len("right_"):]
    return name


def flip_idx() -> list[int]:
    """Ultralytics' ``flip_idx``: for each keypoint, the index of its mirror image."""
    return [NAMES.index(mirror(n)) for n in NAMES]


def coco_skeleton() -> list[list[int]]:
    """COCO's ``skeleton``: limbs as 1-based keypoint indices."""
    return [[NAMES.index(a) + 1, NAMES.index(b) + 1] for a, b in LIMBS]


# Where each point sits on a 100 x 100 canvas facing the viewer (the person's left is on the
# right of the picture): CVAT draws its skeleton template from these.
TEMPLATE_XY: dict[str, tuple[float, float]] = {
    "top_head": (50, 4), "left_ear": (58, 12), "right_ear": (42, 12), "left_eye": (54, 10),
    "right_eye": (46, 10), "nose": (50, 14), "left_mouth_corner": (53, 18),
    "right_mouth_corner": (47, 18), "neck": (50, 24), "left_shoulder": (62, 27),
    "right_shoulder": (38, 27), "left_elbow": (68, 42), "right_elbow": (32, 42),
    "left_wrist": (72, 56), "right_wrist": (28, 56), "left_hip": (57, 56), "right_hip": (43, 56),
    "left_knee": (58, 76), "right_knee": (42, 76), "left_ankle": (59, 95), "right_ankle": (41, 95),
}
