"""``posebatch run``: a whole job in this process, through the same batch function as the cluster.

Why it streams: the listing is consumed lazily and results are written as they come, so a folder
of a million images needs memory for the records only, and an interrupted run resumes (existing
results are skipped) instead of starting over.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from posebatch.aggregate import write_aggregates
from posebatch.keys import is_image_key
from posebatch.manifest import claim_output, manifest
from posebatch.modelstore import ModelRef, resolve_model
from posebatch.records import Record
from posebatch.settings import JobSettings, RuntimeSettings
from posebatch.storage import Storage
from workers.batch import process_keys
from workers.engine.pipeline import PoseEngine
from workers.engine.topdown import open_model


@dataclass(frozen=True)
class RunOutcome:
    summary: dict[str, Any]
    seconds: float


def iter_images(src: Storage) -> Iterator[str]:
    return (k for k in src.iter_keys() if is_image_key(k))


def run_job(src: Storage, dst: Storage, model: ModelRef, job: JobSettings,
            runtime: RuntimeSettings, *, force: bool = False,
            progress: bool | None = None, job_id: str = "local",
            overlays: bool = False) -> RunOutcome:
    from tqdm import tqdm

    wanted = manifest(job, model.sha256, model.name)
    claim_output(dst, wanted, force)
    pose = open_model(str(model.path), runtime.providers, runtime.intra_threads,
                      runtime.detector, lambda: str(resolve_model(None, runtime.cache_dir).path))
    engine = PoseEngine(pose, job, runtime.batch_size, runtime.io_threads)
    created = _now()
    total = sum(1 for _ in iter_images(src)) if src.url.startswith("/") else None
    show = sys.stderr.isatty() if progress is None else progress
    started = time.monotonic()
    with tqdm(total=total, unit="img", disable=not show, dynamic_ncols=True) as bar:
        records: list[Record] = process_keys(
            engine, src, dst, iter_images(src), skip_existing=not force,
            on_record=lambda _r: bar.update(1), overlays=overlays,
        )
    meta = {"job_id": job_id, "input": src.url, "output": dst.url, "created": created,
            "finished": _now(), "model": {"name": model.name, "sha256": model.sha256},
            "settings": job.to_dict()}
    summary = write_aggregates(dst, records, meta)
    return RunOutcome(summary, time.monotonic() - started)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
