"""Dynamic batching: requests that arrive together share one model call.

Why: on a GPU (and, less so, on a CPU) one call on a batch of N images costs far less than N
calls, but an HTTP client sends one image at a time. Each request is decoded in a thread pool
(Pillow releases the GIL), then queued; one loop takes up to ``max_batch`` queued images, waiting
at most ``max_wait_ms`` for more when the queue runs dry, and runs them through the same
``prepare``/``infer_group`` code as ``posebatch run``, so both give the same persons. While the
model runs, new requests queue up and form the next batch. ``max_pending`` bounds the requests
admitted at once (reading, decoding, queued or in the model): past it a request is refused at
once with a clear error, instead of waiting behind an ever longer queue.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any

from posebatch.errors import INTERNAL_ERROR
from posebatch.schema import error_result
from workers.engine.pipeline import Loader, PoseEngine, Prepared, prepare

log = logging.getLogger(__name__)

Pending = tuple[Prepared, "asyncio.Future[dict[str, Any]]"]
"""A prepared image and the future its request awaits."""


class Overloaded(Exception):
    """More requests are in flight than ``max_pending``; the caller should retry later."""


class Batcher:
    """Gathers prepared images into batches for one engine; one model call at a time."""

    def __init__(self, engine: PoseEngine, *, max_batch: int, max_wait_ms: float,
                 max_pending: int, decode_threads: int,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        fixed = engine.model.info.fixed_batch
        self.engine = engine
        self.max_batch = min(max_batch, fixed) if fixed else max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_pending = max_pending
        self.pending = 0
        self._on_batch = on_batch or (lambda _n, _s: None)
        self._ids = itertools.count()
        self._decode = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self._model = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._queue: asyncio.Queue[Pending] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        self._decode.shutdown(wait=False, cancel_futures=True)
        self._model.shutdown(wait=True)

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of ``max_pending`` slots for the whole request, or raise Overloaded."""
        if self.pending >= self.max_pending:
            raise Overloaded(f"server busy: {self.pending} requests in flight (limit "
                             f"{self.max_pending}); retry shortly")
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def analyse(self, load: Loader) -> dict[str, Any]:
        """The API result for one image: persons, or an error result.

        ``load`` runs in the decode pool and returns the image bytes, or raises ImageError with
        the API's code (empty, too large, bad base64), like the engine's loaders in ``run``.
        """
        loop = asyncio.get_running_loop()
        key = f"request-{next(self._ids)}"
        job = self.engine.job
        fixed_hw = self.engine.model.info.fixed_hw
        item = await loop.run_in_executor(self._decode, prepare, key, load, job, fixed_hw)
        if item.error is not None:
            return item.error
        assert self._queue is not None, "Batcher.start() was not called"
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._queue.put_nowait((item, fut))
        return await fut

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        batch.append(await self._queue.get())
                except TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # client gone
            for group in _by_shape(live):
                await self._run_group(loop, group)

    async def _run_group(self, loop: asyncio.AbstractEventLoop, group: list[Pending]) -> None:
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._model, self._infer,
                                                 [item for item, _ in group])
        except Exception:
            log.exception("model call on a batch of %d failed", len(group))
            results = {item.key: error_result(INTERNAL_ERROR, "internal error: the model "
                                              "failed on this batch; see the server log")
                       for item, _ in group}
        self._on_batch(len(group), time.perf_counter() - started)
        for item, fut in group:
            if not fut.done():
                fut.set_result(results[item.key])

    def _infer(self, items: list[Prepared]) -> dict[str, dict[str, Any]]:
        return dict(self.engine.infer_group(items))


def _by_shape(batch: list[Pending]) -> Iterable[list[Pending]]:
    """One model call needs one input shape (``--rect`` letterboxes to several)."""
    groups: dict[tuple[int, ...], list[Pending]] = {}
    for item, fut in batch:
        assert item.tensor is not None
        groups.setdefault(item.tensor.shape, []).append((item, fut))
    return groups.values()
