"""Where the annotated development set (SPEC: ``shared/data/dev``) lives, if anywhere.

Why one locator: tests, calibration, bench and the keypoint fit all need the same folder, and it
is not part of the repository (its images keep their own licences). ``POSEBATCH_DEV_DATA`` wins;
otherwise ``shared/data/dev`` beside the repository or beside one of its parent folders (a git
worktree sits one level deeper than the main checkout).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def dev_data_dir() -> Path | None:
    """The dev set folder (holding ``annotations.json`` and ``images/``), or None."""
    env = os.environ.get("POSEBATCH_DEV_DATA")
    candidates = [Path(env)] if env else []
    candidates += [parent / "shared" / "data" / "dev" for parent in REPO_ROOT.parents]
    for cand in candidates:
        if (cand / "annotations.json").is_file():
            return cand
    return None
