"""Corrupt pixel data behind an intact header is 216201, never a result of partial pixels
(issue 21, rows 1 and 12).

Table-driven, real encoded files: each case damages the *data* of an image whose header is
fine (one flipped byte inside PNG's IDAT, a corrupt or cut JPEG scan, a cut BMP pixel array), so
it passes every header rule and only decoding can tell. Each goes through every decoder path
(libjpeg-turbo for RGB/gray JPEG, Pillow for PNG, BMP and CMYK JPEG, draft mode for a small
target) and through `posebatch run` and `posebatch serve`, which share the decoder.
On the main before this change the PNG cases came back "ok" (``_exif_orientation`` called
``getexif()``, which loads a PNG, and swallowed its decode error; the later ``load()`` did
nothing) and so did the CMYK JPEG with a corrupt scan (Pillow ignores libjpeg's warnings).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from posebatch.errors import BAD_FORMAT, INTERNAL_ERROR, ImageError
from posebatch.testing.cluster import CLI, read_counts_csv
from tests.devdata import require_model
from tests.images import encode, gradient
from workers.engine.decode import decode_image

pytestmark = pytest.mark.timeout(300)


def noise(w: int = 200, h: int = 150, mode: str = "RGB") -> Image.Image:
    """Incompressible pixels: every byte of the compressed data matters, so a flipped one is
    found by the decoder's structure checks where they exist (seeded: the same bytes each run)."""
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _chunks(png: bytes):
    pos = 8
    while pos < len(png):
        (n,) = struct.unpack_from(">I", png, pos)
        yield pos, n, png[pos + 4:pos + 8]
        pos += 12 + n


def png_flipped_idat(*, fix_crc: bool, where: float = 0.5, exif_after: bool = False) -> bytes:
    """A PNG with one byte of its compressed pixels flipped; ``fix_crc``: the chunk's CRC is
    recomputed, so only the zlib stream can tell. ``exif_after``: an eXIf chunk after the pixel
    data, the layout for which Pillow's getexif() must load the pixels first."""
    data = bytearray(encode(noise(), "PNG"))
    pos, n, _ = next(c for c in _chunks(bytes(data)) if c[2] == b"IDAT")
    data[pos + 8 + int(n * where)] ^= 0xFF
    if fix_crc:
        data[pos + 8 + n:pos + 12 + n] = struct.pack(">I", zlib.crc32(data[pos + 4:pos + 8 + n]))
    if exif_after:
        exif = Image.Exif()
        exif[0x0112] = 6
        body = exif.tobytes()[6:]  # eXIf holds the TIFF structure without "Exif\0\0"
        chunk = (struct.pack(">I", len(body)) + b"eXIf" + body
                 + struct.pack(">I", zlib.crc32(b"eXIf" + body)))
        iend = bytes(data).rindex(b"IEND") - 4
        data[iend:iend] = chunk
    return bytes(data)


def flipped(data: bytes, where: float) -> bytes:
    out = bytearray(data)
    out[int(len(data) * where)] ^= 0x55
    return bytes(out)


def cut(data: bytes, keep: float) -> bytes:
    return data[:int(len(data) * keep)]


def jpeg(mode: str = "RGB", **kw) -> bytes:
    return encode(noise(mode=mode), "JPEG", quality=90, **kw)


# name -> (file factory, words in the error message)
CORRUPT: dict[str, tuple[Callable[[], bytes], str]] = {
    "png-flipped-idat-byte": (lambda: png_flipped_idat(fix_crc=False), "CRC"),
    "png-flipped-idat-byte-crc-fixed": (lambda: png_flipped_idat(fix_crc=True), "corrupt"),
    "png-flipped-early-byte-crc-fixed": (lambda: png_flipped_idat(fix_crc=True, where=0.05),
                                         "corrupt"),
    "png-flipped-idat-byte-exif-after": (
        lambda: png_flipped_idat(fix_crc=True, exif_after=True), "corrupt"),
    "png-cut-in-idat": (lambda: cut(encode(noise(), "PNG"), 0.5), "truncated"),
    "jpeg-corrupt-scan": (lambda: flipped(jpeg(), 0.5), "Corrupt JPEG data"),
    "jpeg-cut-scan": (lambda: cut(jpeg(), 0.7), "Premature end"),
    "jpeg-gray-corrupt-scan": (lambda: flipped(jpeg("L"), 0.5), "Corrupt JPEG data"),
    "jpeg-progressive-corrupt-scan": (lambda: flipped(jpeg(progressive=True), 0.5),
                                      "Corrupt JPEG data"),
    "jpeg-cmyk-corrupt-scan": (lambda: flipped(jpeg("CMYK"), 0.5), "Corrupt JPEG data"),
    "jpeg-cmyk-cut-scan": (lambda: cut(jpeg("CMYK"), 0.7), "truncated or corrupt"),
    "bmp-cut-pixel-array": (lambda: cut(encode(noise(), "BMP"), 0.5), "truncated"),
}
EXT = {"png": ".png", "jpe": ".jpg", "bmp": ".bmp"}


