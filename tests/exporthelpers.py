"""Shared by the export tests: the CLI as a subprocess, results read back, the build Python."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from posebatch.testing.servers import skip_or_fail

CLI = [sys.executable, "-m", "posebatch.cli"]
REPO = Path(__file__).resolve().parents[1]
PX_TOL = 0.01  # pixel formats agree with the per-image results within this
PCT_TOL = 0.01  # percent formats (Label Studio): within this many percent


def posebatch(*args: str, env: dict[str, str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"posebatch {args} exited {proc.returncode}:\n{proc.stderr}")
    return proc


def counts(out: Path) -> list[dict[str, str]]:
    with open(out / "_counts.csv", encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def ok_results(out: Path) -> dict[str, dict[str, Any]]:
    """Per-image results of the images that succeeded, by key."""
    return {r["key"]: json.loads((out / (r["key"] + ".json")).read_text())
            for r in counts(out) if r["status"] == "ok"}


def build_python() -> str:
    """The model-build environment's Python (Ultralytics lives only there): POSEBATCH_BUILD_PYTHON,
    else .venv-build in this checkout or in the main checkout of this git repository. Skipped
    locally when missing, a failure on CI (CI=true), as for the server binaries."""
    candidates = [os.environ.get("POSEBATCH_BUILD_PYTHON", "")]
    roots = [REPO]
    try:
        common = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--git-common-dir"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
        if common:
            roots.append((REPO / common).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        pass
    candidates += [str(root / ".venv-build" / "bin" / "python") for root in roots]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    skip_or_fail("no model-build environment (.venv-build with ultralytics; `make build-env`)")


def is_valid_person(person: dict, job) -> bool:
    """The seed's rule read straight off the JSON: the tests' own oracle, independent of the
    typed result the exports use."""
    confident = sum(1 for part in person["body_parts"].values()
                    if part["score"] > job.valid_kpt_score)
    return confident > job.valid_min_kpts and person["location"]["score"] > job.valid_box_score
