"""Bad and unusual input, generated here, through `posebatch run` and through the real cluster.

Every file gets either a correct result or an error result whose code is the original API's and
whose message says what was wrong; no file crashes its batch or keeps the other images of that
batch from their results. The corpus is made by the test (no third-party files): broken and
hostile files, every accepted pixel format, the 8 EXIF orientations of one photo (a frame of the
dev set), and keys with spaces and non-ASCII characters.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from posebatch.errors import BAD_FORMAT, BAD_SIZE, EMPTY_IMAGE
from posebatch.testing.cluster import (
    WorkerProcess,
    comparable_summary,
    compare_with_reference,
    download_results,
    read_counts_csv,
    record_figures,
    rerun_batches,
    run_cli,
    upload_tree,
    without_log_id,
    worker_log,
)
from tests.devdata import require_dev_data
from tests.images import encode, gradient, jpeg, noise_jpeg, png_bomb
from tests.tables import without_versions

PHOTO = "posetrack18/images_val_003418_mpii_test_000000.jpg"  # people, well separated
PHOTO_SIZE = (480, 256)  # multiples of 16: every rotation has the same JPEG block grid
# EXIF orientation -> the transposes that make the stored image, so that applying the
# orientation gives back the upright photo.
TO_STORED = {
    1: (), 2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,),
    4: (Image.Transpose.FLIP_TOP_BOTTOM,), 5: (Image.Transpose.TRANSPOSE,),
    6: (Image.Transpose.ROTATE_90,), 7: (Image.Transpose.TRANSVERSE,),
    8: (Image.Transpose.ROTATE_270,),
}

# key -> (expected error code or None for a result, words the error message must contain)
EXPECTED: dict[str, tuple[int | None, tuple[str, ...]]] = {
    "bad/zero bytes.jpg": (EMPTY_IMAGE, ("empty", "0 bytes")),
    "bad/random-bytes.jpg": (BAD_FORMAT, ("not a JPEG, PNG or BMP",)),
    "bad/truncated.jpg": (BAD_FORMAT, ("truncated or corrupt",)),
    "bad/png-bomb.png": (BAD_SIZE, ("too large", "4096 px")),
    "bad/animated.gif": (BAD_FORMAT, ("format is GIF", "accepted: JPEG, PNG, BMP")),
    "bad/picture.webp": (BAD_FORMAT, ("format is WEBP", "accepted: JPEG, PNG, BMP")),
    "size/10x10.jpg": (BAD_SIZE, ("10x10", "at least 15 px")),
    "size/4097x64.jpg": (BAD_SIZE, ("4097x64", "at most 4096 px")),
    "size/5 MB.jpg": (BAD_SIZE, ("bytes; the limit is 4194304 bytes",)),
    "size/15x15.png": (None, ()),
    "size/4096x32.jpg": (None, ()),
    "formats/rgb.png": (None, ()),
    "formats/rgb.bmp": (None, ()),
    "formats/cmyk.jpg": (None, ()),
    "formats/gray8.png": (None, ()),
    "formats/gray16.png": (None, ()),
    "formats/palette.png": (None, ()),
    "formats/alpha.png": (None, ()),
    **{f"exif/orientation-{o}.jpg": (None, ()) for o in TO_STORED},
    "名前 with spaces/café ñ 人 (1).jpg": (None, ()),
    "名前 with spaces/ü+%20&=.png": (None, ()),
}


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def make_bad_corpus(root: Path) -> dict[str, bytes]:
    dev = require_dev_data() / "images"
    with Image.open(dev / PHOTO) as im:
        photo = ImageOps.exif_transpose(im).convert("RGB").resize(PHOTO_SIZE,
                                                                  Image.Resampling.LANCZOS)
    frames = [gradient(40, 30, "P"), Image.new("P", (40, 30), 3), gradient(40, 30, "P")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    five_mb = noise_jpeg(1700, 1700)
    assert len(five_mb) >= 5_000_000, len(five_mb)
    gray16 = (np.asarray(photo.convert("L")).astype(np.uint16) * 257)
    files = {
        "bad/zero bytes.jpg": b"",
        "bad/random-bytes.jpg": np.random.default_rng(3).integers(0, 256, 5000,
                                                                  np.uint8).tobytes(),
        "bad/truncated.jpg": _enc(photo, "JPEG", quality=95)[:4000],
        "bad/png-bomb.png": png_bomb(),
        "bad/animated.gif": gif.getvalue(),
        "bad/picture.webp": _enc(photo, "WEBP"),
        "size/10x10.jpg": jpeg(10, 10),
        "size/4097x64.jpg": jpeg(4097, 64),
        "size/5 MB.jpg": five_mb,
        "size/15x15.png": encode(gradient(15, 15), "PNG"),
        "size/4096x32.jpg": jpeg(4096, 32),
        "formats/rgb.png": _enc(photo, "PNG"),
        "formats/rgb.bmp": _enc(photo, "BMP"),
        "formats/cmyk.jpg": _enc(photo.convert("CMYK"), "JPEG", quality=95, subsampling=0),
        "formats/gray8.png": _enc(photo.convert("L"), "PNG"),
        "formats/gray16.png": _enc(Image.fromarray(gray16), "PNG"),
        "formats/palette.png": _enc(photo.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "formats/alpha.png": _enc(photo.convert("RGBA"), "PNG"),
        "名前 with spaces/café ñ 人 (1).jpg": _enc(photo, "JPEG", quality=90),
        "名前 with spaces/ü+%20&=.png": _enc(photo, "PNG"),
    }
    for o, ops in TO_STORED.items():
        stored = photo
        for op in ops:
            stored = stored.transpose(op)
        exif = Image.Exif()
        exif[0x0112] = o
        files[f"exif/orientation-{o}.jpg"] = _enc(stored, "JPEG", quality=95, subsampling=0,
                                                  exif=exif.tobytes())
    assert set(files) == set(EXPECTED)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad-corpus")
    make_bad_corpus(root)
    return root


@pytest.fixture(scope="module")
def local(bad_corpus, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bad-local")
    proc = run_cli("run", str(bad_corpus), "--out", str(out), "--no-progress",
                   "--batch-size", "4", env={})
    assert f"{len(EXPECTED)} images" in proc.stdout
    return {p.relative_to(out).as_posix(): json.loads(p.read_text())
            for p in out.rglob("*.json")} | {"_counts.csv": (out / "_counts.csv").read_bytes()}


def result_of(results: dict, key: str) -> dict:
    return results[key + ".json"]


def top_person_near(result: dict, ref: dict, diagonal: float) -> float:
    """Mean distance (as a share of the image diagonal) between the confident keypoints of the
    reference's clearest person (most keypoints above 0.5) and those of the closest person in
    ``result``."""
    best = max(ref["person_info"],
               key=lambda p: sum(part["score"] > 0.5 for part in p["body_parts"].values()))
    loc = best["location"]
    cx, cy = loc["left"] + loc["width"] / 2, loc["top"] + loc["height"] / 2

    def centre_dist(p: dict) -> float:
        q = p["location"]
        return float(np.hypot(q["left"] + q["width"] / 2 - cx, q["top"] + q["height"] / 2 - cy))

    assert result["person_info"], "no person found"
    match = min(result["person_info"], key=centre_dist)
    names = [n for n, part in best["body_parts"].items() if part["score"] > 0.5]
    assert len(names) >= 8
    d = [np.hypot(match["body_parts"][n]["x"] - best["body_parts"][n]["x"],
                  match["body_parts"][n]["y"] - best["body_parts"][n]["y"]) for n in names]
    return float(np.mean(d)) / diagonal


# -- posebatch run ------------------------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_each_file_gets_the_expected_result(local, key):
    code, words = EXPECTED[key]
    result = result_of(local, key)
    assert 0 <= result["log_id"] < 2**64
    if code is None:
        assert "error_code" not in result, result
        assert result["person_num"] == len(result["person_info"])
    else:
        assert result["error_code"] == code, result
        for word in words:
            assert word in result["error_msg"], result["error_msg"]


def test_the_summary_counts_every_file_once_with_its_code(local):
    summary = local["_summary.json"]
    errors = [c for c, _ in EXPECTED.values() if c is not None]
    assert summary["images_seen"] == len(EXPECTED)
    assert summary["failed"] == len(errors) and summary["succeeded"] == len(EXPECTED) - len(errors)
    assert summary["failed_by_code"] == {str(c): errors.count(c) for c in sorted(set(errors))}
    rows = read_counts_csv(local["_counts.csv"])
    assert sorted(r["key"] for r in rows) == sorted(EXPECTED)


@pytest.mark.parametrize("orientation", sorted(TO_STORED))
def test_exif_orientation_gives_upright_coordinates(local, orientation):
    """The stored pixels are transposed and tagged: the persons must come out where they are
    in the upright photo (a wrong transform moves them by a large part of the image)."""
    ref = result_of(local, "formats/rgb.png")
    got = result_of(local, f"exif/orientation-{orientation}.jpg")
    assert top_person_near(got, ref, float(np.hypot(*PHOTO_SIZE))) < 0.02
    for person in got["person_info"]:
        for part in person["body_parts"].values():
            assert 0 <= part["x"] <= PHOTO_SIZE[0] - 1 and 0 <= part["y"] <= PHOTO_SIZE[1] - 1


@pytest.mark.parametrize(("key", "same_as", "tolerance"), [
    ("formats/rgb.bmp", "formats/rgb.png", 0.0),  # the same pixels, another container
    ("formats/alpha.png", "formats/rgb.png", 0.0),  # opaque alpha changes nothing
    ("formats/cmyk.jpg", "formats/rgb.png", 0.02),
    ("formats/palette.png", "formats/rgb.png", 0.06),  # 256 colours: less exact (0.032)
    ("formats/gray16.png", "formats/gray8.png", 0.01),  # 16 bits scaled down to 8
    ("名前 with spaces/café ñ 人 (1).jpg", "formats/rgb.png", 0.02),
    ("名前 with spaces/ü+%20&=.png", "formats/rgb.png", 0.0),
])
def test_pixel_formats_give_the_same_persons(local, key, same_as, tolerance):
    got, ref = result_of(local, key), result_of(local, same_as)
    if tolerance == 0.0:
        assert without_log_id({"r": got}) == without_log_id({"r": ref})
    else:
        assert top_person_near(got, ref, float(np.hypot(*PHOTO_SIZE))) <= tolerance


# -- the cluster --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster_run(bad_corpus, local, redis_server, s3_server, tmp_path_factory):
    """The same corpus through S3, the broker and one worker, in batches of 6 so that the bad
    files share batches with good ones."""
    redis_server.start()
    redis_server.client().flushall()
    bucket = s3_server.make_bucket(f"bad-{uuid.uuid4().hex[:12]}")
    client = s3_server.client()
    upload_tree(client, bucket, "in/", bad_corpus)
    env = {**s3_server.env(), "POSEBATCH_BROKER_URL": redis_server.url}
    worker = WorkerProcess(tmp_path_factory.mktemp("bad-worker"), env, 0)
    try:
        worker.start()
        job_id = run_cli("submit", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out/",
                         "--batch-images", "6", env=env).stdout.split()[-1]
        proc = run_cli("wait", job_id, "--timeout", "120", "--no-progress", env=env,
                       check=False, timeout=150)
        assert proc.returncode == 1, proc.stdout + proc.stderr  # done, with failed images
        results = download_results(client, bucket, "out/")
        csv = client.get_object(Bucket=bucket, Key="out/_counts.csv")["Body"].read()
        return {"results": results, "csv": csv, "log": worker_log(worker),
                "reruns": rerun_batches(redis_server.client())}
    finally:
        worker.stop()


@pytest.mark.cluster
def test_cluster_results_equal_the_local_run(cluster_run, local):
    results = cluster_run["results"]
    figures = compare_with_reference(results, cluster_run["csv"], local, local["_counts.csv"],
                                     sorted(EXPECTED))
    record_figures(f"bad input corpus ({len(EXPECTED)} files) through the cluster",
                   {**figures, "rerun_batches": cluster_run["reruns"]},
                   "pytest tests/test_bad_inputs.py::test_cluster_results_equal_the_local_run")
    assert figures["lost"] == 0 and figures["duplicated"] == 0, figures
    assert without_log_id(results) == without_log_id(
        {k: v for k, v in local.items() if k.endswith(".json")})
    assert comparable_summary(results["_summary.json"]) == comparable_summary(
        local["_summary.json"])
    assert without_versions(cluster_run["csv"]) == without_versions(local["_counts.csv"])


@pytest.mark.cluster
def test_no_bad_file_crashed_or_retried_its_batch(cluster_run):
    log = cluster_run["log"]
    batches = -(-len(EXPECTED) // 6)
    assert log.count("] succeeded in") == batches
    for word in ("raised unexpected", "retry:", "Traceback", "282000"):
        assert word not in log
