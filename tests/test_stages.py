"""Stage timers: every run says where its time went (issue 20)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tests import onnx_graphs as G
from workers.engine.stages import MODEL_THREAD, STAGES, StageTimer, summary

CLI = [sys.executable, "-m", "posebatch.cli"]


def jpeg(w: int, h: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_run_logs_every_stage_with_the_images_it_timed(tmp_path: Path):
    model = G.yolo_raw(tmp_path / "m.onnx", np.array([[100.0, 100.0, 50.0, 80.0]]),
                       np.array([0.9]), np.full((1, 17, 3), 50.0))
    src = tmp_path / "in"
    src.mkdir()
    for i in range(9):
        (src / f"{i}.jpg").write_bytes(jpeg(320, 180, i))
    (src / "bad.jpg").write_bytes(b"not an image")
    proc = subprocess.run([*CLI, "-vv", "run", str(src), "--out", str(tmp_path / "out"),
                           "--model", str(model), "--backend", "ort", "--no-progress",
                           "--batch-size", "4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.findall(r"stages: (\{.*\})", proc.stderr)
    assert len(found) == 1, proc.stderr[-3000:]
    s = json.loads(found[0])
    assert s["images"] == 9 and s["batches"] == 3  # the unreadable file never reaches the model
    assert set(s["seconds"]) == set(STAGES)
    for stage in ("fetch", "decode", "copy_in", "infer", "post", "encode", "write", "hand_on"):
        assert s["seconds"][stage] > 0, stage
    assert s["seconds"]["copy_out"] == 0  # no I/O binding on the CPU
    assert s["model_thread_ms_per_image"] == round(
        1000 * sum(s["seconds"][k] for k in MODEL_THREAD) / 9, 4)
    assert s["model_thread_cpu"] > 0


def test_since_is_one_tasks_share():
    timer = StageTimer()
    timer.add("decode", 1.0)
    timer.add_batch(4, infer=0.5, post=0.25, cpu=0.5)
    before = timer.snapshot()
    timer.add("decode", 2.0)
    timer.add_batch(2, infer=1.0, post=0.5, cpu=1.0)
    delta = timer.since(before)
    assert delta["images"] == 2 and delta["batches"] == 1
    assert delta["seconds"]["decode"] == 2.0 and delta["seconds"]["infer"] == 1.0
    assert delta["model_thread_cpu"] == 1.0
    assert summary(delta)["model_thread_ms_per_image"] == 750.0
