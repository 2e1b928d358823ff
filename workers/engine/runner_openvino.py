"""OpenVINO runner for the same ONNX file: bf16 on CPUs with AMX / AVX512-BF16, several requests.

Why a second backend: on a 2-core Xeon with AMX, OpenVINO's CPU plugin in bf16 ran this model
2.5-5x faster than ONNX Runtime FP32 (docs/cpu-backends.md), and its asynchronous infer requests
keep every core busy with batch-1 work, where one ORT call at batch 4 leaves cores idle between
operators. The runtime is used directly, not through onnxruntime's OpenVINO execution provider:
that provider refused bf16 through its own option, was slower via ``load_config`` (one synchronous
request), and its package replaces ``onnxruntime`` so both backends could not share one venv.

Same interface as :class:`workers.engine.runner.PoseModel` (``info``, ``on_cuda``,
``wants_fixed_batches``, ``run_raw``, ``infer``): the pipeline does not know which one it has.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np

from posebatch.errors import ModelError
from workers.engine.layouts import Detections, Head
from workers.engine.runner import (
    LAYOUT_RTMO,
    UINT8_ENV,
    ModelInfo,
    decode_outputs,
    inspect_io,
)
from workers.engine.uint8_input import as_uint8

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can run bf16 natively here (AMX or AVX512-BF16)."""
    import openvino as ov

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in caps


