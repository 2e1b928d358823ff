"""Provider and precision choice (pure functions): what a GPU session would ask ONNX Runtime for,
checked without a GPU. The GPU itself is exercised by bench/gpu_check.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from posebatch.errors import ConfigError, ModelError
from posebatch.settings import RuntimeSettings
from workers.engine.providers import (
    CPU,
    CUDA,
    TRT,
    choose_kind,
    choose_precision,
    choose_providers,
)

CPU_ONLY = ["AzureExecutionProvider", CPU]
GPU_BUILD = [TRT, CUDA, CPU]  # what onnxruntime-gpu lists, with or without TensorRT installed


def names(chain) -> list[str]:
    return [p[0] if isinstance(p, tuple) else p for p in chain]


def options(chain, name: str) -> dict[str, str]:
    return next(p[1] for p in chain if isinstance(p, tuple) and p[0] == name)


def test_auto_takes_tensorrt_only_when_its_libraries_load(tmp_path: Path):
    with_trt = choose_providers("auto", GPU_BUILD, trt_present=True, cache_dir=tmp_path)
    assert names(with_trt) == [TRT, CUDA, CPU]
    without = choose_providers("auto", GPU_BUILD, trt_present=False, cache_dir=tmp_path)
    assert names(without) == [CUDA, CPU]


def test_tensorrt_caches_engines_under_the_posebatch_cache_and_follows_precision(tmp_path):
    half = options(choose_providers("tensorrt", GPU_BUILD, trt_present=True, precision="fp16",
                                    cache_dir=tmp_path), TRT)
    assert half["trt_engine_cache_enable"] == "True"
    assert half["trt_engine_cache_path"] == str(tmp_path / "tensorrt")
    assert half["trt_fp16_enable"] == "True"
    full = options(choose_providers("tensorrt", GPU_BUILD, trt_present=True, precision="fp32",
                                    cache_dir=tmp_path), TRT)
    assert full["trt_fp16_enable"] == "False"


def test_cuda_uses_heuristic_cudnn_search_no_tf32_and_graphs_only_when_asked():
    plain = options(choose_providers("cuda", GPU_BUILD), CUDA)
    assert plain["cudnn_conv_algo_search"] == "HEURISTIC"
    assert plain["use_tf32"] == "0"  # FP32 stays FP32 (TF32 moved keypoints ~1 px on an H100)
    assert "use_tf32" not in options(choose_providers("cuda", GPU_BUILD, precision="fp16"), CUDA)
    assert "enable_cuda_graph" not in plain
    graph = options(choose_providers("cuda", GPU_BUILD, cuda_graph=True), CUDA)
    assert graph["enable_cuda_graph"] == "1"
    # Under TensorRT the CUDA provider only takes rejected nodes: no graph there.
    trt = choose_providers("auto", GPU_BUILD, trt_present=True, cache_dir=Path("/c"),
                           cuda_graph=True)
    assert "enable_cuda_graph" not in options(trt, CUDA)


def test_cpu_fallback_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="workers.engine.providers"):
        assert choose_providers("auto", CPU_ONLY) == [CPU]
    assert "running on the CPU" in caplog.text
    assert choose_providers("cpu", GPU_BUILD, trt_present=True) == [CPU]


@pytest.mark.parametrize("wanted, available, trt, hint", [
    ("cuda", CPU_ONLY, False, "install onnxruntime-gpu"),
    ("tensorrt", CPU_ONLY, False, "install onnxruntime-gpu"),
    ("tensorrt", GPU_BUILD, False, "libnvinfer"),
])
def test_demanding_a_missing_gpu_provider_is_a_clear_model_error(wanted, available, trt, hint):
    with pytest.raises(ModelError, match=hint):
        choose_kind(wanted, available, trt)


def test_precision_auto_is_fp32_everywhere_and_fp16_is_asked_for():
    # fp16 moved a confident keypoint 8.6 px on an H100 and bought no end-to-end speed there.
    assert choose_precision("auto", "cuda") == "fp32"
    assert choose_precision("auto", "tensorrt") == "fp32"
    assert choose_precision("fp16", "cuda") == "fp16"
    assert choose_precision("auto", "cpu") == "fp32"
    assert choose_precision("fp16", "cpu") == "fp16"
    with pytest.raises(ModelError, match="OpenVINO"):
        choose_precision("bf16", "cpu")


def test_settings_check_providers_and_precision():
    assert RuntimeSettings(providers="tensorrt", precision="fp16").precision == "fp16"
    with pytest.raises(ConfigError, match="precision"):
        RuntimeSettings(precision="fp8")

