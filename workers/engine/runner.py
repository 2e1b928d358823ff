"""ONNX Runtime session for a pose model: provider choice, layout detection, batched inference.

Why a class per process: creating a session costs hundreds of milliseconds and (on GPU) a CUDA
context, so a worker process creates exactly one (in Celery's ``worker_process_init``, after
fork) and reuses it for every batch.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posebatch.errors import ModelError
from posebatch.settings import default_cache_dir
from workers.engine.binding import BoundRunner
from workers.engine.layouts import (
    Detections,
    Head,
    decode_rtmo,
    decode_yolo_det,
    decode_yolo_e2e,
    decode_yolo_raw_batch,
)
from workers.engine.output_tail import TOP, TOP_INDEX, add_top_candidates
from workers.engine.providers import (
    CPU,
    CUDA,
    GPU_PROVIDERS,
    TRT,
    choose_kind,
    choose_providers,
    preload_cuda_libraries,
    tensorrt_libraries_present,
)
from workers.engine.uint8_input import as_uint8, fold_uint8_input

__all__ = ["ModelInfo", "PoseModel", "choose_providers"]

log = logging.getLogger(__name__)

UINT8_ENV = "POSEBATCH_UINT8_INPUT"
"""``0``: feed the graph float32 as it is (the engine's path before uint8 inputs, for checks)."""
TAIL_ENV = "POSEBATCH_OUTPUT_TAIL"
"""``1``: the head's best candidates come out of the graph (``output_tail``) on a CPU too;
``0``: nowhere; ``auto`` (default): on GPU providers."""
LAYOUT_YOLO_RAW = "yolo-raw"
LAYOUT_YOLO_E2E = "yolo-e2e"
LAYOUT_RTMO = "rtmo"
LAYOUT_YOLO_DET = "yolo-det"  # person boxes only: a top-down model's --detector
YOLO_DET_ROWS = (5, 84)       # one class (person) or COCO's 80 (person = class 0)


@dataclass(frozen=True)
class ModelInfo:
    path: str
    layout: str
    input_name: str
    fixed_hw: tuple[int, int] | None
    """Input height/width when the graph fixes them; None when both are dynamic."""
    fixed_batch: int | None
    provider: str


class PoseModel:
    """One ONNX pose model: ``infer(batch (B, 3, H, W) float32) -> list[Detections]``."""

    MAX_BOUND_SHAPES = 4
    """Input shapes whose bound buffers are kept (rect mode has a few; LRU beyond that)."""
    GRAPH_TRIAL_CALLS = 3
    """A fixed-shape session failing within its first calls (CUDA graph capture happens there)
    is dropped, and its shape runs on the main session."""

    def __init__(self, path: str, providers: str = "auto", intra_threads: int = 0, *,
                 precision: str = "fp32", cache_dir: Path | None = None,
                 io_binding: bool | None = None, fixed_shape_session: bool | None = None,
                 trt_present: bool | None = None, uint8_input: bool | None = None,
                 output_tail: bool | None = None) -> None:
        """``precision`` is the one of the file at ``path`` (``fp16`` also turns on TensorRT's
        fp16 kernels). ``io_binding`` (default: on a GPU) runs through preallocated buffers;
        ``fixed_shape_session`` (default: on the CUDA provider) opens a second session fixed to
        the first full input shape, with CUDA graphs on CUDA (see ``_fixed_runner``).
        ``uint8_input`` (default: on, unless ``POSEBATCH_UINT8_INPUT=0``): run the graph with a
        uint8 input and its normalisation inside (workers.engine.uint8_input); ``input_dtype``
        and ``input_order`` say what ``run_raw`` takes. ``output_tail`` (default: on a GPU, or
        as ``POSEBATCH_OUTPUT_TAIL`` says): a raw YOLO-pose graph also outputs its best
        candidates (workers.engine.output_tail), and ``run_head`` copies only those."""
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise ModelError(
                f"model file {path} does not exist; run `posebatch model build` or pass --model"
            )
        self._ort = ort
        self._path = path
        self._intra_threads = intra_threads
        self._source: str | bytes = path
        self.input_dtype: type = np.float32
        """What ``run_raw`` takes without a conversion (``as_input``), ``(B, 3, H, W)``: uint8
        RGB when the graph's input was folded (or is uint8 itself), else float32 in [0, 1]."""
        available = ort.get_available_providers()
        preload_cuda_libraries(ort, available)
        if trt_present is None:  # only probe for TensorRT where onnxruntime could use it
            trt_present = TRT in available and tensorrt_libraries_present()
        self.kind = choose_kind(providers, available, trt_present)
        if uint8_input is None:
            uint8_input = os.environ.get(UINT8_ENV, "1") not in ("0", "false", "no")
        if output_tail is None:
            # On a CPU the whole head is host memory already and the tail measured even
            # (0.52-0.53 vs 0.52-0.56 ms per image of the model thread, null model, batch 4):
            # it pays where the head would cross PCIe.
            wanted = os.environ.get(TAIL_ENV, "auto")
            output_tail = self.kind != "cpu" if wanted == "auto" else wanted not in (
                "0", "false", "no")
        original = Path(path).read_bytes() if uint8_input or output_tail else None
        folded = fold_uint8_input(original) if uint8_input and original else None
        if folded is not None:
            self._source = folded[0]
            self.input_dtype = np.uint8
        tailed = (add_top_candidates(folded[0] if folded else original)
                  if output_tail and original else None)
        if tailed is not None:
            self._source = tailed
        self._cache_dir = cache_dir or default_cache_dir()
        self._chain_args: dict[str, Any] = {"trt_present": trt_present, "precision": precision,
                                            "cache_dir": self._cache_dir}
        chain = choose_providers(providers, available, **self._chain_args)
        try:
            self.session = self._open(chain, self._options())
        except ModelError as err:
            if self._source == path:
                raise
            # e.g. weights in an external data file, which a graph given as bytes cannot find
            log.warning("the model with a uint8 input or its output tail did not load (%s); "
                        "running it as it is", err)
            self._source, self.input_dtype = path, np.float32
            self.session = self._open(chain, self._options())
        if self.session.get_inputs()[0].type == "tensor(uint8)":  # folded, or 0..255 itself
            self.input_dtype = np.uint8
        outputs = [o.name for o in self.session.get_outputs()]
        self.tail = TOP in outputs
        """The graph has the head's top candidates as outputs (``output_tail``)."""
        self._raw_names = [n for n in outputs if n not in (TOP, TOP_INDEX)]
        self.info = self._inspect(path)
        if self.kind != "cpu" and self.info.provider not in GPU_PROVIDERS:
            message = (f"providers={providers}: ONNX Runtime could not start "
                       f"{chain[0][0]} (no GPU, driver or CUDA/cuDNN libraries? see its "
                       "error above)")
            if providers != "auto":
                raise ModelError(message + "; use --providers cpu to run on the CPU")
            log.warning("%s; falling back to the CPU", message)
        self.on_cuda = self.info.provider in GPU_PROVIDERS
        """On a GPU provider (CUDA or TensorRT): batches are padded to one size, see below."""
        self.device = "cuda" if self.on_cuda else "cpu"
        self.io_binding = self.on_cuda if io_binding is None else io_binding
        self._want_fixed = (self.info.provider == CUDA if fixed_shape_session is None
                            else fixed_shape_session)
        self._bound: OrderedDict[tuple[int, ...], BoundRunner] = OrderedDict()
        self._fixed: BoundRunner | None = None
        log.info("model %s (%s, %s) on %s", path, self.info.layout, precision,
                 self.info.provider)

    def _options(self, fixed: dict[str, int] | None = None) -> Any:
        ort = self._ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._intra_threads:
            opts.intra_op_num_threads = self._intra_threads
        opts.inter_op_num_threads = 1
        # Memory patterns pre-plan one buffer per input shape: batch 4 at 640 peaks at 340 MB
        # with them, 240 MB without, at the same img/s (38.6/40.2 vs 38.3/39.7, interleaved).
        opts.enable_mem_pattern = False
        # ORT's idle intra-op threads spin for work by default; on a CPU worker they would burn
        # the cores the decode threads need between model calls (measured in bench/).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for name, value in (fixed or {}).items():
            # Fixing the symbolic input dimensions lets ORT fold the shape arithmetic away, so
            # every node can run on CUDA: a requirement of CUDA graph capture.
            opts.add_free_dimension_override_by_name(name, value)
        return opts

    def _open(self, chain: list[Any], opts: Any) -> Any:
        try:
            return self._ort.InferenceSession(self._source, sess_options=opts, providers=chain)
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"cannot load ONNX model {self._path}: {err}") from err

    def _inspect(self, path: str) -> ModelInfo:
        return inspect_io(
            path, [(i.name, i.shape) for i in self.session.get_inputs()],
            [(o.name, o.shape) for o in self.session.get_outputs()
             if o.name in self._raw_names],
            self.session.get_providers()[0],
        )

    @property
    def wants_fixed_batches(self) -> bool:
        """On CUDA, pad partial batches to the full size: one input shape means cuDNN picks its
        algorithms once and the memory arena is reused, instead of re-planning per shape."""
        return self.on_cuda

    def as_input(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` as the graph takes it. A batch in ``input_dtype`` goes as it is; a float32
        one, RGB in [0, 1] (the documented input: tests, the serve and best-quality paths), is
        converted for a uint8 graph."""
        if batch.dtype == self.input_dtype:
            return batch
        if self.input_dtype == np.uint8:
            return as_uint8(batch)
        raise ValueError(f"this model takes float32 (B, 3, H, W) batches, got {batch.dtype} "
                         f"{batch.shape}")

    def run_raw(self, batch: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs for ``batch`` (see ``as_input`` for what it may be)."""
        return self._run(batch, self._raw_names)[0]

    def run_head(self, batch: np.ndarray) -> Head:
        """A raw YOLO-pose model's head for ``batch``: its best candidates when the graph has
        the output tail, the full head fetched only if they do not suffice."""
        if not self.tail:
            return Head(raw=self.run_raw(batch)[0])
        batch = self.as_input(batch)
        (top, index), runner = self._run(batch, [TOP, TOP_INDEX])
        head_name = self._raw_names[0]
        if runner is None:
            def full() -> np.ndarray:  # rare: one more call, for this batch only
                return self.session.run([head_name], {self.info.input_name: batch})[0]
        else:
            def full() -> np.ndarray:  # still in the bound buffer until the next call
                return runner.fetch(head_name)
        return Head(top=top, index=index, full=full)

    def _run(self, batch: np.ndarray, names: list[str]
             ) -> tuple[list[np.ndarray], BoundRunner | None]:
        """Outputs ``names`` for ``batch``, and the bound runner that holds the others (None
        without I/O binding)."""
        batch = self.as_input(batch)
        if not self.io_binding:
            return self.session.run(names, {self.info.input_name: batch}), None
        shape = tuple(batch.shape)
        fixed = self._fixed_runner(shape)
        if fixed is not None:
            try:
                return fixed.run(batch, names), fixed
            except Exception as err:  # onnxruntime's untyped errors
                if fixed.calls > self.GRAPH_TRIAL_CALLS:
                    raise  # it worked before: a real error, not a capture that cannot work
                log.warning("fixed-shape session failed on call %d (%s); running %s without "
                            "it", fixed.calls, err, shape)
                self._fixed = None
        runner = self._bound_runner(shape)
        return runner.run(batch, names), runner

    def _bound_runner(self, shape: tuple[int, ...]) -> BoundRunner:
        """This shape's buffers on the main (dynamic-shape) session, kept for the next call."""
        runner = self._bound.get(shape)
        if runner is None:
            runner = BoundRunner(self.session, self.info.input_name, shape, self.device,
                                 dtype=self.input_dtype)
            self._bound[shape] = runner
            if len(self._bound) > self.MAX_BOUND_SHAPES:
                self._bound.popitem(last=False)  # no graph was captured on these: safe to drop
        self._bound.move_to_end(shape)
        return runner

    def _fixed_runner(self, shape: tuple[int, ...]) -> BoundRunner | None:
        """The session fixed to the first input shape seen (on CUDA with a CUDA graph), or None
        for any other shape, which then runs on the main session without a graph.

        Why the first shape: a GPU worker pads every batch to its batch size, so at the square
        letterbox (the default) every call has the first call's shape. Its buffers live as long
        as the model, since the captured graph replays their addresses.
        """
        if self._fixed is not None:
            return self._fixed if self._fixed.shape == shape else None
        if not self._want_fixed:
            return None
        self._want_fixed = False  # one attempt per process
        names = self.session.get_inputs()[0].shape
        fixed = {d: v for d, v in zip(names, shape, strict=True) if isinstance(d, str) and d}
        if len(fixed) != sum(not isinstance(d, int) for d in names):
            log.info("input dimensions %s are not all named: no fixed-shape session", names)
            return None
        graph = self.info.provider == CUDA
        chain = (choose_providers("cuda", self._ort.get_available_providers(),
                                  cuda_graph=True, **self._chain_args) if graph else [CPU])
        try:
            session = self._open(chain, self._options(fixed))
        except ModelError as err:  # e.g. nodes left on the CPU: CUDA graphs refuse the session
            log.warning("no CUDA graph session for %s (%s); running without graphs", shape, err)
            return None
        self._fixed = BoundRunner(session, self.info.input_name, shape, self.device,
                                  dtype=self.input_dtype)
        log.info("fixed-shape session for %s on %s%s", shape, session.get_providers()[0],
                 " with a CUDA graph" if graph else "")
        return self._fixed

    def infer(self, batch: np.ndarray, conf: float, iou: float, max_det: int) -> list[Detections]:
        """Run ``batch (B, 3, H, W) float32 in [0, 1]`` (or uint8 as ``as_input`` takes it) and
        decode one Detections per image."""
        if self.info.layout == LAYOUT_RTMO and self.input_dtype != np.uint8:
            # RTMO is trained on BGR 0..255 without normalisation (MMPose's data preprocessor
            # with mean 0, std 1): same letterbox, other channel order and range.
            batch = np.ascontiguousarray(batch[:, ::-1] * 255.0)
        return decode_outputs(self.info.layout, self._raw_names, self.run_raw(batch), conf, iou,
                              max_det)


def inspect_io(path: str, inputs: list[tuple[str, Any]], outputs: list[tuple[str, Any]],
               provider: str) -> ModelInfo:
    """Which output layout a graph has, from its input/output names and shapes (a dimension that
    is not an int is dynamic). Shared by every backend so they accept exactly the same models."""
    if len(inputs) != 1 or len(inputs[0][1]) != 4:
        raise ModelError(f"{path}: expected one image input (B, 3, H, W), got {inputs}")
    name, shape = inputs[0]
    fixed_hw = (shape[2], shape[3]) if all(isinstance(d, int) for d in shape[2:]) else None
    fixed_batch = shape[0] if isinstance(shape[0], int) else None
    names = {n for n, _ in outputs}
    if {"dets", "keypoints"} <= names:
        layout = LAYOUT_RTMO
    elif len(outputs) == 1 and len(outputs[0][1]) == 3:
        dims = outputs[0][1]
        if dims[1] == 56:
            layout = LAYOUT_YOLO_RAW
        elif dims[2] == 57:
            layout = LAYOUT_YOLO_E2E
        elif dims[1] in YOLO_DET_ROWS:
            layout = LAYOUT_YOLO_DET
        else:
            raise ModelError(f"{path}: output {dims} is neither [B, 56, N] (YOLO-pose) nor "
                             "[B, K, 57] (end-to-end YOLO-pose) nor [B, 84 or 5, N] (YOLO "
                             "person detector)")
    else:
        raise ModelError(
            f"{path}: unsupported outputs {outputs}; supported: "
            "YOLOv8/11-pose [B, 56, N], YOLO26 end-to-end [B, K, 57], RTMO dets+keypoints"
        )
    return ModelInfo(path=path, layout=layout, input_name=name, fixed_hw=fixed_hw,
                     fixed_batch=fixed_batch, provider=provider)


def decode_outputs(layout: str, names: list[str], outs: list[np.ndarray], conf: float,
                   iou: float, max_det: int) -> list[Detections]:
    """Raw graph outputs (in ``names`` order) -> one Detections per image."""
    if layout == LAYOUT_RTMO:
        by_name = dict(zip(names, outs, strict=False))
        return [decode_rtmo(d, k, conf, max_det)
                for d, k in zip(by_name["dets"], by_name["keypoints"], strict=False)]
    if layout == LAYOUT_YOLO_E2E:
        return [decode_yolo_e2e(o, conf, max_det) for o in outs[0]]
    if layout == LAYOUT_YOLO_DET:
        return [decode_yolo_det(o, conf, iou, max_det) for o in outs[0]]
    return decode_yolo_raw_batch(outs[0], conf, iou, max_det).split()
