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

from posebatch.testing.servers import ServerProcess, wait_for

CLI = [sys.executable, "-m", "posebatch.cli"]


class WorkerProcess(ServerProcess):
    """``posebatch worker`` (Celery prefork, one child) with a log file; killable as a group."""

    name = "worker"
    ready_timeout = 60.0
    stop_timeout = 20.0

    def __init__(self, workdir: Path, env: dict[str, str], index: int = 0,
                 name: str | None = None) -> None:
        self.name = name or f"worker{index}"
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


class ControlProcess(WorkerProcess):
    """``posebatch control``: the control worker that runs scheduled submissions."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        super().__init__(workdir, env, name="control")

    def command(self) -> list[str]:
        return [*CLI, "control", "--loglevel", "INFO", "--hostname", f"{self.name}@%h"]


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


# -- helpers for the fault, bad-input and security suites --------------------------------------

def worker_log(worker: WorkerProcess) -> str:
    """Everything the worker wrote since its last (re)start."""
    return worker.log_path.read_text(errors="replace").rsplit("=== start", 1)[-1]


def batches_received(worker: WorkerProcess) -> int:
    return worker_log(worker).count("Task posebatch.process_batch[")


def result_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """Keys (relative to prefix) of the per-image result files written so far."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if rel.endswith(".json") and not rel.rsplit("/", 1)[-1].startswith("_"):
                keys.append(rel[: -len(".json")])
    return keys


def read_counts_csv(data: bytes) -> list[dict[str, str]]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def compare_with_reference(results: dict[str, dict[str, Any]], counts_csv: bytes,
                           reference: dict[str, dict[str, Any]], reference_csv: bytes,
                           images: list[str]) -> dict[str, int]:
    """Measure a job's output against an undisturbed run of the same images.

    ``results``: every ``*.json`` of the job's output (``download_results``), summary included;
    ``reference`` the same for the reference run. Returns the figures of docs/reliability.md:
    ``lost`` = images with no result file or no row in the counts table, ``duplicated`` = rows
    beyond one per image in the counts table plus images counted beyond the listing in the
    summary. The caller asserts both are 0 *and* that everything equals the reference.
    """
    rows = read_counts_csv(counts_csv)
    row_keys = [r["key"] for r in rows]
    have_result = {k[: -len(".json")] for k in results if not k.startswith("_")}
    lost = len([k for k in images if k not in have_result or k not in set(row_keys)])
    summary = results.get("_summary.json", {})
    duplicated = (len(row_keys) - len(set(row_keys))
                  + max(0, int(summary.get("images_seen", 0)) - len(images)))
    return {"images": len(images), "lost": lost, "duplicated": duplicated}


def record_figures(fault: str, figures: dict[str, int], command: str) -> None:
    """Append one row of the reliability table to $POSEBATCH_FIGURES (JSON lines), if set."""
    path = os.environ.get("POSEBATCH_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fault": fault, **figures, "command": command}) + "\n")


def start_all(workers: list[WorkerProcess]) -> None:
    """Start workers side by side (each loads its model meanwhile); return when all are ready."""
    for w in workers:
        w.launch()
    for w in workers:
        err = w.wait_ready()
        if err is not None:
            raise RuntimeError(f"{w.name} not ready: {err}\n{w.log_tail()}")


def batches_in_flight(worker: WorkerProcess) -> int:
    """Batches this worker received (retries included) and has not finished, by its log."""
    import re

    text = worker_log(worker)
    received = len(re.findall(r"Task posebatch\.process_batch\[[^\]]+\] received", text))
    ended = len(re.findall(r"Task posebatch\.process_batch\[[^\]]+\] (?!received)", text))
    return received - ended


def rerun_batches(r: Any) -> int:
    """Batch starts beyond the first, over every job in this Redis: work done again
    (redeliveries, retries), which the counts must not show. Running jobs: their delivery
    counts; finished ones: the histogram their hash keeps (``JobStore.batch_starts``)."""
    live = sum(int(v) - 1 for key in r.scan_iter("posebatch:job:*:deliveries")
               for v in r.hvals(key))
    kept = 0
    for key in r.scan_iter("posebatch:job:*"):
        if key.count(b":") != 2:
            continue  # a job's other keys; its hash is posebatch:job:<id>
        raw = r.hget(key, "batch_starts") if r.type(key) == b"hash" else None
        if raw is not None:
            kept += sum((int(n) - 1) * count for n, count in json.loads(raw).items())
    return live + kept
