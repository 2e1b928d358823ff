"""The output manifest, ``OUTPUT/_posebatch.json``: which model and settings made the results.

Why a manifest: "skip images whose result already exists" is only right when those results were
made by the same model with the same settings. One small file per output prefix records that; a
run with another model or other settings is refused unless ``--force``. (The job's state in Redis,
for cluster runs, is ``posebatch.jobstate``; this file lives in the output storage.)
"""

from __future__ import annotations

import json
from typing import Any

from posebatch.errors import ConfigError, StorageNotFound
from posebatch.settings import JobSettings
from posebatch.storage import Storage

MANIFEST_NAME = "_posebatch.json"


def manifest(job: JobSettings, model_sha256: str | None = None,
             model_name: str | None = None) -> dict[str, Any]:
    """What a run claims; without a model (``submit``: the workers pick it) only the settings."""
    wanted: dict[str, Any] = {"settings": job.to_dict()}
    if model_sha256 is not None:
        wanted = {"model_sha256": model_sha256, "model_name": model_name, **wanted}
    return wanted


def read_manifest(dst: Storage) -> dict[str, Any] | None:
    try:
        return json.loads(dst.read(MANIFEST_NAME))
    except (StorageNotFound, ValueError):
        return None


def check_output(dst: Storage, wanted: dict[str, Any]) -> None:
    """Refuse when OUTPUT holds results of another model or other settings than ``wanted``.

    Only the fields ``wanted`` names are compared, so ``submit`` (settings only) and a run
    (model and settings) go through the same rule.
    """
    current = read_manifest(dst)
    if current is None:
        return
    differs = [name for name in ("model_sha256", "settings")
               if name in wanted and current.get(name) != wanted[name]]
    if differs:
        model = (f"model {current.get('model_name')} ({str(current.get('model_sha256'))[:12]}), "
                 if "model_sha256" in wanted else "")
        mine = (f"{wanted.get('model_name')} ({str(wanted.get('model_sha256'))[:12]}), "
                if "model_sha256" in wanted else "")
        raise ConfigError(
            f"{dst.join(MANIFEST_NAME)} says this output holds results of {model}settings "
            f"{current.get('settings')}; this run uses {mine}settings {wanted['settings']}. "
            "Use another --out, or --force to reprocess everything."
        )


def claim_output(dst: Storage, wanted: dict[str, Any], force: bool) -> None:
    """Check (unless ``force``), then write the manifest."""
    if not force:
        check_output(dst, wanted)
    dst.write(MANIFEST_NAME, (json.dumps(wanted, indent=2) + "\n").encode(), "application/json")
