"""Which ONNX Runtime execution providers a session asks for, with which options, and which
precision of the model it runs.

Why pure functions: the GPU paths cannot run on a CPU-only machine, so what they would ask ONNX
Runtime for is decided here from plain inputs (the providers this onnxruntime build lists,
whether TensorRT's libraries load, the settings) and unit-tested (tests/test_providers.py);
``runner.py`` only hands the result to ``ort.InferenceSession``.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from pathlib import Path
from typing import Any

from posebatch.errors import ModelError

log = logging.getLogger(__name__)

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TRT, CUDA)
TRT_LIBRARIES = ("libnvinfer.so.10", "libnvonnxparser.so.10")
"""What onnxruntime-gpu's TensorRT provider links (1.31: TensorRT 10, with CUDA 13)."""

ProviderList = list[Any]
"""What ``ort.InferenceSession(providers=...)`` takes: names or (name, options) pairs."""


def preload_cuda_libraries(ort: Any, available: list[str]) -> None:
    """CUDA and cuDNN installed as nvidia-* wheels (PyTorch's, say) are not on the loader path;
    onnxruntime-gpu (>= 1.21) loads them from there when asked. Before the TensorRT probe too,
    since TensorRT's libraries need CUDA's."""
    if CUDA in available and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def tensorrt_libraries_present() -> bool:
    """Whether TensorRT's runtime library loads in this process.

    onnxruntime-gpu lists TensorrtExecutionProvider whether or not TensorRT is installed; a
    session that asks for it without the library logs an error and falls back. So look for the
    libraries themselves: on the loader path, or inside the TensorRT wheels'
    ``tensorrt_libs`` folder.
    """
    folders = [""]
    spec = importlib.util.find_spec("tensorrt_libs")
    if spec is not None and spec.submodule_search_locations:
        folders += list(spec.submodule_search_locations)
    return all(_loads(lib, folders) for lib in TRT_LIBRARIES)


def _loads(name: str, folders: list[str]) -> bool:
    for folder in folders:
        try:
            ctypes.CDLL(str(Path(folder) / name) if folder else name)
            return True
        except OSError:
            continue
    return False


def choose_kind(wanted: str, available: list[str], trt_present: bool) -> str:
    """``tensorrt``, ``cuda`` or ``cpu``: the first provider the session will ask for.

    ``auto`` takes TensorRT when its libraries are present, else CUDA when this onnxruntime has
    it, else the CPU (logged, so a GPU worker that silently runs on CPU shows in its log).
    ``cuda`` and ``tensorrt`` demand theirs and fail with what to install.
    """
    has_cuda = CUDA in available
    has_trt = TRT in available and trt_present
    if wanted == "cpu":
        return "cpu"
    if wanted == "tensorrt":
        if not has_trt:
            why = ("this onnxruntime has no TensorrtExecutionProvider (install onnxruntime-gpu)"
                   if TRT not in available else
                   f"TensorRT's {' / '.join(TRT_LIBRARIES)} do not load (pip install the "
                   "tensorrt 10 wheels for your CUDA, or put TensorRT 10 on LD_LIBRARY_PATH)")
            raise ModelError(f"providers=tensorrt but {why}; or use --providers cuda|auto")
        return "tensorrt"
    if wanted == "cuda":
        if not has_cuda:
            raise ModelError(
                "providers=cuda but this onnxruntime has no CUDAExecutionProvider "
                f"(available: {available}); install onnxruntime-gpu (pip install "
                "'posebatch[gpu]', without the cpu extra) or use --providers cpu"
            )
        return "cuda"
    if has_trt:
        return "tensorrt"
    if has_cuda:
        return "cuda"
    log.info("providers=auto: no CUDA in this onnxruntime (available: %s); running on the CPU",
             ", ".join(available))
    return "cpu"