def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 where the CPU has it, else fp32; an explicit value is kept."""
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise ModelError(f"the openvino backend runs precision fp32 or bf16, not {precision!r}")
    return precision


class OpenVinoModel:
    """One ONNX pose model compiled by OpenVINO; ``infer`` splits a batch over async requests."""

    on_cuda = False
    wants_fixed_batches = False

    def __init__(self, path: str, precision: str = "auto", threads: int = 0) -> None:
        try:
            import openvino as ov
        except ImportError as err:
            raise ModelError("backend openvino needs the openvino package: "
                             "pip install 'posebatch[openvino]', or use --backend ort") from err
        if not os.path.isfile(path):
            raise ModelError(
                f"model file {path} does not exist; run `posebatch model build` or pass --model"
            )
        self._ov = ov
        self._core = ov.Core()
        try:
            self._model = self._core.read_model(path)
        except Exception as err:  # openvino raises RuntimeError subclasses of its own
            raise ModelError(f"cannot load ONNX model {path} with OpenVINO: {err}") from err
        self.input_dtype: type = np.float32
        """uint8 once the scaling is in the model (NCHW as the engine's batches)."""
        if os.environ.get(UINT8_ENV, "1") not in ("0", "false", "no"):
            self._model = self._uint8_input(self._model)
        self.precision = resolve_precision(precision)
        self._config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "f32" if self.precision == "fp32" else "bf16",
            # THROUGHPUT: several streams, each running one request on a share of the cores.
            "PERFORMANCE_HINT": "THROUGHPUT",
        }
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = threads
        self._out_names = [o.get_any_name() for o in self._model.outputs]
        self.info: ModelInfo = inspect_io(
            path, [(self._model.inputs[0].get_any_name(), _dims(self._model.inputs[0]))],
            [(o.get_any_name(), _dims(o)) for o in self._model.outputs],
            f"OpenVINO CPU {self.precision}",
        )
        self._chunk = self.info.fixed_batch or 1
        self._compiled: dict[tuple[int, int], Any] = {}
        self._lock = threading.Lock()
        # Compile the usual input size now, as ONNX Runtime plans its session at creation: a job
        # then starts at full speed (compiling takes about a second on 2 cores).
        self._queue_for(self.info.fixed_hw or (640, 640))
        log.info("model %s (%s) on %s", path, self.info.layout, self.info.provider)

    def _uint8_input(self, model: Any) -> Any:
        """The engine's uint8 (B, 3, H, W) RGB batches in, the model's float input made by
        OpenVINO's preprocessing (as workers.engine.uint8_input does for ONNX Runtime: times
        float32(1/255), or BGR 0..255 for RTMO)."""
        from openvino import opset13 as ops
        from openvino.preprocess import PrePostProcessor

        if len(model.inputs) != 1 or model.inputs[0].get_element_type() != self._ov.Type.f32:
            return model
        rtmo = {"dets", "keypoints"} <= {o.get_any_name() for o in model.outputs}
        ppp = PrePostProcessor(model)
        ppp.input().tensor().set_element_type(self._ov.Type.u8).set_layout(
            self._ov.Layout("NCHW"))
        ppp.input().model().set_layout(self._ov.Layout("NCHW"))
        steps = ppp.input().preprocess()
        if rtmo:
            steps.reverse_channels().convert_element_type(self._ov.Type.f32)
        else:
            inv = ops.constant(np.float32(1 / 255))
            steps.convert_element_type(self._ov.Type.f32).custom(
                lambda x: ops.multiply(x, inv).output(0))
        self.input_dtype = np.uint8
        return ppp.build()

    def _queue_for(self, hw: tuple[int, int]) -> Any:
        """A compiled model and request queue per input size: static shapes compile to faster
        kernels than a dynamic graph, and a job sees one or a few sizes (square, or rect)."""
        with self._lock:
            if hw not in self._compiled:
                model = self._model
                if self.info.fixed_hw is None or self.info.fixed_batch is None:
                    model = model.clone()
                    model.reshape({model.inputs[0].get_any_name(): [self._chunk, 3, *hw]})
                compiled = self._core.compile_model(model, "CPU", self._config)
                n = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
                self._compiled[hw] = self._ov.AsyncInferQueue(compiled, max(1, n))
            return self._compiled[hw]

    def as_input(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` as the compiled model takes it (see ``PoseModel.as_input``)."""
        return as_uint8(batch) if self.input_dtype == np.uint8 else batch

    def run_raw(self, batch: np.ndarray) -> list[np.ndarray]:
        """``batch (B, 3, H, W)`` float32 (or uint8) -> the graph's outputs for the batch."""
        batch = self.as_input(batch)
        queue = self._queue_for((int(batch.shape[2]), int(batch.shape[3])))
        chunks = [np.ascontiguousarray(batch[i:i + self._chunk])
                  for i in range(0, len(batch), self._chunk)]
        results: list[list[np.ndarray] | None] = [None] * len(chunks)

        def done(request: Any, index: int) -> None:
            # Copy: the request's output buffers are reused by its next inference.
            results[index] = [request.get_output_tensor(k).data.copy()
                              for k in range(len(self._out_names))]

        queue.set_callback(done)
        try:
            for i, chunk in enumerate(chunks):
                queue.start_async({0: chunk}, i)
            queue.wait_all()
        except BaseException:
            _drain(queue)
            raise
        return [np.concatenate([r[k] for r in results if r is not None])
                for k in range(len(self._out_names))]

    def run_head(self, batch: np.ndarray) -> Head:
        """The raw head of ``batch``: OpenVINO's outputs are host memory already, so the whole
        head is handed over (no output tail)."""
        return Head(raw=self.run_raw(batch)[0])

    def infer(self, batch: np.ndarray, conf: float, iou: float, max_det: int) -> list[Detections]:
        """Run ``batch (B, 3, H, W) float32 in [0, 1]`` and decode one Detections per image."""
        if self.info.layout == LAYOUT_RTMO and self.input_dtype != np.uint8:
            # BGR 0..255, as runner.PoseModel.infer explains
            batch = np.ascontiguousarray(batch[:, ::-1] * 255.0)
        return decode_outputs(self.info.layout, self._out_names, self.run_raw(batch), conf, iou,
                              max_det)


def _drain(queue: Any) -> None:
    """Wait for the requests still running before an exception leaves ``run_raw``.

    A Ctrl-C ends OpenVINO's ``wait_all`` early with requests in flight; if the process then
    exits, their callbacks try to enter the finalizing interpreter from OpenVINO's threads and
    the process aborts (SIGABRT, "FATAL: exception not rethrown") instead of exiting 130.
    """
    while True:
        try:
            queue.wait_all()
            return
        except KeyboardInterrupt:  # another Ctrl-C: the requests finish within a batch's time
            continue


def _dims(port: Any) -> list[int | None]:
    return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
