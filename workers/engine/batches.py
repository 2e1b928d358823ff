"""Batch tensors that decode threads write into directly, reused from batch to batch.

Why: stacking one float tensor per image into a batch copied every pixel twice more and touched
fresh memory for each (page faults: ``np.stack`` of four 640x640 tensors took 26 ms on a 2-core
VM, more than the model's share of a core for one image). Here each decode thread claims a slot
of the batch of its image's input shape and writes the model input there; a batch's memory is
allocated once and handed out again after its inference.

Slots are claimed in the order images finish decoding, which is not the order the caller reads
them: a batch is ready when all its slots are claimed and the caller has seen every image in it
(``Batch.ready``). Claims never wait, so no decode thread can block the caller; the number of
batches alive is bounded by the images in flight.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(eq=False)
class Batch:
    """``array (size, 3, H, W)`` float32 or uint8 (the model's input); ``claimed`` slots are
    being or have been written."""

    array: np.ndarray
    hw: tuple[int, int]
    claimed: int = 0
    seen: list[Any] = field(default_factory=list)
    """What the caller has received for this batch's slots (filled by the caller's thread)."""

    @property
    def size(self) -> int:
        return int(self.array.shape[0])

    def ready(self, *, final: bool = False) -> bool:
        """All slots claimed (or, with ``final``, no more images coming) and all of them seen."""
        return (final or self.claimed == self.size) and len(self.seen) == self.claimed > 0


class BatchPool:
    """Hands out ``(batch, slot)`` per input shape; ``release`` returns a batch for reuse."""

    def __init__(self, size: int, dtype: type = np.float32) -> None:
        if size < 1:
            raise ValueError(f"expected a batch size >= 1, got {size}")
        self.size = size
        self.dtype = dtype
        self._filling: dict[tuple[int, int], Batch] = {}
        self._free: dict[tuple[int, int], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def claim(self, hw: tuple[int, int]) -> tuple[Batch, int]:
        """A free slot in the batch of shape ``hw`` being filled; a new batch when it is full."""
        with self._lock:
            batch = self._filling.get(hw)
            if batch is None or batch.claimed == batch.size:
                free = self._free.get(hw)
                array = free.pop() if free else self._alloc(hw)
                batch = self._filling[hw] = Batch(array, hw)
            slot = batch.claimed
            batch.claimed += 1
            return batch, slot

    def _alloc(self, hw: tuple[int, int]) -> np.ndarray:
        """A new batch's memory (workers.engine.decodeproc.SharedBatchPool: shared memory)."""
        return np.empty((self.size, 3, *hw), self.dtype)

    def reset(self) -> None:
        """Forget the batches being filled (a run ended early): their memory is free again."""
        with self._lock:
            for hw, batch in self._filling.items():
                self._free.setdefault(hw, []).append(batch.array)
            self._filling.clear()

    def release(self, batch: Batch) -> None:
        """``batch``'s inference is over: its memory serves a later batch of the same shape."""
        with self._lock:
            if self._filling.get(batch.hw) is batch:
                del self._filling[batch.hw]
            self._free.setdefault(batch.hw, []).append(batch.array)
