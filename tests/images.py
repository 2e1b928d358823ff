"""Generated test images (no third-party files): each a real encoded file of some kind."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int, mode: str = "RGB") -> Image.Image:
    """A smooth colour gradient: compresses well, decodes to known pixels."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    rgb = np.stack([x, y, 255 - x], axis=2).astype(np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(rgb)


def jpeg(w: int = 64, h: int = 48, orientation: int | None = None, **kw) -> bytes:
    im = gradient(w, h)
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    return encode(im, "JPEG", quality=90, **kw)


def noise_jpeg(w: int, h: int, quality: int = 100) -> bytes:
    """Incompressible content: a JPEG whose size grows with its area (for the byte limit)."""
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), "JPEG",
                  quality=quality)


def png_bomb(w: int = 20000, h: int = 20000) -> bytes:
    """A tiny PNG that claims huge dimensions (a 1-bit image of zeros)."""
    return encode(Image.new("1", (w, h)), "PNG", optimize=True)
