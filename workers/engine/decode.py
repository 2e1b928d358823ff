"""Decode and validate one encoded image, per the input rules of SPEC.

Why here and not in the model wrapper: every rule (format, byte size, side lengths) is checked on
the header *before* pixels are decoded, so a PNG bomb or a 20000-px scan costs microseconds, and
each rejection becomes an error result with the original API's code instead of a crashed batch.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageFile, UnidentifiedImageError

from posebatch.errors import BAD_FORMAT, BAD_SIZE, EMPTY_IMAGE, INTERNAL_ERROR, ImageError
from workers.engine.letterbox import PAD_GRAY

ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP")

# A broken EXIF block is read as orientation 1 (README, Input rules): the image is fine, so
# Pillow's "Possibly corrupt EXIF data" warnings (from the TIFF parser it reads EXIF with) and
# "malformed MPO" (a JPEG read as a plain JPEG) say nothing the user can act on and must not
# reach stderr. A filter, not ``catch_warnings``: decoding runs on several threads, and
# catch_warnings swaps the process-wide filter list, which is not thread-safe.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
warnings.filterwarnings("ignore", message=r"(Possibly )?[Cc]orrupt EXIF", category=UserWarning)
warnings.filterwarnings("ignore", message="Image appears to be a malformed MPO file",
                        category=UserWarning)


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 4 * 1024 * 1024
    min_side: int = 15
    max_side: int = 4096


@dataclass(frozen=True)
class DecodedImage:
    """Pixels ready for the letterbox, and how they relate to the upright original.

    ``rgb (h, w, 3) uint8`` may be smaller than the original (JPEG draft mode decodes at 1/2, 1/4
    or 1/8 scale); ``scale_xy`` maps its pixels to the upright original's: x_orig = x * sx.
    """

    rgb: np.ndarray
    width: int
    """Upright original width in pixels (after EXIF orientation)."""
    height: int
    scale_xy: tuple[float, float]


class JpegPixels(Protocol):
    """Another decoder for the pixels of RGB and grayscale JPEGs (workers.engine.nvdecode)."""

    def decode(self, data: bytes) -> np.ndarray | None:
        """``(h, w, 3) uint8`` as stored (no EXIF orientation), or None: the CPU decodes it."""
        ...


def decode_image(data: bytes, limits: Limits = Limits(), target: int | None = None,
                 jpeg: JpegPixels | None = None) -> DecodedImage:
    """Validate ``data`` and decode it to upright RGB; raise ImageError with the API's code.

    ``target``: the model's input side. A JPEG is decoded in draft mode at the smallest DCT scale
    whose long side is still >= target, which is several times faster for large photos and loses
    nothing, since the letterbox would shrink it to ``target`` anyway.
    ``jpeg``: decodes the pixels of RGB and grayscale JPEGs instead (``--decode gpu``), at full
    size; the rules above are checked here all the same, and what it returns None for is
    decoded here.
    """
    if not data:
        raise ImageError(EMPTY_IMAGE, "image is empty (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Set by some other library in this process: Pillow would then fill a truncated image
        # with gray and call it whole. Refuse rather than give results of partial pixels.
        raise ImageError(INTERNAL_ERROR, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this "
                         "process (set by another library), so truncated images would pass as "
                         "whole: posebatch refuses to decode; please report it")
    if len(data) > limits.max_bytes:
        raise ImageError(
            BAD_SIZE, f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow refuses before allocating: far beyond max_side x max_side anyway.
        raise ImageError(BAD_SIZE, f"image dimensions are too large ({err}); the longest side "
                         f"must be at most {limits.max_side} px") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageError(BAD_FORMAT, "not a JPEG, PNG or BMP image (cannot identify it)") from err
    if im.format not in ACCEPTED_FORMATS:
        raise ImageError(BAD_FORMAT, f"format is {im.format}; accepted: JPEG, PNG, BMP")
    w, h = im.size
    if min(w, h) < limits.min_side:
        raise ImageError(
            BAD_SIZE, f"image is {w}x{h}; the shortest side must be at least {limits.min_side} px"
        )
    if max(w, h) > limits.max_side:
        raise ImageError(
            BAD_SIZE, f"image is {w}x{h}; the longest side must be at most {limits.max_side} px"
        )
    if im.format == "JPEG" and im.mode in ("RGB", "L"):
        # Kept as the array simplejpeg returns: a round trip through a Pillow image costs a
        # copy made while holding the GIL (Image.tobytes), which capped a 16-core GPU host.
        orientation = _exif_orientation(im)  # a JPEG's EXIF is in its header: no pixels read
        arr = jpeg.decode(data) if jpeg is not None else None
        if arr is None or arr.shape[:2] != (h, w):
            arr = _decode_jpeg_scaled(data, w, h, target)
        else:
            arr = _shrink_like_dct(arr, w, h, target)
        if orientation in _TRANSPOSES:
            arr = np.asarray(_apply_orientation(Image.fromarray(arr), orientation))
    else:
        _check_integrity(im.format, data)
        # Pixels first, EXIF after: a PNG's getexif() loads the pixels itself when its eXIf
        # chunk may follow them, and the except below would have swallowed a decode error,
        # leaving a half-decoded image that the later load() took as done.
        rgb_im = _decode_with_pillow(im, target)
        orientation = _exif_orientation(im)
        if orientation in _TRANSPOSES:
            rgb_im = _apply_orientation(rgb_im, orientation)
        arr = np.asarray(rgb_im)
    rotated = orientation in (5, 6, 7, 8)
    up_w, up_h = (h, w) if rotated else (w, h)
    sx = up_w / arr.shape[1]
    sy = up_h / arr.shape[0]
    return DecodedImage(rgb=arr, width=up_w, height=up_h, scale_xy=(sx, sy))


def _dct_factor(w: int, h: int, target: int | None) -> int:
    """The largest of 1, 2, 4, 8 whose scaled size still covers ``target`` on the long side."""
    s = min(1.0, target / max(w, h)) if target else 1.0
    need_w, need_h = math.ceil(w * s), math.ceil(h * s)
    return max(f for f in (1, 2, 4, 8) if -(-w // f) >= need_w and -(-h // f) >= need_h)


def _shrink_like_dct(arr: np.ndarray, w: int, h: int, target: int | None) -> np.ndarray:
    """A full-size decode (``--decode gpu``) shrunk to the size the CPU path decodes at, by
    averaging f x f blocks as the DCT scaling about does: the letterbox then gets the same sizes
    and scale factors on both paths and pixels 0.2-0.3 gray levels apart on average (1080p
    frames), and it resizes a quarter of the pixels. (The dev set's AP moved the same with or
    without it: tests/test_nvdecode.py.)"""
    f = _dct_factor(w, h, target)
    if f == 1:
        return arr
    return cv2.resize(arr, (-(-w // f), -(-h // f)), interpolation=cv2.INTER_AREA)


def _decode_jpeg_scaled(data: bytes, w: int, h: int, target: int | None) -> np.ndarray:
    """libjpeg-turbo (simplejpeg) at the smallest power-of-two DCT scale whose size still covers
    ``target`` on the long side (1/2 for a 1080p frame, 1/4 for a 12 MP photo): the scales Pillow's
    draft mode used, 1.4x faster per 1080p frame (docs/cpu-backends.md). Not the N/8 scales
    libjpeg-turbo also has: 3/8 was no faster to decode, and it samples a rotated photo
    differently from its upright twin, which moved a weak keypoint by 2.5 % of the image.
    """
    f = _dct_factor(w, h, target)
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-w // f),
                                      min_height=-(-h // f))
    except ValueError as err:
        raise ImageError(BAD_FORMAT, f"image data is truncated or corrupt ({err})") from err


def _check_integrity(fmt: str | None, data: bytes) -> None:
    """Catch corrupt pixel data that Pillow would decode without a word.

    PNG: every critical chunk's CRC-32 is checked (Pillow checks none of IDAT's), so one flipped
    byte in the compressed pixels is an error, not a wrong or partly black image.
    JPEG (the CMYK ones that take the Pillow path): Pillow ignores libjpeg's warnings about
    corrupt entropy-coded data (a bad Huffman code, a marker inside the scan) and returns
    whatever it decoded; libjpeg-turbo in strict mode raises on them, so the scan is decoded
    once more at 1/8 scale (all of the Huffman decoding, a 64th of the IDCT) just to check it.
    A bit flip that still decodes to valid codes cannot be found: JPEG has no checksum.
    BMP: no checksum either; a truncated pixel array is refused by Pillow's load().
    """
    if fmt == "PNG":
        _check_png_crcs(data)
    elif fmt == "JPEG":
        try:
            simplejpeg.decode_jpeg(data, colorspace="CMYK", min_factor=8, strict=True)
        except ValueError as err:
            raise ImageError(BAD_FORMAT, f"image data is truncated or corrupt ({err})") from err


_PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")


def _check_png_crcs(data: bytes) -> None:
    pos = 8  # after the signature
    end = len(data)
    while pos + 12 <= end:
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4:pos + 8]
        body_end = pos + 8 + length
        if body_end + 4 > end:
            return  # a truncated file: Pillow's load() reports it as truncated
        if kind in _PNG_CRITICAL:
            (stored,) = struct.unpack_from(">I", data, body_end)
            if zlib.crc32(memoryview(data)[pos + 4:body_end]) != stored:
                raise ImageError(BAD_FORMAT, f"PNG data is corrupt: the checksum (CRC) of its "
                                 f"{kind.decode('ascii')} chunk at byte {pos} does not match")
        if kind == b"IEND":
            return
        pos = body_end + 4


def _decode_with_pillow(im: Image.Image, target: int | None) -> Image.Image:
    """PNG, BMP and the JPEGs simplejpeg does not take (CMYK): Pillow, draft mode for JPEG."""
    w, h = im.size
    if target and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK", "YCbCr"):
        s = target / max(w, h)
        if s < 0.5:
            im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
    try:
        im.load()
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(BAD_FORMAT, f"image data is truncated or corrupt ({err})") from err
    return _to_rgb(im)


def _exif_orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block must not reject an otherwise fine image
        return 1


_TRANSPOSES = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT,),
    3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,),
    5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_270,),
    7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_90,),
}


def _apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    # Same table as ImageOps.exif_transpose, applied to the already converted RGB image (which
    # has lost the EXIF block during convert()).
    for op in _TRANSPOSES[orientation]:
        im = im.transpose(op)
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any accepted mode to 8-bit RGB; transparent pixels become the letterbox gray."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr * (255.0 / peak), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (PAD_GRAY, PAD_GRAY, PAD_GRAY, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    if im.mode != "RGB":
        return im.convert("RGB")
    return im


__all__ = ["ACCEPTED_FORMATS", "DecodedImage", "JpegPixels", "Limits", "decode_image"]
