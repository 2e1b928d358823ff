"""``posebatch export``: a finished job's results as COCO, YOLO, CVAT or Label Studio files.

Why it reads only storage: an export needs no model and no worker, runs anywhere the output is
readable, and takes image sizes from the count table instead of decoding images again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posebatch.errors import ConfigError
from posebatch.exports.base import ImageItem, Writer, persons_of
from posebatch.exports.coco import CocoWriter
from posebatch.exports.cvat import CvatWriter
from posebatch.exports.images import ImagePlacer
from posebatch.exports.labelstudio import LabelStudioWriter
from posebatch.exports.source import JobOutput
from posebatch.exports.yolo import YoloWriter
from posebatch.imagesize import upright_size
from posebatch.records import valid_flags
from posebatch.schema import PoseResult
from posebatch.storage import LocalStorage, Storage

FORMATS = ("coco", "yolo", "cvat", "labelstudio")
DEFAULT_IMAGES = {"coco": "none", "yolo": "link", "cvat": "link", "labelstudio": "none"}


@dataclass
class ExportOptions:
    fmt: str
    dest: Path
    all_persons: bool = False
    kpt_threshold: float | None = None
    """Keypoints scoring at least this are visible; default: the job's valid-keypoint score."""
    images: str | None = None
    """link, copy or none; default per format (DEFAULT_IMAGES)."""
    val_fraction: float = 0.0
    image_url: str | None = None
    force: bool = False


@dataclass
class ExportResult:
    images: int = 0
    persons: int = 0
    sizes_read: int = 0
    files: list[str] = field(default_factory=list)


def export(output_url: str, opts: ExportOptions, *, storage: Storage | None = None
           ) -> ExportResult:
    if opts.fmt not in FORMATS:
        raise ConfigError(f"unknown format {opts.fmt!r}; expected one of {', '.join(FORMATS)}")
    if str(opts.dest).startswith("s3://"):
        raise ConfigError("--to must be a local folder: annotation tools and `yolo train` read "
                          "local files (copy it to a bucket afterwards if you need to)")
    if not 0.0 <= opts.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {opts.val_fraction} must be in [0, 1)")
    job_out = JobOutput(output_url, storage)
    job = job_out.job_settings()
    threshold = job.valid_kpt_score if opts.kpt_threshold is None else opts.kpt_threshold
    _prepare_dest(opts.dest, opts.force)
    src = job_out.input_storage()
    writer = _writer(opts, job_out, src)
    result = ExportResult()
    for row, api in job_out.results(job_out.rows()):
        width, height = row.width, row.height
        if width is None or height is None:
            width, height = _size_from_source(src, row.key)
            result.sizes_read += 1
        typed = PoseResult.from_api(api, width, height)
        chosen = (range(len(typed)) if opts.all_persons
                  else np.flatnonzero(valid_flags(typed, job)).tolist())
        persons = persons_of(typed, chosen, threshold)
        writer.add(ImageItem(row.key, width, height, persons))
        result.images += 1
        result.persons += len(persons)
    result.files = writer.close()
    return result


def _writer(opts: ExportOptions, job_out: JobOutput, src: Storage | None) -> Writer:
    mode = opts.images or DEFAULT_IMAGES[opts.fmt]
    summary = job_out.summary
    model = summary.get("model", {}).get("name", "posebatch")
    if opts.fmt == "coco":
        info = {"description": f"posebatch export of {job_out.storage.url}",
                "job_id": summary.get("job_id"), "model": summary.get("model"),
                "settings": job_out.settings}
        return CocoWriter(opts.dest, info)
    if opts.fmt == "yolo":
        from posebatch.evaluate import SIGMAS
        from posebatch.exports.skeleton import NAMES

        return YoloWriter(opts.dest, ImagePlacer(src, mode), opts.val_fraction,
                          [SIGMAS[n] for n in NAMES], overwrite=opts.force)
    if opts.fmt == "cvat":
        return CvatWriter(opts.dest, ImagePlacer(src, mode), f"posebatch {summary.get('job_id')}",
                          int(summary.get("succeeded", 0)))
    return LabelStudioWriter(opts.dest, opts.image_url or default_image_url(src), model)


def default_image_url(src: Storage | None) -> str:
    """Where Label Studio finds an image: the S3 URL for a bucket input (Label Studio signs it
    through a connected S3 storage), else its local-files URL below the filesystem root
    (start Label Studio with LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=/)."""
    if src is None:
        return ""
    if isinstance(src, LocalStorage):
        return "/data/local-files/?d=" + src.root.lstrip("/") + "/"
    return src.url


def _size_from_source(src: Storage | None, key: str) -> tuple[int, int]:
    if src is None:
        raise ConfigError(f"no image size recorded for {key} and the job names no input to "
                          f"read it from; re-run the job with this posebatch version")
    return upright_size(src.read(key))


def _prepare_dest(dest: Path, force: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"--to {dest} is a file; give a folder")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise ConfigError(f"--to {dest} is not empty; give a new folder, or --force to write "
                          f"into it (files of an earlier export may remain)")
    os.makedirs(dest, exist_ok=True)


def describe(result: ExportResult) -> dict[str, Any]:
    return {"images": result.images, "persons": result.persons, "files": result.files,
            "sizes_read_from_images": result.sizes_read}
