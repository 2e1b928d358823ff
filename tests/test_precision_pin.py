"""A job says which precision and backend made its numbers, and can pin them (issue 21,
"reproducible results across hosts"): local runs here, the cluster in tests/test_cluster.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posebatch.manifest import MANIFEST_NAME
from posebatch.settings import JobSettings, RuntimeSettings
from posebatch.testing.cluster import run_cli
from tests.images import jpeg

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for i in range(3):
        (src / f"im{i}.jpg").write_bytes(jpeg(96 + 16 * i, 80))
    return src


def run(images: Path, out: Path, *flags: str, check: bool = True):
    return run_cli("run", str(images), "--out", str(out), "--no-progress", *flags, env={},
                   check=check)


def test_a_pinned_run_writes_its_runner_to_manifest_and_summary(images, tmp_path):
    for flags, label in [(("--precision", "fp32", "--backend", "ort"), "ort fp32 cpu"),
                         (("--precision", "fp32", "--backend", "openvino"),
                          "openvino fp32 cpu")]:
        out = tmp_path / flags[-1]
        run(images, out, *flags)
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        summary = json.loads((out / "_summary.json").read_text())
        assert manifest["runner"] == label
        assert manifest["settings"]["precision"] == "fp32"
        assert manifest["settings"]["backend"] == flags[-1]
        assert summary["runners"] == [label]
        assert summary["settings"]["backend"] == flags[-1]


def test_another_pin_into_the_same_output_is_refused(images, tmp_path):
    run(images, tmp_path, "--precision", "fp32", "--backend", "ort")
    proc = run(images, tmp_path, "--precision", "bf16", "--backend", "openvino", check=False)
    assert proc.returncode == 3, proc.stderr
    assert "settings" in proc.stderr


def test_an_output_from_before_the_pins_is_taken_as_auto(images, tmp_path):
    run(images, tmp_path)
    path = tmp_path / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for name in ("precision", "backend"):
        assert manifest["settings"].pop(name) == "auto"
    del manifest["runner"]
    path.write_text(json.dumps(manifest))
    assert run(images, tmp_path).returncode == 0


def test_pins_override_the_workers_runtime_and_auto_keeps_it():
    rt = RuntimeSettings(precision="bf16", backend="openvino")
    assert JobSettings().pinned_runtime(rt) is rt
    pinned = JobSettings(precision="fp32", backend="ort").pinned_runtime(rt)
    assert (pinned.precision, pinned.backend) == ("fp32", "ort")
    with pytest.raises(Exception, match="precision"):
        JobSettings(precision="int4")