def _ext(name: str) -> str:
    return EXT[name[:3]]


@pytest.mark.parametrize("target", [640, 64], ids=["full-size", "draft"])
@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_pixel_data_is_216201(name, target):
    make, words = CORRUPT[name]
    data = make()
    Image.open(io.BytesIO(data))  # the header is intact: it opens
    with pytest.raises(ImageError) as info:
        decode_image(data, target=target)
    assert info.value.code == BAD_FORMAT, info.value.message
    assert words in info.value.message, info.value.message


def test_the_intact_files_of_the_table_decode():
    """The damage, not the kind of file, is what is refused."""
    for data in (encode(noise(), "PNG"), jpeg(), jpeg("L"), jpeg(progressive=True),
                 jpeg("CMYK"), encode(noise(), "BMP")):
        for target in (640, 64):
            assert decode_image(data, target=target).width == 200


def broken_exif_jpeg() -> bytes:
    """A JPEG whose EXIF block is cut short: Pillow warns "Truncated File Read" / "Possibly
    corrupt EXIF data" while reading it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "a long image description " * 8
    import warnings

    with warnings.catch_warnings():  # Pillow warns while writing it too: not the subject
        warnings.simplefilter("ignore")
        return encode(gradient(64, 48), "JPEG", exif=exif.tobytes()[:-60])


def test_a_broken_exif_block_is_orientation_1_and_says_nothing_on_stderr(tmp_path):
    """In a fresh process (warnings show once per process): no warning reaches stderr."""
    path = tmp_path / "exif.jpg"
    path.write_bytes(broken_exif_jpeg())
    code = ("import sys; from workers.engine.decode import decode_image; "
            f"img = decode_image(open({str(path)!r}, 'rb').read()); print(img.width, img.height)")
    proc = subprocess.run([CLI[0], "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["64", "48"]
    assert proc.stderr == ""


def test_decoding_refuses_when_another_library_turned_truncated_loading_on(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError) as info:
        decode_image(cut(encode(noise(), "PNG"), 0.5))
    assert info.value.code == INTERNAL_ERROR
    assert "LOAD_TRUNCATED_IMAGES" in info.value.message


def test_nothing_the_workers_and_serve_import_turns_truncated_loading_on():
    code = ("import posebatch.cli, workers.batch, workers.tasks, workers.serve.app, "
            "workers.local_run; from PIL import ImageFile; "
            "print(ImageFile.LOAD_TRUNCATED_IMAGES)")
    proc = subprocess.run([CLI[0], "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# -- the same files through `posebatch run` and `posebatch serve` ------------------------------

@pytest.fixture(scope="module")
def corrupt_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corrupt")
    for name, (make, _) in CORRUPT.items():
        (root / f"{name}{_ext(name)}").write_bytes(make())
    (root / "good.png").write_bytes(encode(noise(), "PNG"))
    (root / "broken-exif.jpg").write_bytes(broken_exif_jpeg())
    return root


def test_run_gives_each_corrupt_file_216201_and_prints_no_warning(corrupt_folder, tmp_path):
    require_model()
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, "run", str(corrupt_folder), "--out", str(out), "--no-progress",
                           "--imgsz", "320"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no traceback, no Pillow warning (EXIF, MPO)
    rows = {r["key"]: r for r in read_counts_csv((out / "_counts.csv").read_bytes())}
    for name, (_, words) in CORRUPT.items():
        row = rows[f"{name}{_ext(name)}"]
        assert row["error_code"] == str(BAD_FORMAT), (name, row)
        assert words in row["error_msg"], (name, row["error_msg"])
    assert rows["good.png"]["status"] == rows["broken-exif.jpg"]["status"] == "ok"


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    from tests.test_serve import KEY, SECRET, ServeProcess, _env

    require_model()
    srv = ServeProcess(tmp_path_factory.mktemp("serve") / "serve.log", ["--max-wait-ms", "5"],
                       _env(POSEBATCH_API_KEYS=f"{KEY}:{SECRET}", POSEBATCH_IMGSZ="320"))
    yield srv
    srv.stop()


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_serve_answers_216201_for_each_corrupt_file(serve, name):
    from tests.test_serve import get_token, raw_post

    _, body = get_token(serve)
    make, words = CORRUPT[name]
    answer = raw_post(serve, {"image": base64.b64encode(make()).decode()},
                      body["access_token"])
    assert answer.get("error_code") == BAD_FORMAT, answer
    assert words in answer["error_msg"], answer
    assert "person_num" not in answer


def test_serve_logs_no_warning_for_a_broken_exif_block(serve):
    from tests.test_serve import get_token, raw_post

    _, body = get_token(serve)
    answer = raw_post(serve, {"image": base64.b64encode(broken_exif_jpeg()).decode()},
                      body["access_token"])
    assert "person_num" in answer, answer
    log = serve.log.read_text(errors="replace")
    assert "EXIF" not in log and "UserWarning" not in log, log[-2000:]
    json.dumps(answer)
