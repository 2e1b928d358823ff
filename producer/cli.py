"""Cluster subcommands of ``posebatch`` (submit, status, wait, watch, worker, beat)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_cluster_commands(sub: argparse._SubParsersAction, add_job_flags: Callable,
                         add_runtime_flags: Callable) -> None:
    """Filled in by the cluster work; kept separate so the producer stays importable alone."""
    return None
