"""The dev set for tests: found by ``posebatch.devdata``, skipped when absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from posebatch.devdata import dev_data_dir


def require_dev_data() -> Path:
    """The dev set, or skip: it is not part of the repository (its images keep their licences)."""
    path = dev_data_dir()
    if path is None:
        pytest.skip("dev set not found; set POSEBATCH_DEV_DATA to shared/data/dev")
    return path
