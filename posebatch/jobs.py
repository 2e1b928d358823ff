"""What identifies a job's output: which files are images, and the output manifest.

Why a manifest: "skip images whose result already exists for the same model" needs to know which
model and settings wrote the existing results. One small ``_posebatch.json`` per output prefix
records that; a run with another model or other settings is refused unless ``--force``.
"""

from __future__ import annotations

import json
from typing import Any

from posebatch.errors import ConfigError, StorageNotFound
from posebatch.settings import JobSettings
from posebatch.storage import Storage

MANIFEST_NAME = "_posebatch.json"

# Files with these extensions are treated as images. Formats the API does not accept (GIF, WebP,
# TIFF, ...) are listed on purpose: they get an error result instead of being silently skipped.
IMAGE_SUFFIXES = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff",
    ".heic", ".heif", ".avif", ".jp2",
)


def is_image_key(key: str) -> bool:
    return key.lower().endswith(IMAGE_SUFFIXES)


def manifest(model_sha256: str, model_name: str, job: JobSettings) -> dict[str, Any]:
    return {"model_sha256": model_sha256, "model_name": model_name, "settings": job.to_dict()}


def claim_output(dst: Storage, wanted: dict[str, Any], force: bool) -> None:
    """Write the manifest, refusing to mix results of different models/settings in one output."""
    try:
        current = json.loads(dst.read(MANIFEST_NAME))
    except StorageNotFound:
        current = None
    except ValueError:
        current = None
    if current is not None and not force:
        same = (current.get("model_sha256") == wanted["model_sha256"]
                and current.get("settings") == wanted["settings"])
        if not same:
            raise ConfigError(
                f"{dst.join(MANIFEST_NAME)} says this output holds results of model "
                f"{current.get('model_name')} ({str(current.get('model_sha256'))[:12]}) with "
                f"settings {current.get('settings')}; this run uses "
                f"{wanted['model_name']} ({wanted['model_sha256'][:12]}) with "
                f"{wanted['settings']}. Use another --out, or --force to reprocess everything."
            )
    dst.write(MANIFEST_NAME, (json.dumps(wanted, indent=2) + "\n").encode(), "application/json")
