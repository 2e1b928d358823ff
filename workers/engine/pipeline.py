"""The engine: encoded images in, API results out, with decoding overlapped with inference.

Why threads: Pillow's decoders and resize release the GIL, and so does ONNX Runtime while it
runs, so a small pool that downloads, decodes and letterboxes the next images while the main
thread runs the model keeps the model busy without extra processes or copies between them.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from posebatch.errors import INTERNAL_ERROR, ConfigError, ImageError, RetryableError
from posebatch.schema import PoseResult, error_result
from posebatch.settings import JobSettings
from workers.engine.backends import Runner
from workers.engine.batches import Batch, BatchPool
from workers.engine.decode import DecodedImage, Limits, decode_image
from workers.engine.keypoints import to_api21
from workers.engine.layouts import Detections
from workers.engine.letterbox import Letterbox, fit, input_shape_for, to_source_xy, write_input
from workers.engine.topdown import TopDownModel
from workers.engine.tta import decode_side, infer_best, passes

log = logging.getLogger(__name__)

CPU_BATCH = 4  # bench: batch 4 gives batch 8's img/s on CPU with ~250 MB less peak memory
CUDA_BATCH = 32  # a GPU needs large batches to fill its cores

Loader = Callable[[], "bytes | DecodedImage"]
"""Returns the encoded bytes of one image (or its pixels, from the Python API's arrays); may
raise RetryableError (storage) or ImageError."""


@dataclass
class Prepared:
    """One image after its decode thread: its model input, or an error.

    The input is either ``tensor (3, H, W) float32`` of its own (``prepare``) or row ``slot`` of
    ``batch`` (the engine's own path, ``PoseEngine.run_images``).
    """

    key: str
    tensor: np.ndarray | None = None
    image: DecodedImage | None = None
    box: Letterbox | None = None
    error: dict[str, Any] | None = None
    batch: Batch | None = None
    slot: int = -1


def _input_hw(image: DecodedImage, job: JobSettings,
              fixed_hw: tuple[int, int] | None) -> tuple[int, int]:
    if fixed_hw is not None:
        return fixed_hw
    if job.rect:
        return input_shape_for(image.rgb.shape[:2], job.imgsz)
    return (job.imgsz, job.imgsz)


def prepare(key: str, load: Loader, job: JobSettings,
            fixed_hw: tuple[int, int] | None, pool: BatchPool | None = None) -> Prepared:
    """Fetch, validate, decode and letterbox one image; never raises for a bad image.

    With ``pool`` the model input goes into a slot of one of its batches, else into a tensor of
    its own (for callers that batch themselves: ``posebatch serve``).
    """
    try:
        data = load()
        image = data if isinstance(data, DecodedImage) else decode_image(
            data, Limits(job.max_image_bytes, job.min_side, job.max_side),
            target=decode_side(job.quality, job.imgsz),
        )
        resized, box = fit(image.rgb, _input_hw(image, job, fixed_hw))
        if pool is None:
            tensor = np.empty((3, *box.out_hw), np.float32)
            write_input(resized, box, tensor)
            return Prepared(key, tensor=tensor, image=image, box=box)
        batch, slot = pool.claim(box.out_hw)
        write_input(resized, box, batch.array[slot])
        return Prepared(key, image=image, box=box, batch=batch, slot=slot)
    except ImageError as err:
        return Prepared(key, error=error_result(err.code, err.message))
    except (RetryableError, ConfigError):  # the storage's problem, not this image's
        raise
    except Exception as err:  # a decoder bug on one file must not take the batch down
        log.exception("unexpected error preparing %s", key)
        return Prepared(key, error=error_result(INTERNAL_ERROR, f"internal error: {err}"))


def to_result(det: Detections, item: Prepared) -> PoseResult:
    """Model pixels -> upright original pixels, then the 21 API keypoints, clamped."""
    assert item.image is not None and item.box is not None
    sx, sy = item.image.scale_xy
    scale = np.array([sx, sy], dtype=np.float32)
    kpts = det.kpts.copy()
    kpts[..., :2] = to_source_xy(det.kpts[..., :2], item.box) * scale
    corners = det.boxes_xyxy.reshape(-1, 2, 2)
    boxes = (to_source_xy(corners, item.box) * scale).reshape(-1, 4)
    return PoseResult(
        kpts=to_api21(kpts), boxes_xyxy=boxes, box_scores=det.scores,
        width=item.image.width, height=item.image.height,
    ).clamped()


class PoseEngine:
    """Batches prepared images by input shape and runs them through one model runner."""

    def __init__(self, model: Runner | TopDownModel, job: JobSettings, batch_size: int = 0,
                 io_threads: int = 4) -> None:
        self.model = model
        self.job = job
        auto = CUDA_BATCH if model.on_cuda else CPU_BATCH
        self.batch_size = model.info.fixed_batch or batch_size or auto
        self.io_threads = io_threads

    def infer_group(self, group: list[Prepared]) -> list[tuple[str, dict[str, Any]]]:
        """One model call on prepared images of one input shape, at most ``batch_size`` of them.

        For callers that gather their own batches (``posebatch serve``): the same inference and
        result code as ``run``, so both give the same persons for the same image.
        """
        return [(key, result) for key, result, _image in self._infer(group)]

    def run(self, items: Iterable[tuple[str, Loader]]) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(key, api_result)`` for every item, in no particular order."""
        return ((key, result) for key, result, _image in self.run_images(items))

    def run_images(self, items: Iterable[tuple[str, Loader]]
                   ) -> Iterator[tuple[str, dict[str, Any], DecodedImage | None]]:
        """Like ``run``, plus the decoded image (None for an error result): its upright size goes
        to the count table, its pixels to an optional overlay."""
        ahead = self.batch_size * 2 + self.io_threads
        pool = BatchPool(self.batch_size)
        open_batches: list[Batch] = []
        with ThreadPoolExecutor(self.io_threads, thread_name_prefix="decode") as threads:
            futures: deque[Future[Prepared]] = deque()
            source = iter(items)
            exhausted = False
            while futures or not exhausted:
                while not exhausted and len(futures) < ahead:
                    nxt = next(source, None)
                    if nxt is None:
                        exhausted = True
                        break
                    key, load = nxt
                    futures.append(threads.submit(prepare, key, load, self.job,
                                                  self.model.info.fixed_hw, pool))
                if not futures:
                    break
                item = futures.popleft().result()
                if item.error is not None:
                    yield item.key, item.error, None
                    continue
                assert item.batch is not None
                batch = item.batch
                if not batch.seen:
                    open_batches.append(batch)
                batch.seen.append(item)
                # Any batch may have become ready: its last slot can be claimed after this one.
                for ready in [b for b in open_batches if b.ready()]:
                    open_batches.remove(ready)
                    yield from self._infer_batch(ready, pool)
            for batch in open_batches:
                yield from self._infer_batch(batch, pool)

    def _infer_batch(self, batch: Batch, pool: BatchPool
                     ) -> Iterator[tuple[str, dict[str, Any], DecodedImage | None]]:
        group = sorted(batch.seen, key=lambda p: p.slot)
        try:
            results = list(self._infer(group, batch.array[:len(group)]))
        finally:
            pool.release(batch)
        yield from results

    def _infer(self, group: list[Prepared], batch: np.ndarray | None = None
               ) -> Iterator[tuple[str, dict[str, Any], DecodedImage | None]]:
        if batch is None:
            batch = np.stack([p.tensor for p in group])  # type: ignore[misc]
        images = [p.image.rgb for p in group if p.image is not None]
        boxes = [p.box for p in group if p.box is not None]
        flip, scale = passes(self.job.quality)
        if flip or scale:
            # A graph with a fixed input size cannot run a second scale.
            dets = infer_best(self._run, batch, images, boxes, self.job.imgsz, self.job.rect,
                              self.job.max_persons, flip=flip,
                              scale=scale and self.model.info.fixed_hw is None)
        else:
            dets = self._run(batch)
        if isinstance(self.model, TopDownModel):
            dets = self.model.refine(dets, images, boxes, flip=flip)
        for det, item in zip(dets, group, strict=False):
            yield item.key, to_result(det, item).to_api(), item.image

    def _run(self, batch: np.ndarray) -> list[Detections]:
        """Model calls of at most ``batch_size`` images (padded where the model or the device
        wants full batches), one Detections per image of ``batch``."""
        full = self.model.info.fixed_batch or (
            self.batch_size if self.model.wants_fixed_batches else 0)
        out: list[Detections] = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            if full and len(chunk) < full:
                fill = np.zeros((full - len(chunk), *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, fill])
            dets = self.model.infer(chunk, self.job.det_conf, self.job.nms_iou,
                                    self.job.max_persons)
            out += dets[:min(len(chunk), len(batch) - start)]
        return out
