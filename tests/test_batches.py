"""Batch tensors that decode threads fill directly (workers/engine/batches.py) and the engine
that consumes them in another order than they are filled."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from posebatch.settings import JobSettings
from tests.images import jpeg
from workers.engine.batches import BatchPool
from workers.engine.layouts import Detections
from workers.engine.letterbox import fit, letterbox, to_input_tensor, write_input
from workers.engine.pipeline import PoseEngine


def test_claims_fill_one_batch_per_shape_then_start_the_next():
    pool = BatchPool(2)
    a0, s0 = pool.claim((64, 64))
    a1, s1 = pool.claim((64, 64))
    other, t0 = pool.claim((32, 64))
    b0, u0 = pool.claim((64, 64))
    assert (a0 is a1, s0, s1) == (True, 0, 1)
    assert other is not a0 and t0 == 0 and other.array.shape == (2, 3, 32, 64)
    assert b0 is not a0 and u0 == 0


def test_a_released_batch_lends_its_memory_to_the_next_one_of_its_shape():
    pool = BatchPool(1)
    first, _ = pool.claim((64, 64))
    pool.release(first)
    again, _ = pool.claim((64, 64))
    assert again is not first and again.array is first.array
    assert pool.claim((32, 32))[0].array is not first.array


@pytest.mark.parametrize("claimed,seen,final,ready", [
    (2, 2, False, True),   # full and every image seen by the caller
    (2, 1, False, False),  # full, one image not yet seen: its slot may still be being written
    (1, 1, False, False),  # more images may still claim the second slot
    (1, 1, True, True),    # no more images coming
    (0, 0, True, False),   # nothing to run
])
def test_a_batch_is_ready_when_claimed_and_seen(claimed, seen, final, ready):
    pool = BatchPool(2)
    batch = None
    for _ in range(claimed):
        batch, _slot = pool.claim((8, 8))
    if batch is None:
        batch = pool.claim((8, 8))[0]
        batch.claimed = 0
    batch.seen.extend(range(seen))
    assert batch.ready(final=final) is ready


def test_writing_into_a_slot_gives_the_letterboxed_tensor():
    rgb = np.random.default_rng(0).integers(0, 255, (90, 160, 3), np.uint8)
    slot = np.full((3, 128, 128), -1.0, np.float32)  # stale values must all be overwritten
    resized, box = fit(rgb, (128, 128))
    write_input(resized, box, slot)
    canvas, box2 = letterbox(rgb, (128, 128))
    assert box == box2
    np.testing.assert_allclose(slot, to_input_tensor(canvas), atol=1e-6)
    with pytest.raises(ValueError, match=r"expected an input slot of shape \(3, 128, 128\)"):
        write_input(resized, box, np.empty((3, 64, 128), np.float32))


class RecordingModel:
    """Counts images per model call and returns no persons; no runtime involved."""

    class info:  # noqa: N801 - the attributes the engine reads from a runner's ModelInfo
        fixed_hw = None
        fixed_batch = None

    on_cuda = False
    wants_fixed_batches = False

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    def infer(self, batch, conf, iou, max_det):
        self.calls.append(batch.copy())
        empty = Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                           np.zeros((0, 17, 3), np.float32))
        return [empty] * len(batch)


def test_images_decoded_out_of_order_still_form_full_batches_and_none_is_lost():
    # The first image's loader is slow: the next ones claim slots before it does, and the
    # engine, which reads results in submission order, must still run every batch once.
    model = RecordingModel()
    engine = PoseEngine(model, JobSettings(imgsz=64), batch_size=3, io_threads=3)
    blobs = {f"k{i}": jpeg(96 + i, 64) for i in range(8)}
    gate = threading.Event()

    def loader(key: str):
        def load() -> bytes:
            if key == "k0":
                gate.wait(5)
            elif key == "k3":
                gate.set()
            time.sleep(0.01)
            return blobs[key]
        return load

    out = dict(engine.run((k, loader(k)) for k in blobs))
    assert sorted(out) == sorted(blobs)
    assert all(r["person_num"] == 0 for r in out.values())
    assert sorted(len(c) for c in model.calls) == [2, 3, 3]
    assert all(c.shape[1:] == (3, 64, 64) and np.isfinite(c).all() for c in model.calls)


def test_an_engine_keeps_its_threads_and_batch_memory_from_run_to_run():
    # A worker runs one engine for all its batch tasks (workers.state.engine): the second run
    # must reuse the decode and writer threads and the batch arrays of the first.
    model = RecordingModel()
    engine = PoseEngine(model, JobSettings(imgsz=64), batch_size=2, io_threads=2)
    blobs = {f"k{i}": jpeg(96, 64) for i in range(4)}
    assert len(dict(engine.run((k, (lambda b=b: b)) for k, b in blobs.items()))) == 4
    decoders, writers = engine.decoders(), engine.writers()
    arrays = {id(a) for free in engine._pool._free.values() for a in free}
    assert len(dict(engine.run((k, (lambda b=b: b)) for k, b in blobs.items()))) == 4
    assert engine.decoders() is decoders and engine.writers() is writers
    assert arrays <= {id(a) for free in engine._pool._free.values() for a in free}


def test_a_run_left_early_leaves_the_engine_clean_for_the_next():
    model = RecordingModel()
    engine = PoseEngine(model, JobSettings(imgsz=64), batch_size=3, io_threads=2)
    blobs = {f"k{i}": jpeg(96 + i, 64) for i in range(7)}
    run = engine.run((k, (lambda b=b: b)) for k, b in blobs.items())
    next(run)
    run.close()  # e.g. a write error: the caller stops reading mid-batch
    assert not engine._pool._filling
    model.calls.clear()
    out = dict(engine.run((k, (lambda b=b: b)) for k, b in blobs.items()))
    assert sorted(out) == sorted(blobs)
    assert sorted(len(c) for c in model.calls) == [1, 3, 3]
