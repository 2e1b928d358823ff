"""The engine on real photos: EXIF orientation, draft decoding and batching do not move points.

Every backend and precision runs the same tests (bf16 runs emulated or as f32 on CPUs without it,
so the suite needs no special CPU)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from posebatch.modelstore import resolve_model
from posebatch.settings import JobSettings, RuntimeSettings, from_env
from tests.devdata import require_dev_data
from workers.engine.backends import Runner
from workers.engine.pipeline import PoseEngine
from workers.loading import open_model

PHOTO = "humanart/2D_virtual_human_digital_art_000000001648.jpg"


BACKENDS = [("ort", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]


@pytest.fixture(scope="module", params=BACKENDS, ids=["-".join(b) for b in BACKENDS])
def model(request) -> Runner:
    backend, precision = request.param
    rt = from_env(RuntimeSettings)
    return open_model(RuntimeSettings(model=str(resolve_model(rt.model, rt.cache_dir).path),
                                      backend=backend, precision=precision, providers="cpu"))


def run(model: Runner, images: dict[str, bytes], batch_size: int = 4) -> dict[str, dict]:
    engine = PoseEngine(model, JobSettings(), batch_size=batch_size, io_threads=2)
    return dict(engine.run((k, (lambda d=d: d)) for k, d in images.items()))


def jpeg_bytes(im: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if orientation:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif.tobytes()
    im.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def top_person(result: dict) -> dict:
    assert result["person_num"] >= 1, result
    return result["person_info"][0]


# Stored pixels = upright image transformed by the inverse of what the EXIF tag asks a viewer to
# do, so every variant *displays* as the upright photo.
STORED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,   # tag 6: viewer rotates 90 deg clockwise
    8: Image.Transpose.ROTATE_270,  # tag 8: viewer rotates 90 deg counter-clockwise
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_rotated_jpeg_gives_upright_coordinates(model, orientation):
    dev = require_dev_data()
    upright = Image.open(dev / "images" / PHOTO).convert("RGB")
    stored = upright.transpose(STORED[orientation])
    res = run(model, {"up": jpeg_bytes(upright), "rot": jpeg_bytes(stored, orientation)})
    a, b = top_person(res["up"]), top_person(res["rot"])
    size = max(upright.size)
    for name in ("nose", "left_shoulder", "right_hip", "left_wrist"):
        pa, pb = a["body_parts"][name], b["body_parts"][name]
        assert abs(pa["x"] - pb["x"]) < 0.02 * size and abs(pa["y"] - pb["y"]) < 0.02 * size, (
            name, pa, pb)
    # The person's left stays the person's left: no mirrored labels.
    assert (a["body_parts"]["left_shoulder"]["x"] > a["body_parts"]["right_shoulder"]["x"]) == (
        b["body_parts"]["left_shoulder"]["x"] > b["body_parts"]["right_shoulder"]["x"])


def test_results_do_not_depend_on_batch_size_or_order(model):
    dev = require_dev_data()
    files = sorted((dev / "images").rglob("*.jpg"))[:6]
    images = {f.name: f.read_bytes() for f in files}
    one = run(model, images, batch_size=1)
    many = run(model, dict(reversed(list(images.items()))), batch_size=4)
    strip = lambda r: {k: v for k, v in r.items() if k != "log_id"}  # noqa: E731
    assert {k: strip(v) for k, v in one.items()} == {k: strip(v) for k, v in many.items()}


def test_large_photo_decoded_in_draft_mode_matches_full_decode(model, tmp_path: Path):
    dev = require_dev_data()
    upright = Image.open(dev / "images" / PHOTO).convert("RGB")
    # 2.3x: 2944x4025, under the 4096 px limit; draft mode decodes it at 1/2 or 1/4 scale.
    k = 2.3
    big = upright.resize((round(upright.width * k), round(upright.height * k)),
                         Image.Resampling.BICUBIC)
    res = run(model, {"big": jpeg_bytes(big), "small": jpeg_bytes(upright)})
    a, b = top_person(res["small"]), top_person(res["big"])
    for name in ("nose", "left_shoulder", "right_knee"):
        pa, pb = a["body_parts"][name], b["body_parts"][name]
        assert np.hypot(pa["x"] * k - pb["x"], pa["y"] * k - pb["y"]) < 0.02 * max(big.size)
