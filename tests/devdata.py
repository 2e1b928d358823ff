"""The dev set and the default model for tests: skipped when absent locally, failed on CI.

Both go through ``posebatch.testing.servers.skip_or_fail``, the rule the server binaries follow
too: on CI (``CI=true``) a test that lacks what it needs fails instead of passing by skipping.
"""

from __future__ import annotations

from pathlib import Path

from posebatch.devdata import dev_data_dir
from posebatch.testing.servers import skip_or_fail


def require_dev_data() -> Path:
    """The dev set: it is not part of the repository (its images keep their licences)."""
    path = dev_data_dir()
    if path is None:
        skip_or_fail("dev set not found; set POSEBATCH_DEV_DATA to shared/data/dev")
    return path


def require_model() -> Path:
    """The default model, built by `make model` (`make test` builds it first)."""
    from posebatch.modelstore import default_model_path
    from posebatch.settings import RuntimeSettings, from_env

    path = default_model_path(from_env(RuntimeSettings).cache_dir)
    if not path.is_file():
        skip_or_fail("default model not built; run `make model`")
    return path
