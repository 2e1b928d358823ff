"""Which model file, backend, provider and precision a process runs, and opening it.

Why one place: ``posebatch run``, the worker's start-up check and each worker child must agree:
the precision decides the file (FP32 or its fp16 copy), the file decides the sha256 written into
the output manifest, and ``auto`` precision depends on which provider will run it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from posebatch.modelstore import ModelRef, fp16_path, resolve_model
from posebatch.settings import RuntimeSettings
from workers.engine.backends import Runner, choose_backend
from workers.engine.providers import (
    TRT,
    choose_kind,
    choose_precision,
    preload_cuda_libraries,
    tensorrt_libraries_present,
)
from workers.engine.runner import PoseModel
from workers.engine.topdown import TopDownModel
from workers.engine.topdown import open_model as open_topdown_or_pose

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    ref: ModelRef
    kind: str
    """``tensorrt``, ``cuda`` or ``cpu``: the provider the session will ask for first."""
    trt_present: bool
    backend: str = "ort"
    """``ort`` or ``openvino`` (workers.engine.backends.choose_backend)."""


def select_model(rt: RuntimeSettings) -> Selection:
    """The model file for these settings; makes the fp16 copy on first use (once, atomically)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    preload_cuda_libraries(ort, available)
    trt_present = TRT in available and tensorrt_libraries_present()
    kind = choose_kind(rt.providers, available, trt_present)
    if rt.backend != "ort" and rt.precision != "fp16" and rt.detector is None:
        fp32 = resolve_model(rt.model, rt.cache_dir)
        backend = choose_backend(rt.backend, rt.precision, kind, str(fp32.path), fp32.sha256,
                                 rt.cache_dir)
        if backend == "openvino":  # runs the FP32 file itself, in fp32 or bf16
            return Selection(fp32, kind, trt_present, backend)
    elif rt.backend == "openvino":
        choose_backend(rt.backend, rt.precision, kind, "", "", None)  # raises
    from workers.tools.fp16 import convert_fp16

    fp32 = resolve_model(rt.model, rt.cache_dir)
    precision = choose_precision(rt.precision, kind)
    if precision == "fp16" and not fp16_path(fp32.path).is_file():
        log.warning("making the fp16 copy of %s (once)", fp32.path)
        convert_fp16(fp32.path)
    return Selection(resolve_model(rt.model, rt.cache_dir, precision=precision), kind,
                     trt_present)


def open_model(rt: RuntimeSettings, ref: ModelRef | None = None,
               trt_present: bool | None = None,
               backend: str | None = None) -> Runner | TopDownModel:
    """The runner for ``ref`` (default: ``select_model(rt)``) with the runtime's settings; for a
    top-down (SimCC) model, with its detector (``rt.detector``, else the default model).
    ``backend`` None: the one ``select_model`` chooses (its measurement is cached in-process)."""
    if ref is None or backend is None:
        sel = select_model(rt)
        ref = ref or sel.ref
        trt_present = sel.trt_present if trt_present is None else trt_present
        backend = sel.backend
    main = str(ref.path)
    if backend == "openvino":
        from workers.engine.runner_openvino import OpenVinoModel

        return OpenVinoModel(main, rt.precision, rt.intra_threads)

    def make_pose(path: str) -> PoseModel:
        # The precision (an fp16 copy) belongs to the --model file; a detector runs as given.
        return PoseModel(path, rt.providers, rt.intra_threads,
                         precision=ref.precision if path == main else "fp32",
                         cache_dir=rt.cache_dir, trt_present=trt_present)

    return open_topdown_or_pose(main, make_pose, rt.providers, rt.intra_threads, rt.detector,
                                lambda: str(resolve_model(None, rt.cache_dir).path))


_DEVICES = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda",
            "TensorrtExecutionProvider": "tensorrt"}


def runner_label(model: Runner | TopDownModel, ref: ModelRef) -> str:
    """``<backend> <precision> <device>`` of an open model, e.g. ``openvino bf16 cpu`` or ``ort
    fp32 cuda``: what made a job's numbers, written to its manifest and summary so a reader can
    tell whether two jobs (or two hosts of one job) computed alike."""
    provider = model.info.provider
    if provider.startswith("OpenVINO"):
        return f"openvino {provider.rsplit(' ', 1)[-1]} cpu"
    return f"ort {ref.precision} {_DEVICES.get(provider, provider)}"

