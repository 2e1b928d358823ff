"""Where a run's time goes: seconds per pipeline stage, added up from every thread.

Why built in and not a profiler: the question "is the model's thread the bottleneck, or decoding,
or writing?" has to be answerable on any run (a worker's metrics, a bench line, ``-vv``) at no
cost worth measuring: a ``perf_counter`` pair and one locked add per stage and image or batch.

Stages, in pipeline order (the thread that runs each in brackets):

- ``fetch`` read the encoded bytes from storage [decode threads]
- ``decode`` validate the header and decode the pixels [decode threads]
- ``resize`` letterbox resize [decode threads]
- ``copy_in`` write the letterboxed pixels into the batch tensor [decode threads]
- ``infer`` the model call, input upload and output allocation included [model thread]
- ``copy_out`` device -> host copy of the outputs (I/O binding only) [model thread]
- ``post`` decode the outputs, NMS, back to image pixels, 21 keypoints [model thread]
- ``hand_on`` what the model thread does per result after that: hand it to a writer [model thread]
- ``encode`` the API dict and its JSON bytes [writer threads]
- ``write`` store the JSON [writer threads]

``MODEL_THREAD`` stages are serial, the others run on several threads at once: the model thread's
seconds per image bound the throughput (1 / that = its ceiling in images per second).
"""

from __future__ import annotations

import threading
from time import perf_counter
from typing import Any

STAGES: tuple[str, ...] = ("fetch", "decode", "resize", "copy_in", "infer", "copy_out", "post",
                           "hand_on", "encode", "write")
MODEL_THREAD: tuple[str, ...] = ("infer", "copy_out", "post", "hand_on")

__all__ = ["MODEL_THREAD", "STAGES", "StageTimer", "perf_counter"]


class StageTimer:
    """Seconds per stage plus images and batches seen; ``add`` may be called from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.images = 0
        self.batches = 0
        self.model_cpu = 0.0
        """CPU seconds of the model's thread in ``infer`` + ``post`` (``time.thread_time``):
        below their wall seconds when that thread waits for the GIL or the cores."""

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds

    def add_many(self, seconds: dict[str, float]) -> None:
        """Several stages' seconds at once (one lock for a thread's share of a batch)."""
        with self._lock:
            for stage, value in seconds.items():
                self.seconds[stage] += value

    def add_batch(self, images: int, infer: float, post: float, copy_out: float = 0.0,
                  cpu: float = 0.0) -> None:
        """One model call's share: its images, inference, copy-out and post-processing, and the
        model thread's CPU seconds for them."""
        with self._lock:
            self.images += images
            self.batches += 1
            self.model_cpu += cpu
            self.seconds["infer"] += infer
            self.seconds["copy_out"] += copy_out
            self.seconds["post"] += post

    def snapshot(self) -> dict[str, Any]:
        """``{"images", "batches", "seconds": {stage: s}}``, consistent at one instant."""
        with self._lock:
            return {"images": self.images, "batches": self.batches,
                    "model_thread_cpu": self.model_cpu, "seconds": dict(self.seconds)}

    def since(self, before: dict[str, Any]) -> dict[str, Any]:
        """What was added after ``before`` (a ``snapshot``): one task's share of a worker's."""
        now = self.snapshot()
        return {"images": now["images"] - before["images"],
                "batches": now["batches"] - before["batches"],
                "model_thread_cpu": now["model_thread_cpu"] - before["model_thread_cpu"],
                "seconds": {k: v - before["seconds"].get(k, 0.0)
                            for k, v in now["seconds"].items()}}


def summary(snap: dict[str, Any]) -> dict[str, Any]:
    """A snapshot plus milliseconds per image per stage and the model thread's total."""
    n = max(1, snap["images"])
    ms = {k: round(1000 * v / n, 4) for k, v in snap["seconds"].items()}
    model = sum(snap["seconds"][k] for k in MODEL_THREAD)
    return {**snap, "ms_per_image": ms, "model_thread_ms_per_image": round(1000 * model / n, 4),
            "model_thread_cpu_ms_per_image": round(1000 * snap["model_thread_cpu"] / n, 4)}
