"""Skeleton overlays drawn with Pillow: boxes with scores, limbs coloured by the person's side.

Why Pillow only: it is already the workers' decoder, so overlays need no new dependency on a
worker, and the report draws the same pictures from the stored results.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from posebatch.exports.skeleton import LIMBS, limb_side, side
from posebatch.schema import PoseResult

COLOURS = {"left": (229, 57, 53), "right": (30, 136, 229), "center": (67, 160, 71)}
BOX = (255, 179, 0)
GREY = (160, 160, 160)


def open_upright(data: bytes) -> Image.Image:
    """Decode and apply EXIF orientation, so the picture matches the result's coordinates."""
    im = Image.open(io.BytesIO(data))
    im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


def draw_overlay(im: Image.Image, result: PoseResult, kpt_threshold: float,
                 valid: Sequence[bool] | None = None,
                 scale: tuple[float, float] = (1.0, 1.0)) -> Image.Image:
    """Return a copy of upright ``im`` with every person of ``result`` drawn on it.

    ``valid`` marks persons the job counts; the others get a thin grey box so a viewer sees what
    the counts left out. ``scale`` maps result pixels to ``im`` pixels (a reduced decode).
    Keypoints under ``kpt_threshold`` and limbs touching them are not drawn.
    """
    out = im.copy()
    draw = ImageDraw.Draw(out)
    sx, sy = scale
    unit = max(out.size) / 1000.0
    line = max(1, round(3 * unit))
    radius = max(2, round(4 * unit))
    font = _font(max(10, round(16 * unit)))
    index = {name: i for i, name in enumerate(result.names)}
    for i, ((x1, y1, x2, y2), score, kpts) in enumerate(zip(
            result.boxes_xyxy.tolist(), result.box_scores.tolist(), result.kpts.tolist(),
            strict=True)):
        ok = valid[i] if valid is not None else True
        box = (x1 * sx, y1 * sy, x2 * sx, y2 * sy)
        draw.rectangle(box, outline=BOX if ok else GREY, width=line if ok else 1)
        label = f"{score:.2f}"
        at = (box[0], max(0.0, box[1] - _height(draw, font) - 2))
        draw.rectangle(draw.textbbox(at, label, font=font), fill=(0, 0, 0))
        draw.text(at, label, fill=BOX if ok else GREY, font=font)
        for a, b in LIMBS:
            (ax, ay, sa), (bx, by, sb) = kpts[index[a]], kpts[index[b]]
            if sa >= kpt_threshold and sb >= kpt_threshold:
                draw.line((ax * sx, ay * sy, bx * sx, by * sy),
                          fill=COLOURS[limb_side(a, b)], width=line)
        for name, (x, y, s) in zip(result.names, kpts, strict=True):
            if s >= kpt_threshold:
                x, y = x * sx, y * sy
                draw.ellipse((x - radius, y - radius, x + radius, y + radius),
                             fill=COLOURS[side(name)], outline=(255, 255, 255))
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _height(draw: ImageDraw.ImageDraw, font: Any) -> float:
    left, top, right, bottom = draw.textbbox((0, 0), "0.00", font=font)
    return bottom - top


def to_jpeg(im: Image.Image, max_side: int | None = None, quality: int = 85) -> bytes:
    if max_side and max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()
