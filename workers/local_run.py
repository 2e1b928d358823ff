"""``posebatch run``: a whole job in this process, through the same batch function as the cluster.

Why it streams: the listing is consumed lazily and results are written as they come, so a folder
of a million images needs memory for the records only, and an interrupted run resumes (existing
results are skipped) instead of starting over.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from posebatch.manifest import check_output, claim_output, complete_output, manifest
from posebatch.modelstore import ModelRef
from posebatch.records import Record
from posebatch.roottables import write_base
from posebatch.selection import Selection, select_keys
from posebatch.settings import JobSettings, RuntimeSettings
from posebatch.storage import Storage
from workers.batch import process_keys
from workers.engine.pipeline import PoseEngine
from workers.engine.stages import summary as stage_summary
from workers.loading import open_model, runner_label

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    summary: dict[str, Any]
    seconds: float


def iter_images(src: Storage, selection: Selection | None = None) -> Iterator[str]:
    return select_keys(src, selection or Selection())


def run_job(src: Storage, dst: Storage, model: ModelRef, job: JobSettings,
            runtime: RuntimeSettings, *, force: bool = False,
            progress: bool | None = None, job_id: str = "local",
            selection: Selection | None = None, overlays: bool = False) -> RunOutcome:
    from tqdm import tqdm

    runtime = job.pinned_runtime(runtime)
    if not force:  # refuse before the model loads; claim at the first write
        check_output(dst, manifest(job, model.sha256, model.name))
    runner = open_model(runtime, model)
    label = runner_label(runner, model)
    wanted = manifest(job, model.sha256, model.name, label)
    engine = PoseEngine(runner, job, runtime.batch_size,
                        runtime.io_threads_for(local=src.url.startswith("/")),
                        runtime.decode_workers, runtime.decode)
    created = _now()
    total = (sum(1 for _ in iter_images(src, selection))
             if src.url.startswith("/") or (selection and selection.keys is not None)
             else None)
    show = sys.stderr.isatty() if progress is None else progress
    started = time.monotonic()
    with tqdm(total=total, unit="img", disable=not show, dynamic_ncols=True) as bar:
        records: list[Record] = process_keys(
            engine, src, dst, iter_images(src, selection), skip_existing=not force,
            on_record=lambda _r: bar.update(1), overlays=overlays,
            before_first_write=lambda: claim_output(dst, wanted, force),
        )
    engine.close()
    log.debug("stages: %s", json.dumps(stage_summary(engine.stages.snapshot())))
    complete_output(dst, wanted)
    # A run that wrote nothing (every result existed) never claimed the output: another run
    # with other settings may have claimed it meanwhile. Refuse before the summary is written.
    check_output(dst, wanted)
    meta = {"job_id": job_id, "input": src.url, "output": dst.url, "created": created,
            "finished": _now(), "model": {"name": model.name, "sha256": model.sha256},
            "runners": [label], "settings": job.to_dict()}
    summary = write_base(dst, records, meta, src=src)  # the whole input's rows: a new base
    return RunOutcome(summary, time.monotonic() - started)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
