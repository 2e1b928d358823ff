"""Which keys of an input are images, and where each image's result goes.

Why one module: the local run, ``submit``, ``watch``, exports and recounts must agree on both, or
an image would be listed by one and missed by another.
"""

from __future__ import annotations

import hashlib

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


RESULT_LAYOUTS = ("mirror", "sharded")
"""Where results go below OUTPUT: ``mirror`` (default) ``a/b.jpg.json`` beside the input's own
path; ``sharded`` ``3f/a/b.jpg.json`` under one of 256 hash prefixes, so that one job's PUTs and
GETs spread over 256 S3 partitions instead of the input's few prefixes (S3 serves ~3,500 PUT/s
and 5,500 GET/s per prefix)."""


def shard(image_key: str) -> str:
    """The two hex digits of ``image_key``'s MD5: its sharded result's first folder."""
    return hashlib.md5(image_key.encode("utf-8", "surrogateescape"),
                       usedforsecurity=False).hexdigest()[:2]


def _placed(image_key: str, layout: str) -> str:
    if layout == "mirror":
        return image_key
    if layout == "sharded":
        return f"{shard(image_key)}/{image_key}"
    raise ValueError(f"result layout {layout!r}: expected one of {', '.join(RESULT_LAYOUTS)}")


def result_key(image_key: str, layout: str = "mirror") -> str:
    """``a/b.jpg`` -> ``a/b.jpg.json`` (``mirror``), or ``3f/a/b.jpg.json`` (``sharded``)."""
    return _placed(image_key, layout) + RESULT_SUFFIX


def image_key_of(key: str, layout: str = "mirror") -> str | None:
    """The image whose result is stored at ``key`` (``result_key``'s inverse); None when
    ``key`` is no result's place in ``layout`` (a sharded key in the wrong shard folder)."""
    if not key.endswith(RESULT_SUFFIX):
        return None
    image = key[: -len(RESULT_SUFFIX)]
    if layout == "sharded":
        folder, _, rest = image.partition("/")
        return rest if rest and folder == shard(rest) else None
    return image


def overlay_key(image_key: str, layout: str = "mirror") -> str:
    """``a/b.jpg`` -> ``a/b.jpg.overlay.jpg``: the optional skeleton picture beside the result."""
    return _placed(image_key, layout) + OVERLAY_SUFFIX