def cuda_options(cuda_graph: bool, fp16: bool = False) -> dict[str, str]:
    """CUDA provider options. cuDNN's heuristic algorithm choice: the exhaustive search (ORT's
    default) re-benchmarks every convolution for each new input shape, seconds per shape. CUDA
    graphs only for a session whose input shape is fixed (see runner.PoseModel): a captured
    graph replays fixed device addresses, which needs I/O binding to preallocated buffers.
    No TF32 for the FP32 model: with ORT's default (on) it moved a confident keypoint 0.95 model
    pixels from the CPU's FP32 result on an H100, 0.003 without; FP32 must mean FP32, and fp16
    is the fast path. The fp16 model keeps the default: TF32 touches only its float32 tail, and
    with TF32 off cuDNN's frontend logged "No execution plans support the graph" for it."""
    opts = {"cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "1"}
    if not fp16:
        opts["use_tf32"] = "0"
    if cuda_graph:
        opts["enable_cuda_graph"] = "1"
    return opts


def tensorrt_options(cache_dir: Path, fp16: bool, input_name: str | None = None,
                     fixed_shape: tuple[int, ...] | None = None) -> dict[str, str]:
    """TensorRT provider options: engines and timing caches on disk under the posebatch cache
    (building an engine takes minutes; a cached one loads in seconds), FP16 kernels when the run
    asked for fp16, and one optimisation profile from batch 1 to the fixed batch when the shape
    is known (otherwise TensorRT rebuilds whenever a larger shape arrives)."""
    engines = cache_dir / "tensorrt"
    opts = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(engines),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(engines),
        "trt_fp16_enable": "True" if fp16 else "False",
    }
    if input_name and fixed_shape:
        b, c, h, w = fixed_shape
        opts["trt_profile_min_shapes"] = f"{input_name}:1x{c}x{h}x{w}"
        opts["trt_profile_opt_shapes"] = f"{input_name}:{b}x{c}x{h}x{w}"
        opts["trt_profile_max_shapes"] = f"{input_name}:{b}x{c}x{h}x{w}"
    return opts


def choose_providers(wanted: str, available: list[str], *, trt_present: bool = False,
                     precision: str = "fp32", cache_dir: Path | None = None,
                     cuda_graph: bool = False, input_name: str | None = None,
                     fixed_shape: tuple[int, ...] | None = None) -> ProviderList:
    """The ``providers=`` list for a session: the chosen GPU provider first, then the ones it
    falls back to for nodes it cannot run (TensorRT -> CUDA -> CPU)."""
    kind = choose_kind(wanted, available, trt_present)
    if kind == "cpu":
        return [CPU]
    chain: ProviderList = []
    if kind == "tensorrt":
        if cache_dir is None:
            raise ModelError("TensorRT needs a cache folder for its engines (cache_dir)")
        chain.append((TRT, tensorrt_options(cache_dir, precision == "fp16", input_name,
                                            fixed_shape)))
        cuda_graph = False  # TensorRT runs the graph; CUDA only takes the nodes it rejects
    chain.append((CUDA, cuda_options(cuda_graph, precision == "fp16")))
    chain.append(CPU)
    return chain


PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def choose_precision(wanted: str, kind: str) -> str:
    """``fp32`` or ``fp16``: which model file this ONNX Runtime session runs.

    ``auto`` is fp32, on GPUs too: on an H100 (bench/results/2026-11-26-vm-gpu-auto-run3.md) the
    fp16 copy ran 1.6x faster on the device (3188 vs 1937 img/s at batch 32) but moved one
    confident dev-set keypoint 8.6 model pixels where FP32 matched the CPU within 0.003, and
    ``posebatch run`` was CPU-bound at ~200 img/s either way, so fp16 bought no speed. fp16 is
    there on request (``--precision fp16``). On CPUs fp16 is not a speed option (ONNX Runtime's
    CPU provider lacks many fp16 kernels and casts around them).
    ``bf16`` is a CPU format for the OpenVINO runner; this runner refuses it rather than
    silently running fp32.
    """
    if wanted not in PRECISIONS:
        raise ModelError(f"precision {wanted!r}: expected one of {', '.join(PRECISIONS)}")
    if wanted == "bf16":
        raise ModelError("precision bf16 is not supported by the ONNX Runtime runner "
                         "(use fp32 or fp16, or the OpenVINO runner on CPUs with AMX/AVX512-BF16)")
    if wanted == "auto":
        return "fp32"
    if wanted == "fp16" and kind == "cpu":
        log.warning("precision fp16 on the CPU provider: meant for checking the fp16 model; its "
                    "speed on CPUs is not measured (ONNX Runtime casts where it lacks fp16 "
                    "kernels)")
    return wanted
