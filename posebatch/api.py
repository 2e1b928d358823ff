"""posebatch as a Python library: ``Pose().predict(source)`` in a notebook or a pipeline.

Why on the engine of ``posebatch run``: the same decode threads, batches, model call and result
code, so ``predict_api`` gives exactly the JSON ``run`` writes (``log_id`` aside) and ``predict``
the same persons, typed (``posebatch.schema.PoseResult``). A front door like the command line: it
may import the workers' engine, the core never imports it.

    from posebatch import Pose

    pose = Pose()                                    # the default model, as `posebatch run`
    for result in pose.predict("photos/"):           # a folder, a file, a list, bytes, arrays
        print(result.source, len(result), result.xy.shape)   # (n, 21, 2)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from posebatch.errors import BAD_FORMAT, BAD_SIZE, ImageError
from posebatch.schema import Failure, PoseResult, read_result
from posebatch.settings import JobSettings, RuntimeSettings

Source = Any
"""A path (file or folder, ``str`` or ``os.PathLike``), encoded bytes, an ``(h, w, 3)`` uint8
array, a PIL image, or an iterable of these."""


class Pose:
    """One opened model and its engine; open once, call ``predict`` as often as needed.

    ``model``, ``backend``, ``precision``, ``providers``: as ``posebatch run``'s flags (None and
    ``auto``: the same defaults). Other keyword arguments are job settings (``imgsz``,
    ``quality``, ``det_conf``, ``valid_kpt_score``, ...: ``posebatch.settings.JobSettings``).
    """

    def __init__(self, model: str | os.PathLike[str] | None = None, *, backend: str = "auto",
                 precision: str = "auto", providers: str = "auto", batch_size: int = 0,
                 io_threads: int = 0, **job: Any) -> None:
        from workers.engine.pipeline import PoseEngine
        from workers.loading import open_model, runner_label, select_model

        self.job = JobSettings(precision=precision, backend=backend, **job)
        runtime = self.job.pinned_runtime(RuntimeSettings(
            model=None if model is None else os.fspath(model), providers=providers,
            batch_size=batch_size, io_threads=io_threads))
        sel = select_model(runtime)
        runner = open_model(runtime, sel.ref, sel.trt_present, sel.backend)
        self.model = sel.ref
        """Which file runs (path, sha256, name, precision)."""
        self.runner = runner_label(runner, sel.ref)
        """Backend, precision and device, e.g. ``openvino bf16 cpu``."""
        self._engine = PoseEngine(runner, self.job, runtime.batch_size,
                                  runtime.io_threads_for(local=True), decode=runtime.decode)

    def predict(self, source: Source, *, channels: str = "rgb"
                ) -> Iterator[PoseResult | Failure]:
        """Typed results in input order: a ``PoseResult`` per image (``.boxes_xyxy (n, 4)``,
        ``.box_scores (n,)``, ``.xy (n, 21, 2)``, ``.scores (n, 21)``, ``.valid()``), or a
        ``Failure`` with the error code and message a file would get. ``channels``: ``rgb`` or
        ``bgr`` (OpenCV's order), for arrays only."""
        for key, result, size in self._run(source, channels):
            typed = read_result(result, *size)
            yield _with_source(typed, key)

    def predict_api(self, source: Source, *, channels: str = "rgb") -> Iterator[dict[str, Any]]:
        """The API's JSON dicts, exactly as ``posebatch run`` writes them, in input order."""
        for _key, result, _size in self._run(source, channels):
            yield result

    def _run(self, source: Source, channels: str
             ) -> Iterator[tuple[str | None, dict[str, Any], tuple[int | None, int | None]]]:
        if channels not in ("rgb", "bgr"):
            raise ValueError(f"channels must be 'rgb' or 'bgr', got {channels!r}")
        names: dict[str, str | None] = {}

        def loaders() -> Iterator[tuple[str, Any]]:
            for index, (name, load) in enumerate(self._items(source, channels)):
                names[str(index)] = name
                yield str(index), load

        done: dict[int, tuple[dict[str, Any], Any]] = {}
        nxt = 0
        for key, result, image in self._engine.run_images(loaders()):
            done[int(key)] = (result, image)
            while nxt in done:  # the engine finishes out of order; hand results on in order
                result, image = done.pop(nxt)
                size = (None, None) if image is None else (image.width, image.height)
                yield names.pop(str(nxt)), result, size
                nxt += 1

    def _items(self, source: Source, channels: str) -> Iterator[tuple[str | None, Any]]:
        if isinstance(source, (str, os.PathLike)):
            yield from self._paths(os.fspath(source))
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            yield None, lambda: data
        elif isinstance(source, np.ndarray) or _is_pil(source):
            yield None, self._pixels(source, channels)
        elif isinstance(source, Iterable):
            for item in source:
                yield from self._items(item, channels)
        else:
            yield None, _refuse(f"not an image: a {type(source).__name__} (expected a path, "
                                "bytes, an (h, w, 3) uint8 array or a PIL image)")

    def _paths(self, path: str) -> Iterator[tuple[str, Any]]:
        """A folder: its images as ``posebatch run`` selects them; a file: itself (any name)."""
        from posebatch.selection import open_input, select_keys
        from workers.batch import image_loader

        if not os.path.lexists(path):
            yield path, _refuse(f"no image data: {path} does not exist", code=None)
            return
        src, single = open_input(path)
        keys = [single] if single is not None else select_keys(src)
        for key in keys:
            yield (path if single is not None else os.path.join(path, key),
                   image_loader(src, key, self.job.max_image_bytes))

    def _pixels(self, image: Any, channels: str) -> Any:
        """An array or PIL image as decoded pixels, checked by the input rules on sides."""
        from workers.engine.decode import DecodedImage

        job = self.job

        def load() -> DecodedImage:
            if _is_pil(image):
                from PIL import ImageOps

                rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
            else:
                rgb = image
                if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                    raise ImageError(BAD_FORMAT, f"not an image: expected an array of shape "
                                     f"(h, w, 3) and dtype uint8, got {rgb.shape} {rgb.dtype}")
                if channels == "bgr":
                    rgb = rgb[..., ::-1]
            h, w = rgb.shape[:2]
            if min(w, h) < job.min_side or max(w, h) > job.max_side:
                raise ImageError(BAD_SIZE, f"image is {w}x{h}; sides must be from "
                                 f"{job.min_side} to {job.max_side} px")
            return DecodedImage(np.ascontiguousarray(rgb), w, h, (1.0, 1.0))

        return load


def _is_pil(obj: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(obj, Image.Image)


def _refuse(message: str, code: int | None = BAD_FORMAT) -> Any:
    from posebatch.errors import EMPTY_IMAGE

    def load() -> bytes:
        raise ImageError(EMPTY_IMAGE if code is None else code, message)

    return load


def _with_source(result: PoseResult | Failure, source: str | None) -> PoseResult | Failure:
    import dataclasses

    return dataclasses.replace(result, source=source)
