"""Which runner a process uses (ONNX Runtime or OpenVINO, and in which precision): the one place.

Why measure instead of a fixed rule: which backend is faster depends on the CPU (AMX, AVX512-BF16,
VNNI, core count) and the runtimes' versions, and the gap is large both ways (bf16 on AMX: ~3x
for OpenVINO; on CPUs without it the two are close). A short interleaved measurement at start-up
picks the faster one, and its answer is cached per model and host in the cache directory, so only
the first process on a host pays for it (~2 s).

Why one answer per host, not per process: the two backends' floats differ in the last digits, so
a local run and the cluster workers of one host must run the same one to write the same bytes.
The choice ignores the process's thread count (a worker's 1 thread and a local run's all cores
once picked different backends on a 2-core AVX2 host, where the two tie at one thread), is
measured under a file lock (workers starting together wait for the first one's answer instead
of each measuring under the others' load), and keeps ONNX Runtime unless OpenVINO is clearly
faster (``OPENVINO_MARGIN``): a near tie is noise.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from posebatch.errors import ModelError
from workers.engine.layouts import Detections, Head
from workers.engine.runner import ModelInfo, PoseModel

log = logging.getLogger(__name__)

BACKENDS = ("auto", "ort", "openvino")
CHOICE_FILE = "backend-choice.json"
MEASURE_SECONDS = 0.6
"""Per backend and round; two interleaved rounds, best kept (other processes share the cores)."""
OPENVINO_MARGIN = 1.1
"""OpenVINO is chosen when it measured at least this many times ONNX Runtime's img/s."""


class Runner(Protocol):
    """What the pipeline needs from a model runner; every backend provides exactly this."""

    info: ModelInfo
    on_cuda: bool

    @property
    def wants_fixed_batches(self) -> bool: ...

    def run_raw(self, batch: np.ndarray) -> list[np.ndarray]: ...

    def run_head(self, batch: np.ndarray) -> Head: ...

    def infer(self, batch: np.ndarray, conf: float, iou: float,
              max_det: int) -> list[Detections]: ...


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(wanted: str, precision: str, kind: str, path: str,
                   model_sha256: str, cache_dir: Path | None) -> str:
    """``ort`` or ``openvino`` for a model about to run on provider ``kind`` (cpu/cuda/tensorrt).

    ``auto``: ONNX Runtime on a GPU, for the fp16 file, or when OpenVINO is not
    installed; OpenVINO when bf16 was asked for; otherwise the faster of the two on this CPU,
    measured once per model and host (whatever the thread count) and cached in ``cache_dir``.
    """
    if wanted not in BACKENDS:
        raise ModelError(f"backend: expected one of {', '.join(BACKENDS)}, got {wanted!r}")
    if wanted == "openvino":
        if kind != "cpu":
            raise ModelError(f"backend openvino runs on the CPU; providers resolve to {kind} "
                             "here (use --providers cpu, or --backend ort)")
        if precision == "fp16":
            raise ModelError("backend openvino runs the FP32 model in fp32 or bf16; "
                             "--precision fp16 is an ONNX Runtime file (use --backend ort)")
        if not openvino_available():
            raise ModelError("backend openvino needs the openvino package: "
                             "pip install 'posebatch[openvino]', or use --backend ort")
        return "openvino"
    if wanted == "ort":
        return "ort"
    if kind != "cpu" or precision == "fp16" or not openvino_available():
        return "ort"
    if precision == "bf16":
        return "openvino"
    return _measured_choice(path, precision, model_sha256, cache_dir)


@lru_cache(maxsize=8)
def _measured_choice(path: str, precision: str, model_sha256: str,
                     cache_dir: Path | None) -> str:
    """Cached on disk per host, and in memory so one process never measures twice; measured
    with all cores whatever this process's thread count (the module's docstring says why)."""
    key = f"{model_sha256 or os.path.abspath(path)}|{precision}|{host_fingerprint()}"
    cache = Path(cache_dir) / CHOICE_FILE if cache_dir else None
    with _choice_lock(cache):
        known = _read_choices(cache)
        if key in known:
            return str(known[key]["backend"])
        try:
            rates = measure_backends(path, precision, 0)
        except Exception as err:  # noqa: BLE001 - a model only ORT takes (top-down), or one
            # that fails to run: keep ORT, cache nothing, and let the first real batch report it.
            log.warning("backend auto: ort (measuring failed: %s)", err)
            return "ort"
        best = faster_backend(rates)
        log.warning("backend auto: %s (%s img/s measured at start-up, cached in %s)", best,
                    ", ".join(f"{b} {r:.1f}" for b, r in rates.items()), cache or "memory only")
        if cache is not None:
            known[key] = {"backend": best, "img_per_s": rates, "measured": time.time()}
            _write_choices(cache, known)
        return best


def faster_backend(rates: dict[str, float]) -> str:
    """``openvino`` when it is clearly faster (``OPENVINO_MARGIN``), else ``ort``."""
    return "openvino" if rates.get("openvino", 0.0) >= OPENVINO_MARGIN * rates["ort"] else "ort"


@contextlib.contextmanager
def _choice_lock(cache: Path | None):
    """Held while the cached choice is read, measured and written: one measurement per host."""
    if cache is None:
        yield
        return
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fh = open(cache.with_name(cache.name + ".lock"), "a+b")  # noqa: SIM115
    except OSError:  # a read-only cache dir: each process measures for itself
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def measure_backends(path: str, precision: str = "auto", threads: int = 0,
                     seconds: float = MEASURE_SECONDS, hw: tuple[int, int] = (640, 640)
                     ) -> dict[str, float]:
    """img/s of each backend on one random batch of 4, two interleaved rounds, best kept."""
    from workers.engine.runner_openvino import OpenVinoModel

    runners: dict[str, Runner] = {
        "ort": PoseModel(path, "cpu", threads),
        "openvino": OpenVinoModel(path, precision, threads),
    }
    fixed = runners["ort"].info
    size = fixed.fixed_hw or hw
    batch = np.random.default_rng(0).random((fixed.fixed_batch or 4, 3, *size), np.float32)
    for r in runners.values():
        r.run_raw(batch)  # warm-up: kernels compiled, memory planned
    best = dict.fromkeys(runners, 0.0)
    for _ in range(2):
        for name, r in runners.items():
            n, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < seconds:
                r.run_raw(batch)
                n += len(batch)
            best[name] = max(best[name], n / elapsed)
    return best


def host_fingerprint() -> str:
    """CPU model, its matrix/vector extensions, core count and runtime versions: what decides
    which backend is faster, so a cached choice is redone when any of them changes."""
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and not model.strip():
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    ext = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx2")))
    return f"{model}|{'+'.join(ext)}|{os.cpu_count()}|{_versions()}"


def _versions() -> str:
    import onnxruntime as ort

    out = f"ort{ort.__version__}"
    if openvino_available():
        import openvino as ov

        out += f"|ov{ov.get_version()}"
    return out


def _read_choices(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a damaged cache only costs one more measurement


def _write_choices(path: Path, choices: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(choices, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache dir: measure again next time, still run
        log.warning("cannot cache the backend choice in %s: %s", path, err)
