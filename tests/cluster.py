"""Real ``posebatch worker`` processes for cluster and fault tests, plus small S3 helpers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.servers import ServerProcess, wait_for

CLI = [sys.executable, "-m", "posebatch.cli"]


class WorkerProcess(ServerProcess):
    """``posebatch worker`` (Celery prefork, one child) with a log file; killable as a group."""

    name = "worker"
    ready_timeout = 60.0
    stop_timeout = 20.0

    def __init__(self, workdir: Path, env: dict[str, str], index: int = 0) -> None:
        self.name = f"worker{index}"
        super().__init__(workdir)
        self.env = env

    def command(self) -> list[str]:
        return [*CLI, "worker", "--loglevel", "INFO", "--hostname", f"{self.name}@%h"]

    def child_env(self) -> dict[str, str]:
        return {**os.environ, "POSEBATCH_INTRA_THREADS": "1", "POSEBATCH_IO_THREADS": "2",
                **self.env}

    def ready(self) -> None:
        text = self.log_path.read_text(errors="replace")
        marker = text.rsplit("=== start", 1)[-1]
        if " ready." not in marker:
            raise RuntimeError("not ready yet")

    def kill(self) -> None:
        """SIGKILL the whole process group: the Celery parent and its pool child (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)

    def stop(self, timeout: float | None = None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def processed_batches(self) -> int:
        return self.log_path.read_text(errors="replace").count("succeeded in")


def run_cli(*args: str, env: dict[str, str], timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})
    if check and proc.returncode != 0:
        raise AssertionError(f"posebatch {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def upload_tree(client: Any, bucket: str, prefix: str, root: Path) -> list[str]:
    keys = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        client.put_object(Bucket=bucket, Key=prefix + rel, Body=path.read_bytes())
        keys.append(rel)
    return keys


def download_results(client: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Every ``*.json`` under prefix (result files and the summary), parsed, by relative key."""
    out = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".json"):
                body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                out[obj["Key"][len(prefix):]] = json.loads(body)
    return out


def without_log_id(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {k: {f: v for f, v in r.items() if f != "log_id"} for k, r in results.items()
            if not k.startswith("_")}


def comparable_summary(summary: dict[str, Any]) -> dict[str, Any]:
    from posebatch.aggregate import RUN_FIELDS

    return {k: v for k, v in summary.items() if k not in RUN_FIELDS}


def wait_until(predicate, timeout: float, what: str) -> None:
    def check() -> None:
        if not predicate():
            raise RuntimeError(what)

    err = wait_for(check, timeout)
    if err is not None:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
