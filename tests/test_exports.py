"""``posebatch export``, each format read back by its consumer's own code, not by a schema.

COCO: pycocotools and ``posebatch eval``; YOLO: Ultralytics' label verifier (build environment);
CVAT: Datumaro's CVAT importer; Label Studio: its SDK's validator and converter. Every check also
compares coordinates with the per-image results (0.01 px, or 0.01 % for percent formats).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from posebatch.exports.skeleton import NAMES, flip_idx
from posebatch.keys import is_image_key
from posebatch.settings import JobSettings
from tests.devdata import require_dev_data
from tests.exporthelpers import (
    PCT_TOL,
    PX_TOL,
    REPO,
    build_python,
    counts,
    is_valid_person,
    ok_results,
    posebatch,
)
from tests.images import jpeg

THRESHOLD = JobSettings().valid_kpt_score  # the export's default visibility threshold


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The dev set under a folder named ``images`` (keys like ``images/mhp/1.jpg``: Ultralytics
    maps labels by the last ``/images/``), an EXIF-rotated photo and a broken file."""
    src = tmp_path_factory.mktemp("in")
    shutil.copytree(require_dev_data() / "images", src / "images")
    (src / "rot.jpg").write_bytes(jpeg(64, 48, orientation=6))
    (src / "broken.jpg").write_bytes(b"not an image" * 20)
    out = tmp_path_factory.mktemp("out")
    posebatch("run", src, "--out", out, "--no-progress", "--overlays")
    return src, out


def visible(part: dict) -> bool:
    return part["score"] >= THRESHOLD


def test_counts_record_upright_sizes_and_results_keep_only_spec_fields(job):
    src, out = job
    rows = {r["key"]: r for r in counts(out)}
    for key, row in rows.items():
        if row["status"] != "ok":
            assert row["width"] == row["height"] == ""
            continue
        with Image.open(src / key) as im:
            upright = ImageOps.exif_transpose(im).size
        assert (int(row["width"]), int(row["height"])) == upright, key
        result = json.loads((out / (key + ".json")).read_text())
        assert set(result) == {"person_num", "person_info", "log_id"}
    assert (rows["rot.jpg"]["width"], rows["rot.jpg"]["height"]) == ("48", "64")
    assert rows["broken.jpg"]["status"] == "error"


def test_overlays_sit_beside_results_and_are_never_taken_for_input(job):
    src, out = job
    for key in ok_results(out):
        over = out / (key + ".overlay.jpg")
        with Image.open(over) as im, Image.open(src / key) as orig:
            w, h = ImageOps.exif_transpose(orig).size
            assert im.format == "JPEG"
            assert abs(im.size[0] / im.size[1] - w / h) < 0.02  # a reduced decode keeps shape
    assert not is_image_key("a/b.jpg.overlay.jpg") and is_image_key("a/b.overlay.png")


def test_rerun_that_skips_every_image_keeps_the_sizes(job, tmp_path):
    src, out = job
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    posebatch("run", src, "--out", copy, "--no-progress")  # all skipped: no size decoded
    assert counts(copy) == counts(out)


