"""An image's upright size from its header alone: no pixel is decoded.

Why: exports and the count table need the width and height a viewer sees (EXIF orientation
applied, as SPEC's coordinates are), and reading a header costs microseconds where decoding a
photo costs tens of milliseconds.
"""

from __future__ import annotations

import io

from PIL import Image

ORIENTATION_TAG = 0x0112
ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def upright_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` after EXIF orientation; raises OSError when ``data`` is no image."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        try:
            orientation = int(im.getexif().get(ORIENTATION_TAG, 1) or 1)
        except Exception:  # a broken EXIF block: the decoder ignores it too
            orientation = 1
    return (h, w) if orientation in ROTATED else (w, h)
