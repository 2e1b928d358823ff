"""The machine a figure was measured on: CPU, matrix extensions, measured float32 GFLOP/s."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import onnxruntime as ort
    import PIL

    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    quota = None
    try:
        raw = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if len(raw) == 2 and raw[0] != "max":
            quota = int(raw[0]) / int(raw[1])
    except (OSError, ValueError):
        pass
    return {
        "host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)), "cgroup_cpu_quota": quota,
        "mem_gb": round(mem_kb / 1024 / 1024, 1), "kernel": platform.release(),
        "python": platform.python_version(), "onnxruntime": ort.__version__,
        "ort_providers": ort.get_available_providers(), "numpy": np.__version__,
        "pillow": PIL.__version__, "matrix_extensions": cpu_extensions(),
        "openvino": _openvino_version(),
    }


def cpu_extensions() -> list[str]:
    """The CPU flags that decide which backend and precision are fast (bf16/int8 matrix units)."""
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(
                    ("amx", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2")))
    return []


def _openvino_version() -> str | None:
    try:
        import openvino as ov
    except ImportError:
        return None
    return ov.get_version()


PROBE = """
import json, sys, time, numpy as np
n = int(sys.argv[1]); a = np.random.rand(n, n).astype(np.float32)
b = np.random.rand(n, n).astype(np.float32); a @ b
best = 1e9; end = time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < end:
    t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t)
print(json.dumps(2 * n ** 3 / best / 1e9))
"""


def gflops_probe(seconds: float = 2.0, n: int = 2048) -> dict[str, float]:
    """float32 matmul n x n, best of a few seconds, with 1 BLAS thread and with all cores."""
    out = {}
    for label, threads in (("1 thread", "1"), ("all cores", str(os.cpu_count()))):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads}
        proc = subprocess.run([sys.executable, "-c", PROBE, str(n), str(seconds)], env=env,
                              capture_output=True, text=True, check=True)
        out[label] = round(float(proc.stdout.strip().splitlines()[-1]), 1)
    return out
