"""Where the annotated development set lives (SPEC: shared/data/dev), if anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def dev_data_dir() -> Path | None:
    for cand in (os.environ.get("POSEBATCH_DEV_DATA"), ROOT.parent / "shared" / "data" / "dev",
                 Path("/work/shared/data/dev")):
        if cand and (Path(cand) / "annotations.json").is_file():
            return Path(cand)
    return None


def require_dev_data() -> Path:
    """The dev set, or skip: it is not part of the repository (its images keep their licences)."""
    path = dev_data_dir()
    if path is None:
        pytest.skip("dev set not found; set POSEBATCH_DEV_DATA to shared/data/dev")
    return path
