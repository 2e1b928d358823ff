"""Input rules of SPEC, each with a real encoded file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from posebatch.errors import BAD_FORMAT, BAD_SIZE, EMPTY_IMAGE, ImageError
from tests.images import encode, gradient, jpeg, noise_jpeg, png_bomb
from workers.engine.decode import Limits, decode_image

CASES = [
    # name, data factory, expected error code (None = accepted), expected upright (w, h)
    ("jpeg", lambda: jpeg(64, 48), None, (64, 48)),
    ("png", lambda: encode(gradient(40, 30), "PNG"), None, (40, 30)),
    ("bmp", lambda: encode(gradient(40, 30), "BMP"), None, (40, 30)),
    ("grayscale jpeg", lambda: encode(gradient(40, 30, "L"), "JPEG"), None, (40, 30)),
    ("cmyk jpeg", lambda: encode(gradient(40, 30, "CMYK"), "JPEG"), None, (40, 30)),
    ("palette png", lambda: encode(gradient(40, 30, "P"), "PNG"), None, (40, 30)),
    ("alpha png", lambda: encode(gradient(40, 30, "RGBA"), "PNG"), None, (40, 30)),
    ("16-bit png", lambda: encode(Image.fromarray(
        np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50), "PNG"), None, (40, 30)),
    ("exactly 15 px", lambda: jpeg(15, 200), None, (15, 200)),
    ("exactly 4096 px", lambda: jpeg(4096, 16), None, (4096, 16)),
    ("empty", lambda: b"", EMPTY_IMAGE, None),
    ("random bytes", lambda: bytes(np.random.default_rng(1).integers(0, 256, 3000, np.uint8)),
     BAD_FORMAT, None),
    ("text", lambda: b"hello, this is not an image\n" * 10, BAD_FORMAT, None),
    ("truncated jpeg", lambda: noise_jpeg(200, 200)[:3000], BAD_FORMAT, None),
    ("gif", lambda: encode(gradient(40, 30, "P"), "GIF"), BAD_FORMAT, None),
    ("webp", lambda: encode(gradient(40, 30), "WEBP"), BAD_FORMAT, None),
    ("tiff", lambda: encode(gradient(40, 30), "TIFF"), BAD_FORMAT, None),
    ("too small 10x10", lambda: jpeg(10, 10), BAD_SIZE, None),
    ("14 px side", lambda: jpeg(14, 300), BAD_SIZE, None),
    ("4097 wide", lambda: jpeg(4097, 20), BAD_SIZE, None),
    ("png bomb", png_bomb, BAD_SIZE, None),
    ("over 4 MiB", lambda: noise_jpeg(1900, 1900), BAD_SIZE, None),
]


@pytest.mark.parametrize(("name", "factory", "code", "size"), CASES, ids=[c[0] for c in CASES])
def test_input_rule(name, factory, code, size):
    data = factory()
    if code is None:
        img = decode_image(data, target=640)
        assert (img.width, img.height) == size
        assert img.rgb.dtype == np.uint8 and img.rgb.ndim == 3 and img.rgb.shape[2] == 3
    else:
        with pytest.raises(ImageError) as info:
            decode_image(data, target=640)
        assert info.value.code == code, info.value.message
        assert info.value.message  # says what was wrong


def test_size_limit_is_configurable():
    data = jpeg(64, 48)
    with pytest.raises(ImageError) as info:
        decode_image(data, Limits(max_bytes=len(data) - 1))
    assert info.value.code == BAD_SIZE and str(len(data)) in info.value.message
    assert decode_image(data, Limits(max_bytes=len(data))).width == 64


def test_error_message_names_the_problem():
    with pytest.raises(ImageError, match="format is GIF; accepted: JPEG, PNG, BMP"):
        decode_image(encode(gradient(40, 30, "P"), "GIF"))
    with pytest.raises(ImageError, match="10x10; the shortest side must be at least 15 px"):
        decode_image(jpeg(10, 10))


# EXIF orientation -> (upright w, h) for a stored 64x48 image, and where the stored top-left
# corner pixel ends up in the upright image.
ORIENTATIONS = [
    (1, (64, 48), "top-left"), (2, (64, 48), "top-right"), (3, (64, 48), "bottom-right"),
    (4, (64, 48), "bottom-left"), (5, (48, 64), "top-left"), (6, (48, 64), "top-right"),
    (7, (48, 64), "bottom-right"), (8, (48, 64), "bottom-left"),
]


@pytest.mark.parametrize(("orientation", "size", "corner"), ORIENTATIONS)
def test_exif_orientation_gives_upright_image(orientation, size, corner):
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:12, :12] = 255  # a white block in the stored top-left corner
    data = encode(Image.fromarray(stored), "PNG")
    im = Image.open(__import__("io").BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(im, "JPEG", quality=95, exif=exif.tobytes())
    img = decode_image(data)
    assert (img.width, img.height) == size
    h, w = img.rgb.shape[:2]
    corners = {"top-left": img.rgb[2, 2], "top-right": img.rgb[2, w - 3],
               "bottom-left": img.rgb[h - 3, 2], "bottom-right": img.rgb[h - 3, w - 3]}
    assert corners[corner].mean() > 200, {k: v.mean() for k, v in corners.items()}
    others = [v.mean() for k, v in corners.items() if k != corner]
    assert max(others) < 60


def test_jpeg_draft_mode_decodes_smaller_and_reports_scale():
    img = decode_image(jpeg(4000, 3000), target=640)
    assert (img.width, img.height) == (4000, 3000)
    assert img.rgb.shape[1] < 4000 and img.rgb.shape[1] >= 640
    assert img.scale_xy[0] == pytest.approx(4000 / img.rgb.shape[1])
    assert img.scale_xy[1] == pytest.approx(3000 / img.rgb.shape[0])
