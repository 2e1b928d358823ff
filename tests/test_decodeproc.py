"""Decode processes writing into shared-memory batches (workers/engine/decodeproc.py): the same
results as the thread path, no image lost when a process dies, the memory freed."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from posebatch.errors import INTERNAL_ERROR, ConfigError
from posebatch.schema import encode_result
from posebatch.settings import JobSettings, RuntimeSettings
from tests.devdata import require_dev_data, require_model
from tests.images import jpeg
from tests.test_batches import RecordingModel
from workers.engine.decodeproc import CRASH_MARK_ENV, CRASH_MESSAGE, SharedBatchPool
from workers.engine.pipeline import PoseEngine


def run(engine: PoseEngine, blobs: dict[str, bytes]) -> dict[str, dict]:
    return dict(engine.run((k, (lambda b=b: b)) for k, b in blobs.items()))


def without_log_id(result: dict) -> bytes:
    return encode_result({k: v for k, v in result.items() if k != "log_id"})


def test_processes_give_the_thread_paths_bytes_on_the_dev_set():
    from workers.loading import open_model

    dev = require_dev_data()
    model = open_model(RuntimeSettings(model=str(require_model()), backend="ort",
                                       precision="fp32", providers="cpu"))
    files = sorted(p for p in (dev / "images").rglob("*") if p.is_file())
    assert files
    blobs = {str(p.relative_to(dev)): p.read_bytes() for p in files}
    # Bad images between good ones: in the processes they leave holes in their batches.
    blobs = {"bad": b"not an image", **dict(list(blobs.items())[:5]), "empty": b"",
             "tiny": jpeg(8, 8), "rotated": jpeg(160, 96, orientation=6),
             **dict(list(blobs.items())[5:])}
    out = {}
    for workers in (0, 2):
        engine = PoseEngine(model, JobSettings(), batch_size=4, io_threads=2,
                            decode_workers=workers)
        out[workers] = {k: without_log_id(r) for k, r in run(engine, blobs).items()}
        assert (engine._procs is not None) == (workers > 0)
        engine.close()
    assert out[2] == out[0]
    assert sum(b'"person_num":0' not in v for v in out[0].values()) >= 3  # persons were found


def test_a_crashing_decode_process_loses_no_image_and_is_replaced(monkeypatch):
    monkeypatch.setenv(CRASH_MARK_ENV, "POSEBATCH-CRASH-HERE")
    model = RecordingModel()
    engine = PoseEngine(model, JobSettings(imgsz=64), batch_size=3, io_threads=2,
                        decode_workers=2)
    blobs = {f"k{i}": jpeg(96 + i, 64) for i in range(7)}
    blobs["k3"] = blobs["k3"] + b"POSEBATCH-CRASH-HERE"  # after the end of the JPEG
    try:
        out = run(engine, blobs)
        assert sorted(out) == sorted(blobs)
        assert out["k3"]["error_code"] == INTERNAL_ERROR
        assert out["k3"]["error_msg"] == CRASH_MESSAGE
        assert all(out[k]["person_num"] == 0 for k in blobs if k != "k3")
        procs = engine.procs()
        assert procs.restarts == 2 and len(procs.pids()) == 2  # retried once, both replaced
        assert sum(len(c) for c in model.calls) == 6  # the hole is not run

        # A process killed while idle (the OOM killer): its next image is retried elsewhere.
        os.kill(procs.pids()[0], signal.SIGKILL)
        del blobs["k3"]
        again = run(engine, blobs)
        assert sorted(again) == sorted(blobs)
        assert all(r["person_num"] == 0 for r in again.values())
        assert procs.restarts == 3
    finally:
        engine.close()


def test_shapes_known_only_after_decoding_go_through_the_threads():
    engine = PoseEngine(RecordingModel(), JobSettings(imgsz=64, rect=True), batch_size=2,
                        io_threads=2, decode_workers=2)
    out = run(engine, {"a": jpeg(96, 64), "b": jpeg(64, 96)})
    assert sorted(out) == ["a", "b"] and engine._procs is None
    engine.close()


def test_the_shared_batches_are_freed_on_close():
    pool = SharedBatchPool(2, np.uint8)
    batch, _slot = pool.claim((32, 32))
    name = pool.segment(batch)
    assert Path("/dev/shm", name).exists()
    pool.close()
    assert not Path("/dev/shm", name).exists()


@pytest.mark.parametrize("value", [-1, 65])
def test_decode_workers_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match="decode_workers: expected 0"):
        RuntimeSettings(decode_workers=value)


def test_posebatch_run_with_decode_processes_writes_the_thread_runs_files(tmp_path):
    import json
    import subprocess
    import sys

    require_model()
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for i in range(5):
        (src / f"img{i}.jpg").write_bytes(jpeg(160 + 16 * i, 96))
    (src / "sub" / "broken.jpg").write_bytes(jpeg(160, 96)[:300])
    outs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"out{workers}"
        proc = subprocess.run([sys.executable, "-m", "posebatch.cli", "run", str(src), "--out",
                               str(out), "--backend", "ort", "--no-progress",
                               "--decode-workers", workers], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        outs[workers] = {p.relative_to(out).as_posix(): without_log_id(json.loads(p.read_bytes()))
                         for p in out.rglob("*.jpg.json")}
    assert len(outs["0"]) == 6 and outs["2"] == outs["0"]
    assert b"error_code" in outs["2"]["sub/broken.jpg.json"]


def test_too_little_shared_memory_is_a_config_error_that_says_what_to_do(monkeypatch):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    pool = SharedBatchPool(2, np.uint8)
    with pytest.raises(ConfigError, match=r"--shm-size=1g.*--decode-workers 0"):
        pool.claim((32, 32))
    assert not pool._segments
    pool.close()


def test_a_hanging_decode_process_is_killed_and_its_image_gets_an_error(monkeypatch):
    import workers.engine.decodeproc as decodeproc

    monkeypatch.setenv(decodeproc.HANG_MARK_ENV, "POSEBATCH-HANG-HERE")
    monkeypatch.setattr(decodeproc, "DECODE_TIMEOUT_S", 1.0)
    engine = PoseEngine(RecordingModel(), JobSettings(imgsz=64), batch_size=2, io_threads=2,
                        decode_workers=2)
    blobs = {f"k{i}": jpeg(96, 64) for i in range(4)}
    blobs["k1"] = blobs["k1"] + b"POSEBATCH-HANG-HERE"
    try:
        out = run(engine, blobs)
        assert sorted(out) == sorted(blobs)
        assert out["k1"]["error_msg"] == CRASH_MESSAGE
        assert all(out[k]["person_num"] == 0 for k in blobs if k != "k1")
        assert engine.procs().restarts == 2
    finally:
        engine.close()
