"""ONNX Runtime session for a pose model: provider choice, layout detection, batched inference.

Why a class per process: creating a session costs hundreds of milliseconds and (on GPU) a CUDA
context, so a worker process creates exactly one (in Celery's ``worker_process_init``, after
fork) and reuses it for every batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from posebatch.errors import ModelError
from workers.engine.layouts import (
    Detections,
    decode_rtmo,
    decode_yolo_det,
    decode_yolo_e2e,
    decode_yolo_raw,
)

log = logging.getLogger(__name__)

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


def choose_providers(wanted: str, available: list[str]) -> list[str]:
    """``auto``: CUDA when the installed onnxruntime has it, else CPU. ``cuda`` demands it."""
    if wanted == "cpu":
        return ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in available
    if wanted == "cuda" and not has_cuda:
        raise ModelError(
            "providers=cuda but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {available}); install onnxruntime-gpu or use --providers cpu"
        )
    if has_cuda:
        cuda_opts = {
            # Heuristic algorithm search: exhaustive search re-runs for each new input shape.
            "cudnn_conv_algo_search": "HEURISTIC",
            "do_copy_in_default_stream": True,
        }
        return [("CUDAExecutionProvider", cuda_opts), "CPUExecutionProvider"]  # type: ignore[list-item]
    return ["CPUExecutionProvider"]


class PoseModel:
    """One ONNX pose model: ``infer(batch (B, 3, H, W) float32) -> list[Detections]``."""

    def __init__(self, path: str, providers: str = "auto", intra_threads: int = 0) -> None:
        import onnxruntime as ort

        if not os.path.isfile(path):
            raise ModelError(
                f"model file {path} does not exist; run `posebatch model build` or pass --model"
            )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_threads:
            opts.intra_op_num_threads = intra_threads
        opts.inter_op_num_threads = 1
        # Memory patterns pre-plan one buffer per input shape: batch 4 at 640 peaks at 340 MB
        # with them, 240 MB without, at the same img/s (38.6/40.2 vs 38.3/39.7, interleaved).
        opts.enable_mem_pattern = False
        # ORT's idle intra-op threads spin for work by default; on a CPU worker they would burn
        # the cores the decode threads need between model calls (measured in bench/).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                path, sess_options=opts,
                providers=choose_providers(providers, ort.get_available_providers()),
            )
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"cannot load ONNX model {path}: {err}") from err
        self.info = self._inspect(path)
        self.on_cuda = self.info.provider == "CUDAExecutionProvider"
        self._ort = ort
        log.info("model %s (%s) on %s", path, self.info.layout, self.info.provider)

    def _inspect(self, path: str) -> ModelInfo:
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ModelError(f"{path}: expected one image input (B, 3, H, W), got "
                             f"{[(i.name, i.shape) for i in inputs]}")
        shape = inputs[0].shape
        fixed_hw = (shape[2], shape[3]) if all(isinstance(d, int) for d in shape[2:]) else None
        fixed_batch = shape[0] if isinstance(shape[0], int) else None
        outs = self.session.get_outputs()
        names = {o.name for o in outs}
        if {"dets", "keypoints"} <= names:
            layout = LAYOUT_RTMO
        elif len(outs) == 1 and len(outs[0].shape) == 3:
            dims = outs[0].shape
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
                f"{path}: unsupported outputs {[(o.name, o.shape) for o in outs]}; supported: "
                "YOLOv8/11-pose [B, 56, N], YOLO26 end-to-end [B, K, 57], RTMO dets+keypoints"
            )
        return ModelInfo(path=path, layout=layout, input_name=inputs[0].name, fixed_hw=fixed_hw,
                         fixed_batch=fixed_batch, provider=self.session.get_providers()[0])

    @property
    def wants_fixed_batches(self) -> bool:
        """On CUDA, pad partial batches to the full size: one input shape means cuDNN picks its
        algorithms once and the memory arena is reused, instead of re-planning per shape."""
        return self.on_cuda

    def run_raw(self, batch: np.ndarray) -> list[np.ndarray]:
        if not self.on_cuda:
            return self.session.run(None, {self.info.input_name: batch})
        # I/O binding: copy the batch to the GPU once, explicitly, and let outputs come back to
        # host memory in one copy, instead of ORT staging both through its own buffers.
        binding = self.session.io_binding()
        device_input = self._ort.OrtValue.ortvalue_from_numpy(batch, "cuda", 0)
        binding.bind_ortvalue_input(self.info.input_name, device_input)
        for out in self.session.get_outputs():
            binding.bind_output(out.name, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def infer(self, batch: np.ndarray, conf: float, iou: float, max_det: int) -> list[Detections]:
        """Run ``batch (B, 3, H, W) float32 in [0, 1]`` and decode one Detections per image."""
        if self.info.layout == LAYOUT_RTMO:
            # RTMO is trained on BGR 0..255 without normalisation (MMPose's data preprocessor
            # with mean 0, std 1): same letterbox, other channel order and range.
            batch = np.ascontiguousarray(batch[:, ::-1] * 255.0)
        outs = self.run_raw(batch)
        if self.info.layout == LAYOUT_RTMO:
            by_name = dict(zip([o.name for o in self.session.get_outputs()], outs, strict=False))
            return [decode_rtmo(d, k, conf, max_det)
                    for d, k in zip(by_name["dets"], by_name["keypoints"], strict=False)]
        if self.info.layout == LAYOUT_YOLO_E2E:
            return [decode_yolo_e2e(o, conf, max_det) for o in outs[0]]
        if self.info.layout == LAYOUT_YOLO_DET:
            return [decode_yolo_det(o, conf, iou, max_det) for o in outs[0]]
        return [decode_yolo_raw(o, conf, iou, max_det) for o in outs[0]]
