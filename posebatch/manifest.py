"""The output manifest, ``OUTPUT/_posebatch.json``: which model and settings made the results.

Why a manifest: "skip images whose result already exists" is only right when those results were
made by the same model with the same settings. One small file per output prefix records that; a
run with another model or other settings is refused unless ``--force``. (The job's state in Redis,
for cluster runs, is ``posebatch.jobstate``; this file lives in the output storage.)

Two rules keep it honest:

- A ``--force`` run that changes the model or the settings writes the manifest with
  ``"complete": false`` (and what it replaces) *before* it rewrites any result, and sets it to
  true only after every image has its new result. Until then the output holds results of two
  settings, and every run without ``--force`` is refused with a message that says so: an
  interrupted ``--force`` can never be taken for a finished one.
- A run claims the output only when it is about to write its first result (``claim_output`` is
  called then; ``check_output`` refuses early without writing): a run that failed before (a bad
  model file, a missing input) leaves the output as it was.
- The claim of a new output is atomic (``Storage.create``: a hard link on a folder, a
  conditional PUT ``If-None-Match: *`` on S3): of two runs with other settings that start into
  one new output at the same moment, exactly one creates the manifest and the other is refused.
  A run that wrote nothing (every result existed) never claimed, so ``run`` checks the manifest
  once more at its end (``check_output``), before it writes a summary.

The validity thresholds (``valid_*``) change only the counts, which every run recomputes from all
results, so they are recorded but not compared: ``posebatch recount`` and a run with a stricter
``--valid-box-score`` reuse the results.
"""

from __future__ import annotations

import json
import time
from typing import Any

from posebatch.errors import ConfigError, StorageNotFound
from posebatch.settings import JobSettings
from posebatch.storage import Storage

MANIFEST_NAME = "_posebatch.json"
COUNT_ONLY_SETTINGS = ("valid_kpt_score", "valid_min_kpts", "valid_box_score")
CLAIM_ATTEMPTS = 3
"""Creates tried while the manifest is absent yet cannot be created: another run's write in
flight (S3 409), or a manifest that is not JSON (then it is overwritten, as before)."""
PINS_BEFORE_THEY_EXISTED = {"precision": "auto", "backend": "auto"}


def manifest(job: JobSettings, model_sha256: str | None = None,
             model_name: str | None = None, runner: str | None = None) -> dict[str, Any]:
    """What a run claims; without a model (``submit``: the workers pick it) only the settings.

    ``runner`` (backend, precision and device that made the results, e.g. ``openvino bf16
    cpu``) is recorded for the reader, not compared: the job's settings say whether it was
    pinned."""
    wanted: dict[str, Any] = {"settings": job.to_dict()}
    if model_sha256 is not None:
        wanted = {"model_sha256": model_sha256, "model_name": model_name, **wanted}
    if runner is not None:
        wanted["runner"] = runner
    return wanted


def read_manifest(dst: Storage) -> dict[str, Any] | None:
    try:
        current = json.loads(dst.read(MANIFEST_NAME))
    except (StorageNotFound, ValueError):
        return None
    return current if isinstance(current, dict) else None


def result_settings(settings: Any) -> dict[str, Any]:
    """The settings that change per-image results (not only the counts)."""
    if not isinstance(settings, dict):
        return {}
    # Manifests written before precision and backend were job settings ran with ``auto``.
    settings = {**PINS_BEFORE_THEY_EXISTED, **settings}
    return {k: v for k, v in settings.items() if k not in COUNT_ONLY_SETTINGS}


def _differs(current: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    out = []
    if "model_sha256" in wanted and current.get("model_sha256") != wanted["model_sha256"]:
        out.append("model")
    if result_settings(current.get("settings")) != result_settings(wanted["settings"]):
        out.append("settings")
    return out


def _describe(m: dict[str, Any]) -> str:
    model = (f"model {m.get('model_name')} ({str(m.get('model_sha256'))[:12]}), "
             if m.get("model_sha256") else "")
    return f"{model}settings {result_settings(m.get('settings'))}"


def check_output(dst: Storage, wanted: dict[str, Any]) -> None:
    """Refuse when OUTPUT holds results of another model or other settings than ``wanted``, or
    is in the middle of an unfinished ``--force`` change. Writes nothing.

    Only the fields ``wanted`` names are compared, so ``submit`` (settings only) and a run
    (model and settings) go through the same rule.
    """
    _refuse(dst, read_manifest(dst), wanted)


def _refuse(dst: Storage, current: dict[str, Any] | None, wanted: dict[str, Any]) -> None:
    if current is None:
        return
    where = dst.join(MANIFEST_NAME)
    if current.get("complete") is False:
        before = current.get("replacing") or {}
        raise ConfigError(
            f"{where} says a --force run that replaced the results of {_describe(before)} with "
            f"{_describe(current)} did not finish: this output holds results of both. Rerun "
            "with --force to finish it (every image is redone), or use another --out.")
    if _differs(current, wanted):
        raise ConfigError(
            f"{where} says this output holds results of {_describe(current)}; this run uses "
            f"{_describe(wanted)}. Use another --out, or --force to reprocess everything.")


def claim_output(dst: Storage, wanted: dict[str, Any], force: bool) -> None:
    """Check (unless ``force``), then write the manifest; call it just before the first result
    is written. A ``--force`` change of model or settings is marked unfinished until
    ``complete_output``."""
    current = read_manifest(dst)
    for _ in range(CLAIM_ATTEMPTS):
        if current is not None:
            break
        if dst.create(MANIFEST_NAME, _encode({**wanted, "complete": True}), "application/json"):
            return  # created: no other run holds this output
        # Another run created it first (or is creating it): its claim is the one to check.
        current = read_manifest(dst)
        if current is None:
            time.sleep(0.2)  # its PUT still in flight (S3 409)
    if not force:
        _refuse(dst, current, wanted)
    if force and current is not None and (current.get("complete") is False
                                          or _differs(current, wanted)):
        # What the output held before the first unfinished change, kept across retries.
        replacing = current.get("replacing") or {
            k: current.get(k) for k in ("model_sha256", "model_name", "settings")}
        record = {**wanted, "complete": False, "replacing": replacing}
    else:
        record = {**wanted, "complete": True}
    if current is not None and {**record, "runner": None} == {**current, "runner": None}:
        return  # claimed already (another worker process of the same job): no write
    _write(dst, record)


def complete_output(dst: Storage, wanted: dict[str, Any]) -> None:
    """Every image has a result of ``wanted``: clear an unfinished ``--force`` mark."""
    current = read_manifest(dst)
    if current is not None and current.get("complete") is False and not _differs(current, wanted):
        _write(dst, {**wanted, "complete": True})


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


def _write(dst: Storage, record: dict[str, Any]) -> None:
    dst.write(MANIFEST_NAME, _encode(record), "application/json")
