"""The engine: encoded images in, API results out, with decoding overlapped with inference.

Why threads: Pillow's decoders and resize release the GIL, and so does ONNX Runtime while it
runs, so a small pool that downloads, decodes and letterboxes the next images while the main
thread runs the model keeps the model busy without extra processes or copies between them.

Why decode processes too (``decode_workers``, workers.engine.decodeproc): the Python around
the decoders does not release the GIL, and on small images it made decoding, the model's thread
and the writers take turns on one core. With processes the threads only fetch the bytes and
wait; the pixels are written into shared-memory batches by the processes.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from time import thread_time
from typing import Any

import numpy as np

from posebatch.errors import INTERNAL_ERROR, ConfigError, ImageError, RetryableError
from posebatch.schema import PoseResult, error_result
from posebatch.settings import JobSettings
from workers.engine.backends import Runner
from workers.engine.batches import Batch, BatchPool
from workers.engine.decode import DecodedImage, JpegPixels, Limits, decode_image
from workers.engine.decodeproc import DecodeProcs, SharedBatchPool
from workers.engine.keypoints import to_api21
from workers.engine.layouts import Detections, PersonBatch
from workers.engine.letterbox import Letterbox, fit, input_shape_for, write_input
from workers.engine.nvdecode import open_decoder
from workers.engine.runner import LAYOUT_YOLO_RAW
from workers.engine.stages import StageTimer, perf_counter
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
            fixed_hw: tuple[int, int] | None, pool: BatchPool | None = None,
            timer: StageTimer | None = None, jpeg: JpegPixels | None = None) -> Prepared:
    """Fetch, validate, decode and letterbox one image; never raises for a bad image.

    With ``pool`` the model input goes into a slot of one of its batches, else into a tensor of
    its own (for callers that batch themselves: ``posebatch serve``). ``timer`` gets the
    fetch, decode, resize and copy-in seconds. ``jpeg``: the JPEG pixel decoder of
    ``--decode gpu`` (``decode_image``).
    """
    t0 = perf_counter()
    t1 = t2 = t3 = t0
    try:
        data = load()
        t1 = perf_counter()
        image = data if isinstance(data, DecodedImage) else decode_image(
            data, Limits(job.max_image_bytes, job.min_side, job.max_side),
            target=decode_side(job.quality, job.imgsz), jpeg=jpeg,
        )
        t2 = perf_counter()
        resized, box = fit(image.rgb, _input_hw(image, job, fixed_hw))
        t3 = perf_counter()
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
    finally:
        if timer is not None:
            t4 = perf_counter()
            timer.add_many({"fetch": t1 - t0, "decode": max(0.0, t2 - t1),
                            "resize": max(0.0, t3 - t2),
                            "copy_in": max(0.0, t4 - t3) if t3 > t0 else 0.0})


NO_PIXELS = np.empty((0, 0, 3), np.uint8)
"""``DecodedImage.rgb`` of an image decoded in a process: its pixels are in the batch only."""


def prepare_in_process(key: str, load: Loader, job: JobSettings, hw: tuple[int, int],
                       pool: SharedBatchPool, procs: DecodeProcs,
                       timer: StageTimer | None = None) -> Prepared:
    """``prepare`` with the decoding in a decode process (on a fetch thread, which waits).

    The slot is claimed before decoding (the input shape is fixed on this path), so an image
    that turns out bad leaves a hole in its batch: its Prepared has both the error and the slot
    (``PoseEngine`` skips it). Never raises for a bad image.
    """
    t0 = perf_counter()
    try:
        data = load()
    except ImageError as err:
        return Prepared(key, error=error_result(err.code, err.message))
    except (RetryableError, ConfigError):
        raise
    except Exception as err:
        log.exception("unexpected error reading %s", key)
        return Prepared(key, error=error_result(INTERNAL_ERROR, f"internal error: {err}"))
    finally:
        if timer is not None:
            timer.add("fetch", perf_counter() - t0)
    if isinstance(data, DecodedImage):  # pixels already (the Python API): letterbox here
        return prepare(key, lambda: data, job, hw, pool, timer)
    batch, slot = pool.claim(hw)
    array = batch.array
    header = (pool.segment(batch), array.shape, array.dtype.str, slot, hw,
              (job.max_image_bytes, job.min_side, job.max_side),
              decode_side(job.quality, job.imgsz))
    answer = procs.decode(header, data)
    if answer[0] != "ok":
        if timer is not None:
            timer.add("decode", answer[2])
        return Prepared(key, error=answer[1], batch=batch, slot=slot)
    (_, width, height, sx, sy, scale, pad_x, pad_y, _h, _w,
     t_decode, t_resize, t_copy) = answer
    if timer is not None:
        timer.add("decode", t_decode)
        timer.add("resize", t_resize)
        timer.add("copy_in", t_copy)
    return Prepared(key, image=DecodedImage(NO_PIXELS, width, height, (sx, sy)),
                    box=Letterbox(scale, pad_x, pad_y, hw), batch=batch, slot=slot)


def to_results(persons: PersonBatch, items: list[Prepared]) -> list[PoseResult]:
    """Model pixels -> upright original pixels, then the 21 API keypoints, clamped: for every
    person of a batch in one set of array operations, one PoseResult per item.

    The arithmetic is the per-image one's (``(xy - pad) / scale`` in the keypoints' dtype, then
    float32 times the decode scale), so the results are the same to the bit.
    """
    assert all(p.image is not None and p.box is not None for p in items)
    boxes_lb = [p.box for p in items]
    images = [p.image for p in items]
    idx = persons.image
    dt = persons.kpts.dtype
    pad = np.array([(b.pad_x, b.pad_y) for b in boxes_lb], np.float64).astype(dt)[idx]
    lb_scale = np.array([b.scale for b in boxes_lb], np.float64).astype(dt)[idx]
    src_scale = np.array([im.scale_xy for im in images], np.float32)[idx]  # type: ignore[union-attr]
    size = np.array([(im.width, im.height) for im in images], np.float32)[idx]  # type: ignore[union-attr]

    kpts = persons.kpts.copy()
    xy = ((persons.kpts[..., :2] - pad[:, None, :]) / lb_scale[:, None, None]).astype(np.float32)
    kpts[..., :2] = xy * src_scale[:, None, :]
    corners = persons.boxes_xyxy.reshape(-1, 2, 2)
    bdt = corners.dtype
    cxy = ((corners - pad.astype(bdt)[:, None, :]) / lb_scale.astype(bdt)[:, None, None]
           ).astype(np.float32)
    boxes = (cxy * src_scale[:, None, :]).reshape(-1, 4)

    k = to_api21(kpts)  # float32 (m, 21, 3)
    k[..., 0] = np.clip(k[..., 0], 0, size[:, None, 0] - 1)
    k[..., 1] = np.clip(k[..., 1], 0, size[:, None, 1] - 1)
    k[..., 2] = np.clip(k[..., 2], 0, 1)
    b = boxes.copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, size[:, :1])
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, size[:, 1:])
    scores = np.clip(persons.scores, 0, 1)

    ends = np.cumsum(persons.counts).tolist()  # slices, not np.split: 3 of them per batch
    return [PoseResult(k[a:z], b[a:z], scores[a:z], im.width, im.height)  # type: ignore[union-attr]
            for a, z, im in zip([0, *ends[:-1]], ends, images, strict=True)]


def to_result(det: Detections, item: Prepared) -> PoseResult:
    """Model pixels -> upright original pixels, then the 21 API keypoints, clamped."""
    return to_results(PersonBatch.from_list([det]), [item])[0]


Result = PoseResult | dict[str, Any]
"""What the engine hands on per image: persons (``PoseResult``; ``api_result`` makes the API dict)
or an error result dict. The dict and its JSON are made by whoever writes it, off the model's
thread."""


def api_result(result: Result) -> dict[str, Any]:
    """The API dict of an engine result."""
    return result.to_api() if isinstance(result, PoseResult) else result


class PoseEngine:
    """Batches prepared images by input shape and runs them through one model runner.

    ``stages`` adds up the seconds of every stage of every run (workers.engine.stages).
    """

    def __init__(self, model: Runner | TopDownModel, job: JobSettings, batch_size: int = 0,
                 io_threads: int = 4, decode_workers: int = 0, decode: str = "cpu") -> None:
        self.model = model
        self.job = job
        auto = CUDA_BATCH if model.on_cuda else CPU_BATCH
        self.batch_size = model.info.fixed_batch or batch_size or auto
        self.io_threads = io_threads
        self.stages = StageTimer()
        # A runner with a uint8 input gets uint8 batches (4x less written per pixel);
        # others, any runner without the attributes, and the paths that transform batches
        # themselves (best quality, top-down), float32 RGB in [0, 1].
        plain = not any(passes(job.quality)) and not isinstance(model, TopDownModel)
        uint8 = plain and getattr(model, "input_dtype", np.float32) == np.uint8
        self.input_dtype: type = np.uint8 if uint8 else np.float32
        self.decode_workers = decode_workers
        """Decode processes (0: decode on the io threads); used where the input shape is known
        before decoding (``process_hw``), else the threads decode."""
        self._pool = (SharedBatchPool(self.batch_size, self.input_dtype) if decode_workers
                      else BatchPool(self.batch_size, self.input_dtype))
        """Batch memory, reused by every run of this engine."""
        self._jpeg: JpegPixels | None = open_decoder(decode, model.on_cuda)
        """JPEG pixels by nvImageCodec (``--decode gpu``, or auto's choice), on the model's GPU
        when it has one (workers.engine.nvdecode); None: the CPU decodes. With it the io
        threads decode: no decode processes."""
        self._procs: DecodeProcs | None = None
        self._told_threads = False
        self._decoders: ThreadPoolExecutor | None = None
        self._writers: ThreadPoolExecutor | None = None

    def infer_group(self, group: list[Prepared]) -> list[tuple[str, dict[str, Any]]]:
        """One model call on prepared images of one input shape, at most ``batch_size`` of them.

        For callers that gather their own batches (``posebatch serve``): the same inference and
        result code as ``run``, so both give the same persons for the same image.
        """
        return [(item.key, result.to_api()) for item, result in self._infer(group)]

    def run(self, items: Iterable[tuple[str, Loader]]) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield ``(key, api_result)`` for every item, in no particular order."""
        return ((key, api_result(result)) for key, result, _image in self.run_results(items))

    def run_images(self, items: Iterable[tuple[str, Loader]]
                   ) -> Iterator[tuple[str, dict[str, Any], DecodedImage | None]]:
        """Like ``run``, plus the decoded image (None for an error result): its upright size goes
        to the count table, its pixels to an optional overlay."""
        return ((key, api_result(result), image)
                for key, result, image in self.run_results(items))

    def process_hw(self) -> tuple[int, int] | None:
        """The input shape every image gets when it is known before decoding (no ``rect``), and
        the result needs no more than the batch (no best-quality passes, no top-down model: they
        read the decoded pixels): where decode processes can write the batch. Else None."""
        if not self.decode_workers or self._jpeg is not None or any(passes(self.job.quality)) \
                or isinstance(self.model, TopDownModel):
            return None
        fixed = self.model.info.fixed_hw
        if fixed is not None:
            return tuple(fixed)  # type: ignore[return-value]
        return None if self.job.rect else (self.job.imgsz, self.job.imgsz)

    def run_results(self, items: Iterable[tuple[str, Loader]], *, pixels: bool = False
                    ) -> Iterator[tuple[str, Result, DecodedImage | None]]:
        """Like ``run_images``, with persons as ``PoseResult`` (``api_result`` makes the dict):
        the caller makes dicts and JSON on its own threads, the model's thread only infers.

        ``pixels``: the caller reads ``DecodedImage.rgb`` (overlays), so the images are decoded
        on the threads; otherwise, with ``decode_workers``, in the decode processes, and
        ``rgb`` is empty (``NO_PIXELS``)."""
        for group in self.run_batches(items, pixels=pixels):
            yield from group

    def run_batches(self, items: Iterable[tuple[str, Loader]], *, pixels: bool = False
                    ) -> Iterator[list[tuple[str, Result, DecodedImage | None]]]:
        """``run_results`` a model batch at a time (an image that failed before the model: a
        list of its own), so the caller hands each batch on to a writer at once: one hand-over
        per batch instead of one per image."""
        hw = None if pixels else self.process_hw()
        if self.decode_workers and hw is None and not self._told_threads:
            self._told_threads = True
            log.warning("--decode-workers %d: this run decodes in threads instead; decode "
                        "processes need the same input shape for every image and nothing "
                        "but the batch (no --rect, --quality fast, no top-down model, no "
                        "overlays) and --decode cpu", self.decode_workers)
        workers = self.io_threads if hw is None else self._fetchers()
        ahead = self.batch_size * 2 + workers
        pool = self._pool
        threads = self.decoders()
        procs = self.procs() if hw is not None else None
        open_batches: list[Batch] = []
        futures: deque[Future[Prepared]] = deque()
        try:
            source = iter(items)
            exhausted = False
            while futures or not exhausted:
                while not exhausted and len(futures) < ahead:
                    nxt = next(source, None)
                    if nxt is None:
                        exhausted = True
                        break
                    key, load = nxt
                    if procs is not None:
                        futures.append(threads.submit(prepare_in_process, key, load, self.job,
                                                      hw, pool, procs, self.stages))
                    else:
                        futures.append(threads.submit(prepare, key, load, self.job,
                                                      self.model.info.fixed_hw, pool,
                                                      self.stages, self._jpeg))
                if not futures:
                    break
                item = futures.popleft().result()
                if item.error is not None:
                    yield [(item.key, item.error, None)]
                    if item.batch is None:
                        continue  # a hole (decoded in a process): its batch still counts it
                assert item.batch is not None
                batch = item.batch
                if not batch.seen:
                    open_batches.append(batch)
                batch.seen.append(item)
                # Any batch may have become ready: its last slot can be claimed after this one.
                for ready in [b for b in open_batches if b.ready()]:
                    open_batches.remove(ready)
                    yield self._infer_batch(ready, pool)
            for batch in open_batches:
                yield self._infer_batch(batch, pool)
        finally:
            # Left early (an error, a closed generator): the decode threads outlive this run, so
            # wait for what they still do and forget the half-filled batches, as leaving a
            # ``with ThreadPoolExecutor`` did, before the next run uses the same pool.
            for fut in futures:
                fut.cancel()
            for fut in futures:
                if not fut.cancelled():
                    fut.exception()
            pool.reset()

    def decoders(self) -> ThreadPoolExecutor:
        """The decode threads, made on first use and kept for every later run (a worker runs
        one engine for all its batch tasks: workers.state.engine). With decode processes they
        fetch and wait for a process: several per process, so each has its next images queued
        while its last answer waits for the GIL here."""
        if self._decoders is None:
            self._decoders = ThreadPoolExecutor(self._fetchers(), thread_name_prefix="decode")
        return self._decoders

    def _fetchers(self) -> int:
        return max(self.io_threads, 4 * self.decode_workers)

    def procs(self) -> DecodeProcs:
        """The decode processes, started on first use and kept like ``decoders``."""
        if self._procs is None:
            self._procs = DecodeProcs(self.decode_workers)
        return self._procs

    def writers(self) -> ThreadPoolExecutor:
        """Threads for the results' dicts, JSON and writes (workers.batch), kept like
        ``decoders``."""
        if self._writers is None:
            self._writers = ThreadPoolExecutor(self.io_threads, thread_name_prefix="write")
        return self._writers

    def close(self) -> None:
        """Stop the engine's threads (they are daemon-like: a process may also just exit)."""
        for pool in (self._decoders, self._writers):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._decoders = self._writers = None
        if self._procs is not None:
            self._procs.close()
            self._procs = None

    def _infer_batch(self, batch: Batch, pool: BatchPool
                     ) -> list[tuple[str, Result, DecodedImage | None]]:
        group = sorted(batch.seen, key=lambda p: p.slot)
        try:
            real = [p for p in group if p.error is None]
            if len(real) == len(group):
                results = self._infer(group, batch.array[:len(group)])
            else:  # holes: bad images whose slots were claimed before decoding (processes)
                results = self._infer(real, batch.array[[p.slot for p in real]]) if real else []
        finally:
            pool.release(batch)
        return [(item.key, result, item.image) for item, result in results]

    def _infer(self, group: list[Prepared], batch: np.ndarray | None = None
               ) -> list[tuple[Prepared, PoseResult]]:
        if batch is None:
            batch = np.stack([p.tensor for p in group])  # type: ignore[misc]
        flip, scale = passes(self.job.quality)
        t0, c0 = perf_counter(), thread_time()
        if flip or scale or isinstance(self.model, TopDownModel):
            images = [p.image.rgb for p in group if p.image is not None]
            boxes = [p.box for p in group if p.box is not None]
            if flip or scale:
                # A graph with a fixed input size cannot run a second scale.
                dets = infer_best(self._run, batch, images, boxes, self.job.imgsz,
                                  self.job.rect, self.job.max_persons, flip=flip,
                                  scale=scale and self.model.info.fixed_hw is None)
            else:
                dets = self._run(batch)
            if isinstance(self.model, TopDownModel):
                dets = self.model.refine(dets, images, boxes, flip=flip)
            persons = PersonBatch.from_list(dets)
            infer = perf_counter() - t0
        else:
            persons, infer = self._run_persons(batch)
        results = to_results(persons, group)
        self.stages.add_batch(len(group), infer, perf_counter() - t0 - infer,
                              cpu=thread_time() - c0)
        return list(zip(group, results, strict=True))

    def _chunks(self, batch: np.ndarray) -> Iterator[tuple[np.ndarray, int]]:
        """Model-call inputs of at most ``batch_size`` images (padded where the model or the
        device wants full batches), each with how many of its images are real."""
        full = self.model.info.fixed_batch or (
            self.batch_size if self.model.wants_fixed_batches else 0)
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            real = len(chunk)
            if full and len(chunk) < full:
                fill = np.zeros((full - len(chunk), *chunk.shape[1:]), dtype=chunk.dtype)
                chunk = np.concatenate([chunk, fill])
            yield chunk, real

    def _run(self, batch: np.ndarray) -> list[Detections]:
        """One Detections per image of ``batch``, through the runner's own ``infer``."""
        out: list[Detections] = []
        for chunk, real in self._chunks(batch):
            dets = self.model.infer(chunk, self.job.det_conf, self.job.nms_iou,
                                    self.job.max_persons)
            out += dets[:real]
        return out

    def _run_persons(self, batch: np.ndarray) -> tuple[PersonBatch, float]:
        """The persons of ``batch`` and the seconds spent in the model itself. The raw YOLO-pose
        head (or its best candidates, ``output_tail``) is decoded for the whole batch at once
        (``Head.persons``); other layouts
        through the runner's ``infer`` (their seconds count as inference)."""
        raw = getattr(self.model.info, "layout", None) == LAYOUT_YOLO_RAW
        parts: list[PersonBatch] = []
        infer = 0.0
        for chunk, real in self._chunks(batch):
            t0 = perf_counter()
            if raw:
                head = self.model.run_head(chunk)
                infer += perf_counter() - t0
                parts.append(head.persons(real, self.job.det_conf, self.job.nms_iou,
                                          self.job.max_persons))
            else:
                dets = self.model.infer(chunk, self.job.det_conf, self.job.nms_iou,
                                        self.job.max_persons)
                infer += perf_counter() - t0
                parts.append(PersonBatch.from_list(dets[:real]))
        return (parts[0] if len(parts) == 1 else PersonBatch.concat(parts)), infer
