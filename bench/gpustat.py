"""GPU facts and utilisation samples for bench/gpu_check.py: NVML when ``pynvml`` (the
nvidia-ml-py package) imports, else ``nvidia-smi``, else nothing ("n/a" in the table).

Why sampled in a thread: utilisation is the share of the last sample period in which a kernel
ran, so it has to be read repeatedly while a stage runs; a mean over the stage is what the
issue's "GPU busy >= 90 %" goal is checked against.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from typing import Any

SMI_QUERY = ["--query-gpu=name,driver_version,memory.total,utilization.gpu,memory.used",
             "--format=csv,noheader,nounits"]


class Gpu:
    """Reads one GPU (index 0): ``info()`` once, ``sample()`` -> (util %, memory MiB) or None."""

    def __init__(self) -> None:
        self.backend = "n/a"
        self._nvml: Any = None
        self._handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            self.backend = "nvml"
        except Exception:  # no library, no driver or no GPU: try the command line tool
            if shutil.which("nvidia-smi") and self._smi() is not None:
                self.backend = "nvidia-smi"

    def _smi(self) -> list[str] | None:
        try:
            out = subprocess.run(["nvidia-smi", "-i", "0", *SMI_QUERY], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        fields = [f.strip() for f in out.stdout.strip().split(",")]
        return fields if out.returncode == 0 and len(fields) == 5 else None

    def info(self) -> dict[str, Any]:
        if self.backend == "nvml":
            n, h = self._nvml, self._handle
            name = n.nvmlDeviceGetName(h)
            return {"gpu": name.decode() if isinstance(name, bytes) else name,
                    "driver": str(n.nvmlSystemGetDriverVersion()),
                    "memory_mib": n.nvmlDeviceGetMemoryInfo(h).total // 2**20,
                    "sampled_with": "NVML"}
        if self.backend == "nvidia-smi":
            f = self._smi() or ["?"] * 5
            return {"gpu": f[0], "driver": f[1], "memory_mib": f[2],
                    "sampled_with": "nvidia-smi"}
        return {"gpu": "none found (no NVML, no nvidia-smi)", "sampled_with": "n/a"}

    def sample(self) -> tuple[float, float] | None:
        if self.backend == "nvml":
            n, h = self._nvml, self._handle
            return (float(n.nvmlDeviceGetUtilizationRates(h).gpu),
                    n.nvmlDeviceGetMemoryInfo(h).used / 2**20)
        if self.backend == "nvidia-smi":
            f = self._smi()
            return (float(f[3]), float(f[4])) if f else None
        return None


class Sampler:
    """``with Sampler(gpu) as s: ...`` then ``s.summary()``: mean/min utilisation, peak memory."""

    def __init__(self, gpu: Gpu, interval: float = 0.2) -> None:
        self.gpu, self.interval = gpu, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            s = self.gpu.sample()
            if s is None:
                return
            self.samples.append(s)
            time.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {"gpu_busy_pct": None, "gpu_mem_peak_mib": None, "gpu_samples": 0}
        util = [u for u, _ in self.samples]
        return {"gpu_busy_pct": round(sum(util) / len(util), 1),
                "gpu_busy_min_pct": min(util),
                "gpu_mem_peak_mib": round(max(m for _, m in self.samples)),
                "gpu_samples": len(self.samples)}
