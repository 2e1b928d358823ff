"""I/O binding: one input shape's buffers allocated once on the device and reused by every call.

Why: without binding, ONNX Runtime copies each batch into a fresh device buffer and each output
into a fresh host array; with it, the batch is copied into the same device buffer every time
and the outputs land in the same device buffers. That is also what a CUDA graph needs: a
captured graph replays fixed device addresses, so every call of a captured shape must use the
very buffers the capture saw. A ``BoundRunner`` holds exactly one shape, so that holds by
construction. It runs on ``cpu`` too (tests/test_binding.py checks it there).
"""

from __future__ import annotations

from typing import Any

import numpy as np

GRAPH_ID_KEY = "gpu_graph_id"
"""Run option of ONNX Runtime's CUDA provider: -1 skips CUDA graph capture/replay for a run."""


class BoundRunner:
    """Runs batches of one fixed shape through ``session`` with preallocated buffers."""

    def __init__(self, session: Any, input_name: str, shape: tuple[int, ...],
                 device: str = "cuda", device_id: int = 0, dtype: type | None = None) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.shape = tuple(shape)
        self.device = device
        self.device_id = device_id
        if dtype is None:  # the session's own input type (uint8 for a folded model)
            first = session.get_inputs()[0]
            dtype = np.uint8 if first.type == "tensor(uint8)" else np.float32
        self.dtype = dtype
        self.input = ort.OrtValue.ortvalue_from_shape_and_type(
            list(self.shape), dtype, device, device_id)
        self.binding = session.io_binding()
        self.binding.bind_ortvalue_input(input_name, self.input)
        self.output_names = [o.name for o in session.get_outputs()]
        self.outputs: list[Any] | None = None
        self._latest: dict[str, Any] = {}
        self.calls = 0
        # The first call must not be captured: its outputs are ORT-allocated (to learn their
        # shapes), and a graph captured then would replay into buffers that are dropped after.
        self._first = ort.RunOptions()
        self._first.add_run_config_entry(GRAPH_ID_KEY, "-1")
        self._later = ort.RunOptions()

    def run(self, batch: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
        """Host copies of the outputs ``names`` (default: all) for ``batch``; the others stay
        in their buffers, where ``fetch`` finds them until the next call."""
        if batch.shape != self.shape:
            raise ValueError(f"batch {batch.shape} does not fit the bound shape {self.shape}")
        if batch.dtype != self.dtype and self.dtype == np.uint8:
            raise ValueError(f"this session takes uint8 batches, got {batch.dtype} (convert "
                             "with PoseModel.as_input)")
        self.input.update_inplace(np.ascontiguousarray(batch, dtype=self.dtype))
        self.calls += 1
        if self.outputs is None:
            self._latest = dict(zip(self.output_names, self._first_run(), strict=True))
            return [self._latest[n] for n in names or self.output_names]
        self.session.run_with_iobinding(self.binding, self._later)
        self._latest = dict(zip(self.output_names, self.outputs, strict=True))
        return [self.fetch(n) for n in names or self.output_names]

    def fetch(self, name: str) -> np.ndarray:
        """Output ``name`` of the latest call, on the host."""
        value = self._latest[name]
        return value if isinstance(value, np.ndarray) else self._to_host(value)

    def _first_run(self) -> list[np.ndarray]:
        """Let ONNX Runtime allocate the outputs once to learn their shapes, then bind buffers
        of those shapes for every later call (output shapes follow from the input shape)."""
        for name in self.output_names:
            self.binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(self.binding, self._first)
        results = [self._to_host(v) for v in self.binding.get_outputs()]
        self.outputs = [
            self._ort.OrtValue.ortvalue_from_shape_and_type(
                list(r.shape), r.dtype, self.device, self.device_id)
            for r in results
        ]
        self.binding.clear_binding_outputs()
        for name, value in zip(self.output_names, self.outputs, strict=True):
            self.binding.bind_ortvalue_output(name, value)
        return results

    def _to_host(self, value: Any) -> np.ndarray:
        out = value.numpy()
        # A host OrtValue's numpy() may share the bound buffer, which the next call overwrites;
        # results outlive the call (the caller decodes them later), so give them their own copy.
        return out.copy() if self.device == "cpu" else out

    def buffer_addresses(self) -> list[int]:
        """Device addresses of the input and output buffers (tests check they never change)."""
        return [self.input.data_ptr(), *(v.data_ptr() for v in self.outputs or [])]
