"""The I/O-binding path of the GPU worker, run on the CPU: same outputs as ``session.run``, the
same buffers on every call of a shape, results that survive the next call, and the fixed-shape
session (the one that gets a CUDA graph on CUDA) used for the first shape only."""

from __future__ import annotations

import numpy as np
import pytest

from posebatch.modelstore import resolve_model
from posebatch.settings import RuntimeSettings, from_env
from workers.engine.binding import BoundRunner
from workers.engine.runner import PoseModel

SHAPE = (2, 3, 256, 320)


@pytest.fixture(scope="module")
def model_path() -> str:
    rt = from_env(RuntimeSettings)
    return str(resolve_model(rt.model, rt.cache_dir).path)


@pytest.fixture(scope="module")
def plain(model_path: str) -> PoseModel:
    return PoseModel(model_path, "cpu", 1)


def batch(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_bound_runner_reuses_its_buffers_and_matches_session_run(plain):
    shape = plain.as_input(batch(1)).shape  # the session's input (uint8: folded)
    runner = BoundRunner(plain.session, plain.info.input_name, shape, "cpu")
    first = runner.run(plain.as_input(batch(1)))
    addresses = runner.buffer_addresses()
    second = runner.run(plain.as_input(batch(2)))
    third = runner.run(plain.as_input(batch(3)))
    assert runner.buffer_addresses() == addresses
    assert len(addresses) == 1 + len(plain.session.get_outputs())  # input, every output
    # Each result is its own array: the next call must not overwrite what the caller holds.
    for x, got in ((1, first), (2, second), (3, third)):
        np.testing.assert_array_equal(got[0], plain.run_raw(batch(x))[0])
    with pytest.raises(ValueError, match="bound shape"):
        runner.run(plain.as_input(batch(4, (1, *SHAPE[1:]))))


def test_pose_model_binding_path_with_fixed_shape_session(model_path, plain):
    bound = PoseModel(model_path, "cpu", 1, io_binding=True, fixed_shape_session=True)
    other = (1, *SHAPE[1:])  # a partial batch: not the fixed shape
    for seed, shape in ((1, SHAPE), (2, other), (3, SHAPE), (4, other)):
        np.testing.assert_allclose(bound.run_raw(batch(seed, shape))[0],
                                   plain.run_raw(batch(seed, shape))[0], rtol=1e-5, atol=1e-3)
    taken = bound.as_input(batch(1)).shape  # what the graph takes
    assert bound._fixed is not None and bound._fixed.shape == taken
    assert bound._fixed.calls == 2  # both full batches went through the fixed-shape session
    assert bound._fixed.session is not bound.session
    assert list(bound._bound) == [(1, *taken[1:])]  # the partial batch: on the main session
    # Detections decoded from the bound path equal the plain path's.
    x = batch(5)
    for a, b in zip(bound.infer(x, 0.05, 0.6, 100), plain.infer(x, 0.05, 0.6, 100), strict=True):
        np.testing.assert_allclose(a.kpts, b.kpts, atol=1e-3)


def test_bound_shapes_are_capped(model_path):
    bound = PoseModel(model_path, "cpu", 1, io_binding=True, fixed_shape_session=False)
    for h in range(64, 64 + 32 * (PoseModel.MAX_BOUND_SHAPES + 2), 32):
        bound.run_raw(batch(h, (1, 3, h, 64)))
    assert len(bound._bound) == PoseModel.MAX_BOUND_SHAPES
    assert bound._fixed is None


def test_a_fixed_shape_session_failing_early_is_dropped(model_path, plain, monkeypatch):
    bound = PoseModel(model_path, "cpu", 1, io_binding=True, fixed_shape_session=True)
    bound.run_raw(batch(1))
    assert bound._fixed is not None

    def capture_fails(_batch):
        raise RuntimeError("graph capture failed")

    monkeypatch.setattr(bound._fixed, "run", capture_fails)
    got = bound.run_raw(batch(2))  # the fixed session fails on its second call
    np.testing.assert_allclose(got[0], plain.run_raw(batch(2))[0], rtol=1e-5, atol=1e-3)
    assert bound._fixed is None and list(bound._bound) == [bound.as_input(batch(2)).shape]
