"""Rebuild an output's aggregates from the per-image results it holds, without the model.

Why: annotation users tune the valid-person rule (``--valid-box-score`` and friends) after
seeing results. Those thresholds change only the counts, never a per-image result, so recounting
reads every ``<image>.json`` once instead of running the model again (``run --force``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from posebatch.aggregate import SUMMARY_NAME
from posebatch.errors import ConfigError, StorageNotFound
from posebatch.keys import RESULT_SUFFIX, image_key_of
from posebatch.manifest import COUNT_ONLY_SETTINGS, MANIFEST_NAME, check_output, read_manifest
from posebatch.records import Record, record_from_result
from posebatch.roottables import INDEX_NAME, write_base
from posebatch.schema import is_api_result
from posebatch.settings import JobSettings
from posebatch.storage import Storage

READ_THREADS = 8
BOOKKEEPING = (MANIFEST_NAME, SUMMARY_NAME, INDEX_NAME)
JOBS_FOLDER = "_jobs/"  # per-round summaries of `watch`: not results


def records_from_output(dst: Storage, job: JobSettings) -> Iterator[Record]:
    """A record for every posebatch result below ``dst``; other JSON files are not counted."""

    def load(key: str) -> Record | None:
        try:
            result = json.loads(dst.read(key))
        except (StorageNotFound, ValueError):
            return None
        image = image_key_of(key, job.result_layout)
        if image is None or not is_api_result(result):
            return None
        return record_from_result(image, result, job)

    keys = (k for k in dst.iter_keys(suffixes=(RESULT_SUFFIX,))
            if k not in BOOKKEEPING and not k.startswith(JOBS_FOLDER))
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="recount") as pool:
        while chunk := list(islice(keys, 256)):
            yield from (r for r in pool.map(load, chunk) if r is not None)


def recount(dst: Storage, thresholds: dict[str, Any]) -> dict[str, Any]:
    """Write new ``_summary.json``/``_counts.csv`` with ``thresholds`` (``valid_*`` settings;
    None keeps the output's own); return the summary. The tables cover every result, so they
    are the new base and the index of pending per-job tables (``roottables``) is emptied."""
    current = read_manifest(dst)
    if current is None:
        raise ConfigError(f"{dst.join(MANIFEST_NAME)} not found: {dst.url} holds no results of "
                          "`posebatch run` or `submit`")
    check_output(dst, current)  # refuses an output left mixed by an unfinished --force
    chosen = {k: v for k, v in thresholds.items() if k in COUNT_ONLY_SETTINGS and v is not None}
    job = JobSettings.from_dict({**current.get("settings", {}), **chosen})
    records = list(records_from_output(dst, job))
    meta = _previous_meta(dst)
    meta.update({"recounted": datetime.now(UTC).isoformat(timespec="seconds"),
                 "settings": job.to_dict()})
    if current.get("model_sha256"):
        meta["model"] = {"name": current.get("model_name"), "sha256": current["model_sha256"]}
    summary = write_base(dst, records, meta)  # every result's row: pending tables are moot
    if chosen:  # the manifest says which thresholds the counts use
        record = {**current, "settings": job.to_dict()}
        dst.write(MANIFEST_NAME, (json.dumps(record, indent=2) + "\n").encode(),
                  "application/json")
    return summary


def _previous_meta(dst: Storage) -> dict[str, Any]:
    try:
        old = json.loads(dst.read(SUMMARY_NAME))
    except (StorageNotFound, ValueError):
        return {"output": dst.url}
    return {k: old[k] for k in ("job_id", "input", "output", "created", "finished", "model")
            if k in old}
