"""Which keys of an input are images, and where each image's result goes.

Why one module: the local run, ``submit``, ``watch``, exports and recounts must agree on both, or
an image would be listed by one and missed by another.
"""

from __future__ import annotations

RESULT_SUFFIX = ".json"
OVERLAY_SUFFIX = ".overlay.jpg"

# Files with these extensions are treated as images. Formats the API does not accept (GIF, WebP,
# TIFF, ...) are listed on purpose: they get an error result instead of being silently skipped.
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff",
    ".heic", ".heif", ".avif", ".jp2",
)


def is_image_key(key: str) -> bool:
    """An image to process; our own overlays (``run --overlays``) are not, or a drop folder whose
    output is its input would process them on the next run."""
    low = key.lower()
    return low.endswith(IMAGE_SUFFIXES) and not low.endswith(OVERLAY_SUFFIX)


def result_key(image_key: str) -> str:
    """``a/b.jpg`` -> ``a/b.jpg.json``: the image's own name plus ``.json``."""
    return image_key + RESULT_SUFFIX


def overlay_key(image_key: str) -> str:
    """``a/b.jpg`` -> ``a/b.jpg.overlay.jpg``: the optional skeleton picture beside the result."""
    return image_key + OVERLAY_SUFFIX