def test_coco_export_is_read_by_pycocotools_and_scores_ap_1_against_itself(job, tmp_path):
    from pycocotools.coco import COCO

    _, out = job
    dest = tmp_path / "coco"
    posebatch("export", out, "--format", "coco", "--to", dest, "--all-persons")
    coco = COCO(str(dest / "annotations.json"))
    (cat,) = coco.loadCats(coco.getCatIds())
    assert cat["keypoints"] == list(NAMES)
    assert all(1 <= i <= 21 for limb in cat["skeleton"] for i in limb)
    results = ok_results(out)
    sizes = {r["key"]: (int(r["width"]), int(r["height"])) for r in counts(out) if r["width"]}
    assert sorted(img["file_name"] for img in coco.dataset["images"]) == sorted(results)
    checked = 0
    for img in coco.dataset["images"]:
        assert (img["width"], img["height"]) == sizes[img["file_name"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        persons = results[img["file_name"]]["person_info"]
        assert len(anns) == len(persons)
        for ann, person in zip(anns, persons, strict=True):
            kps = ann["keypoints"]
            for i, name in enumerate(NAMES):
                part = person["body_parts"][name]
                x, y, v = kps[3 * i: 3 * i + 3]
                assert ann["keypoint_scores"][i] == part["score"]
                if visible(part):
                    assert v == 2 and abs(x - part["x"]) <= PX_TOL and abs(y - part["y"]) <= PX_TOL
                    checked += 1
                else:
                    assert (x, y, v) == (0, 0, 0)
            assert ann["num_keypoints"] == sum(visible(p) for p in person["body_parts"].values())
            loc = person["location"]
            assert ann["bbox"] == [loc["left"], loc["top"], loc["width"], loc["height"]]
    assert checked > 100
    metrics = tmp_path / "m.json"
    posebatch("eval", "--gt", dest / "annotations.json", "--pred", out, "--max-dets", "100",
              "--json", metrics)
    m = json.loads(metrics.read_text())
    assert m["AP"] == pytest.approx(1.0) and m["AR"] == pytest.approx(1.0)


def test_coco_export_keeps_only_valid_persons_by_default(job, tmp_path):
    _, out = job
    dest = tmp_path / "coco"
    posebatch("export", out, "--format", "coco", "--to", dest)
    data = json.loads((dest / "annotations.json").read_text())
    job_settings = JobSettings()
    want = sum(is_valid_person(p, job_settings)
               for r in ok_results(out).values() for p in r["person_info"])
    assert len(data["annotations"]) == want
    assert want < sum(r["person_num"] for r in ok_results(out).values())  # some were dropped


def test_yolo_export_passes_ultralytics_own_verifier(job, tmp_path):
    python = build_python()
    _, out = job
    dest = tmp_path / "yolo"
    posebatch("export", out, "--format", "yolo", "--to", dest, "--val-fraction", "0.3")
    proc = subprocess.run([python, str(REPO / "tests" / "yolo_verify.py"),
                           str(dest / "data.yaml")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["kpt_shape"] == [21, 3] and report["flip_idx"] == flip_idx()
    assert report["names"] in ({"0": "person"}, {0: "person"}) and report["nc"] == 1
    rows = report["splits"]["train"] + report["splits"]["val"]
    assert report["splits"]["train"] and report["splits"]["val"]  # both splits got images
    results = ok_results(out)
    assert sorted(r["image"] for r in rows) == sorted(results)
    checked = 0
    for row in rows:
        assert row["corrupt"] == 0 and row["found"] == 1, row["msg"]
        h, w = row["shape"]  # Ultralytics' own reading of the (EXIF-upright) image size
        persons = results[row["image"]]["person_info"]
        valid = [p for p in persons if is_valid_person(p, JobSettings())]
        assert len(row["keypoints"]) == len(valid)
        for kpts, person in zip(row["keypoints"], valid, strict=True):
            for (x, y, v), name in zip(kpts, NAMES, strict=True):
                part = person["body_parts"][name]
                if visible(part):
                    assert v == 2 and abs(x * w - part["x"]) <= PX_TOL
                    assert abs(y * h - part["y"]) <= PX_TOL
                    checked += 1
                else:
                    assert (x, y, v) == (0, 0, 0)
    assert checked > 100
    assert (dest / "labels" / "train").is_dir() or (dest / "images" / "val").is_dir()


def test_cvat_export_is_imported_by_datumaro(job, tmp_path):
    import datumaro as dm
    from defusedxml import ElementTree

    _, out = job
    dest = tmp_path / "cvat"
    posebatch("export", out, "--format", "cvat", "--to", dest)
    dataset = dm.Dataset.import_from(str(dest), "cvat")
    labels = dataset.categories()[dm.AnnotationType.label]
    names = [labels[i].name for i in range(len(labels))]
    assert names[0] == "person" and names[1:] == list(NAMES)
    rows = [r for r in counts(out) if r["status"] == "ok"]
    results = ok_results(out)
    items = sorted(dataset, key=lambda it: it.attributes["frame"])
    assert len(items) == len(rows)
    checked = 0
    for item, row in zip(items, rows, strict=True):
        assert item.media.size == (int(row["height"]), int(row["width"]))
        points = [a for a in item.annotations if a.type == dm.AnnotationType.points]
        persons = [p for p in results[row["key"]]["person_info"]
                   if is_valid_person(p, JobSettings())]
        assert len(points) == 21 * len(persons)
        for i, person in enumerate(persons):
            for j, name in enumerate(NAMES):
                ann = points[21 * i + j]
                part = person["body_parts"][name]
                assert names[ann.label] == name
                assert abs(ann.points[0] - part["x"]) <= PX_TOL
                assert abs(ann.points[1] - part["y"]) <= PX_TOL
                checked += 1
    assert checked > 100
    # Datumaro's importer drops `outside` for image shapes; read it back from the XML itself.
    root = ElementTree.parse(dest / "annotations.xml").getroot()
    for image, row in zip(root.iter("image"), rows, strict=True):
        persons = [p for p in results[row["key"]]["person_info"]
                   if is_valid_person(p, JobSettings())]
        for skel, person in zip(image.iter("skeleton"), persons, strict=True):
            for pt in skel.iter("points"):
                want = "0" if visible(person["body_parts"][pt.get("label")]) else "1"
                assert pt.get("outside") == want
    labels_json = json.loads((dest / "cvat_labels.json").read_text())
    assert [s["name"] for s in labels_json[0]["sublabels"]] == list(NAMES)


def test_labelstudio_export_validates_and_converts_with_the_sdk(job, tmp_path):
    from label_studio_sdk.converter import Converter
    from label_studio_sdk.label_interface import LabelInterface

    _, out = job
    dest = tmp_path / "ls"
    posebatch("export", out, "--format", "labelstudio", "--to", dest)
    config = (dest / "labeling_config.xml").read_text()
    tasks = json.loads((dest / "tasks.json").read_text())
    interface = LabelInterface(config)
    for task in tasks:
        (pred,) = task["predictions"]
        assert interface.validate_prediction(pred, return_errors=True) == []
    # An annotator accepts every prediction; Label Studio's converter turns them into YOLO rows.
    accepted = [{**t, "id": i, "annotations": [{"id": i, "result": t["predictions"][0]["result"]}]}
                for i, t in enumerate(tasks)]
    (tmp_path / "accepted.json").write_text(json.dumps(accepted))
    conv = Converter(config, project_dir=str(tmp_path), download_resources=False)
    conv.convert_to_yolo(str(tmp_path / "accepted.json"), str(tmp_path / "ls-yolo"), is_dir=False)
    results = ok_results(out)
    checked = 0
    for task in tasks:
        key = task["data"]["posebatch_key"]
        assert task["data"]["image"].endswith("/" + key)
        label = tmp_path / "ls-yolo" / "labels" / (Path(key).stem + ".txt")
        lines = [ln.split() for ln in label.read_text().splitlines() if ln.strip()]
        persons = [p for p in results[key]["person_info"] if is_valid_person(p, JobSettings())]
        assert len(lines) == len(persons)
        for line, person in zip(lines, persons, strict=True):
            vals = [float(v) for v in line[5:]]
            region = task["predictions"][0]["result"][0]
            w, h = region["original_width"], region["original_height"]
            for j, name in enumerate(NAMES):
                x, y, v = vals[3 * j: 3 * j + 3]
                part = person["body_parts"][name]
                if visible(part):
                    assert v == 2
                    assert abs(100 * x - 100 * part["x"] / w) <= PCT_TOL
                    assert abs(100 * y - 100 * part["y"] / h) <= PCT_TOL
                    checked += 1
                else:
                    assert v == 0
    assert checked > 100


def test_export_refuses_a_non_empty_destination_and_an_unfinished_output(job, tmp_path):
    _, out = job
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    proc = posebatch("export", out, "--format", "coco", "--to", dest, check=False)
    assert proc.returncode == 3 and "--force" in proc.stderr
    proc = posebatch("export", tmp_path / "nothing", "--format", "coco", "--to", tmp_path / "e",
                     check=False)
    assert proc.returncode == 3 and "_summary.json" in proc.stderr
