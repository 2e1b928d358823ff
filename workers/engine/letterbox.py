"""Letterbox geometry: fit an image into the model's input and map points back.

Pure functions on arrays whose shapes are in their names; no model runtime here, so the round
trip (original -> letterbox -> original) is tested exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

PAD_GRAY = 114
"""The grey Ultralytics pads with in training; also the background under transparent pixels."""


@dataclass(frozen=True)
class Letterbox:
    """Maps input pixels (of the array given to ``letterbox``) to model-input pixels.

    model_xy = src_xy * scale + (pad_x, pad_y)
    """

    scale: float
    pad_x: float
    pad_y: float
    out_hw: tuple[int, int]


def letterbox_params(src_hw: tuple[int, int], out_hw: tuple[int, int]) -> Letterbox:
    """Uniform scale that fits ``src_hw`` inside ``out_hw``, centred, as Ultralytics does."""
    sh, sw = src_hw
    oh, ow = out_hw
    if min(sh, sw, oh, ow) <= 0:
        raise ValueError(f"expected positive sizes, got src {src_hw} and out {out_hw}")
    scale = min(oh / sh, ow / sw)
    new_w, new_h = round(sw * scale), round(sh * scale)
    return Letterbox(scale=scale, pad_x=(ow - new_w) / 2, pad_y=(oh - new_h) / 2, out_hw=out_hw)


def letterbox(rgb_hw3: np.ndarray, out_hw: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """Resize ``rgb (h, w, 3) uint8`` into a gray canvas ``(H, W, 3) uint8``; return both."""
    if rgb_hw3.ndim != 3 or rgb_hw3.shape[2] != 3:
        raise ValueError(f"expected rgb of shape (h, w, 3), got {rgb_hw3.shape}")
    lb = letterbox_params(rgb_hw3.shape[:2], out_hw)
    oh, ow = out_hw
    new_w, new_h = round(rgb_hw3.shape[1] * lb.scale), round(rgb_hw3.shape[0] * lb.scale)
    if (new_w, new_h) != (rgb_hw3.shape[1], rgb_hw3.shape[0]):
        resized = np.asarray(
            Image.fromarray(rgb_hw3).resize((new_w, new_h), Image.Resampling.BILINEAR)
        )
    else:
        resized = rgb_hw3
    canvas = np.full((oh, ow, 3), PAD_GRAY, dtype=np.uint8)
    top, left = int(lb.pad_y), int(lb.pad_x)
    canvas[top : top + new_h, left : left + new_w] = resized
    # Store the integer offsets actually used, so the inverse is exact.
    return canvas, Letterbox(scale=lb.scale, pad_x=float(left), pad_y=float(top), out_hw=out_hw)


def to_source_xy(xy: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Invert the letterbox: ``xy (..., 2)`` in model pixels -> source-array pixels."""
    out = np.empty_like(xy, dtype=np.float32)
    out[..., 0] = (xy[..., 0] - lb.pad_x) / lb.scale
    out[..., 1] = (xy[..., 1] - lb.pad_y) / lb.scale
    return out


def to_input_tensor(canvas_hw3: np.ndarray) -> np.ndarray:
    """``canvas (H, W, 3) uint8`` -> the model's input ``(3, H, W) float32`` in [0, 1]."""
    tensor = np.ascontiguousarray(canvas_hw3.transpose(2, 0, 1), dtype=np.float32)
    tensor *= 1.0 / 255.0
    return tensor


def input_shape_for(src_hw: tuple[int, int], imgsz: int, stride: int = 32) -> tuple[int, int]:
    """Smallest stride-aligned rectangle with long side ``imgsz`` that holds the scaled image.

    For a 4:3 photo and imgsz 640 that is 480x640 (h x w): 25% fewer pixels than 640x640 and the
    same scale, hence the same detections up to padding effects.
    """
    sh, sw = src_hw
    scale = imgsz / max(sh, sw)
    h = int(np.ceil(sh * scale / stride) * stride)
    w = int(np.ceil(sw * scale / stride) * stride)
    return min(h, imgsz), min(w, imgsz)
