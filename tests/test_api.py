"""The Python API (issue 23): the README's example runs, ``predict_api`` equals ``run``'s JSON,
every accepted input type gives the file's answer, bad input gives the file's error codes, and
the typed result converts to supervision and back on the real package."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from posebatch import Failure, Pose, PoseResult
from posebatch.errors import BAD_FORMAT, BAD_SIZE, EMPTY_IMAGE
from posebatch.keys import result_key
from tests.devdata import require_dev_data
from tests.images import jpeg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dev_images() -> Path:
    return require_dev_data() / "images"


@pytest.fixture(scope="module")
def pose() -> Pose:
    return Pose()


@pytest.fixture(scope="module")
def run_json(dev_images, tmp_path_factory) -> dict[str, dict]:
    """What ``posebatch run`` writes for the dev images, by file name, without log_id."""
    out = tmp_path_factory.mktemp("run")
    proc = subprocess.run([sys.executable, "-m", "posebatch.cli", "run", str(dev_images),
                           "--out", str(out), "--no-progress"], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return {key: drop_log_id(json.loads((out / result_key(key)).read_text()))
            for key in listing(dev_images)}


def listing(folder: Path) -> list[str]:
    """The images of ``folder`` in the order ``run`` (and ``predict``) take them."""
    from posebatch.selection import select_keys
    from posebatch.storage import LocalStorage

    return list(select_keys(LocalStorage(str(folder))))


def dev_files(dev_images: Path) -> list[Path]:
    return [dev_images / key for key in listing(dev_images)]


def drop_log_id(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "log_id"}


def test_the_readme_example_runs(dev_images, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {"IMAGES": str(dev_images)})
    printed = capsys.readouterr().out
    assert "persons," in printed
    assert re.search(r"\(\d+, 21, 2\)", printed)  # the keypoint shapes, per image


def test_predict_api_equals_what_run_writes(pose, dev_images, run_json):
    got = [drop_log_id(r) for r in pose.predict_api(dev_images)]
    assert got == list(run_json.values())  # and in the folder's order
    sources = [r.source for r in pose.predict(dev_images)]
    assert sources == [str(p) for p in dev_files(dev_images)]


def test_predict_gives_typed_results_in_input_order(pose, dev_images, run_json):
    paths = dev_files(dev_images)[::-1]  # another order than the listing's
    results = list(pose.predict([str(p) for p in paths]))
    assert [r.source for r in results] == [str(p) for p in paths]
    for path, r in zip(paths, results, strict=True):
        assert isinstance(r, PoseResult)
        want = run_json[path.relative_to(dev_images).as_posix()]
        assert len(r) == want["person_num"]
        assert r.xy.shape == (len(r), 21, 2) and r.scores.shape == (len(r), 21)
        assert r.boxes_xyxy.shape == (len(r), 4) and r.box_scores.shape == (len(r),)
        assert r.names[0] == "top_head" and len(r.names) == 21
        assert drop_log_id(r.to_api()) == want
        with Image.open(path) as im:
            assert (r.width, r.height) in (im.size, im.size[::-1])  # EXIF may turn it


def test_every_input_type_gives_the_files_answer(pose, dev_images, run_json):
    png = next(p for p in dev_files(dev_images) if p.suffix == ".png")
    want = run_json[png.relative_to(dev_images).as_posix()]
    rgb = np.asarray(Image.open(png).convert("RGB"))
    sources = {
        "path": str(png), "pathlike": png, "bytes": png.read_bytes(),
        "array": rgb, "pil": Image.open(png),
    }
    for name, source in sources.items():
        (got,) = pose.predict_api(source)
        assert drop_log_id(got) == want, name
    (bgr,) = pose.predict_api(np.ascontiguousarray(rgb[..., ::-1]), channels="bgr")
    assert drop_log_id(bgr) == want


def test_bad_input_gets_the_error_codes_of_files(pose, tmp_path):
    small = np.zeros((10, 40, 3), np.uint8)
    cases = [
        (b"definitely not an image", BAD_FORMAT),
        (np.zeros((40, 40, 4), np.uint8), BAD_FORMAT),  # RGBA
        (np.zeros((40, 40, 3), np.float32), BAD_FORMAT),
        (np.zeros((40, 40), np.uint8), BAD_FORMAT),
        (42, BAD_FORMAT),
        (small, BAD_SIZE),
        (jpeg(40, 10), BAD_SIZE),  # the same rule as a file that small
        (str(tmp_path / "missing.jpg"), EMPTY_IMAGE),
    ]
    results = list(pose.predict([source for source, _ in cases]))
    assert len(results) == len(cases)
    for (source, code), r in zip(cases, results, strict=True):
        assert isinstance(r, Failure), (type(source), r)
        assert r.code == code, (type(source), r)
        assert r.to_api()["error_code"] == code
    with pytest.raises(ValueError, match="channels"):
        list(pose.predict(small, channels="bgra"))


def test_results_are_checked_on_creation():
    with pytest.raises(ValueError, match=r"expected kpts of shape \(1, 21, 3\), got \(1, 17, 3\)"):
        PoseResult(np.zeros((1, 17, 3)), np.zeros((1, 4)), np.zeros(1), 10, 10)
    with pytest.raises(ValueError, match="expected boxes_xyxy"):
        PoseResult(np.zeros((1, 21, 3)), np.zeros((1, 5)), np.zeros(1), 10, 10)
    with pytest.raises(ValueError, match="positive image size"):
        PoseResult.empty(0, 10)
    assert len(PoseResult.empty()) == 0 and PoseResult.empty(5, 5).to_api()["person_num"] == 0
    with pytest.raises(ValueError, match="error 216201"):
        PoseResult.from_api({"error_code": 216201, "error_msg": "x", "log_id": 1})


def test_from_api_then_to_api_gives_the_same_json(run_json):
    for name, result in run_json.items():
        again = PoseResult.from_api(result).to_api(log_id=7)
        assert drop_log_id(again) == result, name


def test_supervision_converter_round_trips_on_the_real_package(pose, dev_images):
    sv = pytest.importorskip("supervision")
    r = max((r for r in pose.predict(dev_images)), key=len)
    assert len(r) >= 2
    keypoints, detections = r.to_supervision()
    assert isinstance(keypoints, sv.KeyPoints) and isinstance(detections, sv.Detections)
    assert keypoints.xy.shape == (len(r), 21, 2) and len(detections) == len(r)
    back = PoseResult.from_supervision(keypoints, detections, r.width, r.height)
    assert back.to_api(log_id=1) == r.to_api(log_id=1)
    # supervision's own tools take them: an annotator draws on the image.
    canvas = np.zeros((r.height, r.width, 3), np.uint8)
    drawn = sv.VertexAnnotator(radius=3).annotate(canvas.copy(), keypoints)
    assert drawn.any()
    assert sv.Detections.merge([detections, detections]).xyxy.shape == (2 * len(r), 4)


def test_a_pil_image_is_turned_upright_like_a_file(pose):
    data = jpeg(80, 60, orientation=6)  # stored landscape, shown portrait
    (from_bytes,) = pose.predict(data)
    (from_pil,) = pose.predict(Image.open(io.BytesIO(data)))
    assert (from_bytes.width, from_bytes.height) == (from_pil.width, from_pil.height) == (60, 80)


def test_no_module_but_the_schema_indexes_result_dicts_by_key_name():
    """Records, exports, the report, eval, recount, overlays and serve read results through
    ``read_result`` / ``PoseResult.from_api``: one module knows how the JSON is spelled."""
    result_keys = re.compile(r"""\[["'](person_info|body_parts|location)["']\]"""
                             r"""|\.get\(["'](person_info|body_parts|location)["']""")
    shared_keys = re.compile(r"""\[["'](error_code|error_msg|person_num)["']\]"""
                             r"""|\.get\(["'](error_code|error_msg|person_num)["']""")
    # Rows of _counts.csv and the summary's failure table share the names, not the format.
    not_results = {"posebatch/aggregate.py", "posebatch/report/page.py"}
    offenders = []
    for package in ("posebatch", "workers", "producer"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "posebatch/schema.py":
                continue
            text = path.read_text()
            if result_keys.search(text) or (rel not in not_results and shared_keys.search(text)):
                offenders.append(rel)
    assert offenders == []
