"""``posebatch run`` and ``posebatch eval`` end to end, as a user runs them (subprocesses)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.devdata import require_dev_data
from tests.images import encode, gradient, jpeg

CLI = [sys.executable, "-m", "posebatch.cli"]
# Floors measured on the dev set (README): a broken mapping, a swapped left/right or a wrong
# letterbox inverse drops AP to near 0 and the shares far below these.
AP_FLOOR = 0.20
SHOULDER_10PCT_FLOOR = 0.35


def posebatch(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"posebatch {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def dev_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    dev = require_dev_data()
    src = tmp_path_factory.mktemp("in")
    shutil.copytree(dev / "images", src, dirs_exist_ok=True)
    # Bad files mixed in: each must get an error result, none may stop the run.
    (src / "bad").mkdir()
    (src / "bad" / "empty.jpg").write_bytes(b"")
    (src / "bad" / "tiny.png").write_bytes(encode(gradient(10, 10), "PNG"))
    (src / "bad" / "fake.jpg").write_bytes(b"not an image at all" * 20)
    (src / "bad" / "anim.gif").write_bytes(encode(gradient(40, 30, "P"), "GIF"))
    (src / "bad" / "notes.txt").write_text("not an image name: ignored")
    (src / "ok").mkdir()
    (src / "ok" / "plain gradient ü.bmp").write_bytes(encode(gradient(64, 48), "BMP"))
    (src / "ok" / "rot.jpg").write_bytes(jpeg(64, 48, orientation=6))
    out = tmp_path_factory.mktemp("out")
    proc = posebatch("run", str(src), "--out", str(out), "--no-progress")
    assert "images" in proc.stdout
    return dev, src, out


def test_run_writes_one_result_per_image_with_relative_names(dev_run):
    dev, src, out = dev_run
    images = sorted(p.relative_to(src).as_posix() for p in src.rglob("*")
                    if p.is_file() and p.suffix != ".txt")
    results = sorted(p.relative_to(out).as_posix()[: -len(".json")] for p in out.rglob("*.json")
                     if not p.name.startswith("_"))
    assert results == images
    assert not (out / "bad" / "notes.txt.json").exists()


@pytest.mark.parametrize(("name", "code"), [("bad/empty.jpg", 216200), ("bad/tiny.png", 216202),
                                            ("bad/fake.jpg", 216201), ("bad/anim.gif", 216201)])
def test_bad_files_get_error_results(dev_run, name, code):
    _, _, out = dev_run
    result = json.loads((out / (name + ".json")).read_text())
    assert result["error_code"] == code and result["error_msg"]
    assert set(result) == {"error_code", "error_msg", "log_id"}


def test_summary_and_counts_agree_with_the_results(dev_run):
    _, src, out = dev_run
    summary = json.loads((out / "_summary.json").read_text())
    per_image = {p.relative_to(out).as_posix()[:-5]: json.loads(p.read_text())
                 for p in out.rglob("*.json") if not p.name.startswith("_")}
    assert summary["images_seen"] == len(per_image) == 19
    assert summary["failed"] == 4
    assert summary["failed_by_code"] == {"216200": 1, "216201": 2, "216202": 1}
    reasons = {(r["error_code"], r["example"]) for r in summary["failure_reasons"]}
    assert reasons == {(216200, "bad/empty.jpg"), (216201, "bad/fake.jpg"),
                       (216201, "bad/anim.gif"), (216202, "bad/tiny.png")}
    assert sum(r["images"] for r in summary["failure_reasons"]) == summary["failed"]
    assert summary["persons_total"] == sum(r.get("person_num", 0) for r in per_image.values())
    assert sum(summary["valid_persons_histogram"].values()) == summary["succeeded"]
    with open(out / "_counts.csv", encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["key"] for r in rows] == sorted(per_image)
    assert sum(int(r["valid_persons"]) for r in rows) == summary["valid_persons_total"]
    log_ids = [r["log_id"] for r in per_image.values()]
    assert len(set(log_ids)) == len(log_ids)


def test_eval_on_the_dev_set_clears_the_accuracy_floor(dev_run, tmp_path):
    dev, _, out = dev_run
    metrics = tmp_path / "m.json"
    proc = posebatch("eval", "--gt", str(dev / "annotations.json"), "--pred", str(out),
                     "--json", str(metrics))
    assert "OKS AP" in proc.stdout
    m = json.loads(metrics.read_text())
    assert m["AP"] >= AP_FLOOR, m["AP"]
    for side in ("left_shoulder", "right_shoulder"):
        assert m["per_keypoint"][side]["within_10pct"] >= SHOULDER_10PCT_FLOOR


def test_rerun_skips_done_images_and_force_redoes_them(dev_run):
    _, src, out = dev_run
    before = (out / "ok" / "rot.jpg.json").read_text()
    summary_before = json.loads((out / "_summary.json").read_text())
    posebatch("run", str(src), "--out", str(out), "--no-progress")
    assert (out / "ok" / "rot.jpg.json").read_text() == before  # same log_id: not redone
    summary = json.loads((out / "_summary.json").read_text())
    for key in ("images_seen", "succeeded", "failed_by_code", "valid_persons_histogram"):
        assert summary[key] == summary_before[key]
    posebatch("run", str(src), "--out", str(out), "--no-progress", "--force")
    again = json.loads((out / "ok" / "rot.jpg.json").read_text())
    assert again["log_id"] != json.loads(before)["log_id"]
    assert json.loads((out / "_summary.json").read_text())["images_seen"] == 19


def test_other_settings_into_the_same_output_are_refused(dev_run):
    _, src, out = dev_run
    proc = posebatch("run", str(src), "--out", str(out), "--det-conf", "0.5", check=False)
    assert proc.returncode == 3
    assert "--force" in proc.stderr


def test_missing_input_folder_is_a_clear_error(tmp_path):
    proc = posebatch("run", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), check=False)
    assert proc.returncode != 0
    assert "nope" in proc.stderr


def test_model_info_prints_the_model_path_last():
    proc = posebatch("model", "info")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.endswith(".onnx") and Path(last).is_file()
