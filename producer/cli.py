"""Cluster subcommands of ``posebatch``: submit, status, wait, watch, worker, beat.

Kept apart from ``posebatch.cli`` so the producer side imports no model runtime; ``worker`` is the
one command here that loads a model (in the worker's child processes, after fork).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from posebatch.settings import RuntimeSettings, from_env

EXIT_OK = 0
EXIT_FAILED_IMAGES = 1


def _broker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", dest="broker_url",
                   help="broker URL, redis:// or rediss:// (default $POSEBATCH_BROKER_URL, "
                        "else redis://127.0.0.1:6379/0)")
    p.add_argument("--state", dest="state_url",
                   help="Redis for job state (default $POSEBATCH_STATE_URL, else the broker)")


def _runtime(ns: argparse.Namespace) -> RuntimeSettings:
    return from_env(RuntimeSettings, {"broker_url": ns.broker_url, "state_url": ns.state_url})


def _store(ns: argparse.Namespace):
    from posebatch.jobstate import JobStore

    rt = _runtime(ns)
    return JobStore.from_url(rt.state_url or rt.broker_url)


def add_cluster_commands(sub: argparse._SubParsersAction, add_job_flags: Callable,
                         add_runtime_flags: Callable) -> None:
    p = sub.add_parser("submit", help="enqueue a job for the cluster; prints the job id last",
                       description="List INPUT (s3://bucket/prefix or a folder the workers can "
                       "read), cut the images into batch tasks and enqueue them. Prints the job "
                       "id alone on the last line of stdout and returns. Images whose result "
                       "already exists are skipped by the workers unless --force.")
    p.add_argument("input")
    p.add_argument("--out", required=True, help="s3://bucket/prefix or folder for results")
    p.add_argument("--batch-images", type=int, default=32,
                   help="images per task (default 32): small enough that a lost worker "
                        "loses little, large enough to amortise the task overhead")
    p.add_argument("--force", action="store_true", help="reprocess images that have results")
    p.add_argument("--job-id", help="use this id instead of a generated one")
    _broker(p)
    add_job_flags(p)
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser("status", help="a job's progress (done / failed / total, rate)")
    p.add_argument("job_id", nargs="?", help="job id (default: list recent jobs)")
    _broker(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("wait", help="progress bar until the job is done; exit 1 if any failed")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 4)")
    p.add_argument("--no-progress", action="store_true")
    _broker(p)
    p.set_defaults(handler=cmd_wait)

    p = sub.add_parser("watch", help="poll a drop folder and submit each new image once",
                       description="Every --interval seconds list INPUT and submit the images "
                       "never submitted before (remembered in Redis across restarts). Each "
                       "round is one job; its summary goes to OUTPUT/_jobs/<job id>/.")
    p.add_argument("input")
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=30.0, help="seconds between polls")
    p.add_argument("--once", action="store_true", help="poll once and exit")
    p.add_argument("--batch-images", type=int, default=32)
    _broker(p)
    add_job_flags(p)
    p.set_defaults(handler=cmd_watch)

    p = sub.add_parser("worker", help="run a Celery worker (one process per GPU)",
                       description="Consume batches from the broker. Needs no flags when "
                       "POSEBATCH_BROKER_URL and the AWS_* variables are set. Extra arguments "
                       "after -- go to `celery worker`.")
    p.add_argument("--concurrency", type=int, default=1,
                   help="worker processes (default 1: one per GPU; on CPU one process uses "
                        "all cores through ONNX Runtime's threads)")
    p.add_argument("--queues", default="posebatch,posebatch-control")
    p.add_argument("--loglevel", default="INFO")
    p.add_argument("--hostname", help="worker node name (Celery -n), e.g. gpu0@%%h")
    p.add_argument("celery_args", nargs="*", help="passed to celery worker")
    _broker(p)
    add_runtime_flags(p)
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("beat", help="run Celery beat with cron schedules from a TOML file")
    p.add_argument("--schedule", required=True, help="TOML file (deploy/schedules.example.toml)")
    p.add_argument("--state-file", default=os.path.expanduser("~/.cache/posebatch/beat-state"),
                   help="where beat remembers the last run of each entry")
    _broker(p)
    p.set_defaults(handler=cmd_beat)


def cmd_submit(ns: argparse.Namespace) -> int:
    from posebatch.cli import job_settings
    from producer.submit import submit

    rt = _runtime(ns)
    job_id = submit(ns.input, ns.out, job=job_settings(ns), broker_url=rt.broker_url,
                    state_url=rt.state_url, batch_images=ns.batch_images, force=ns.force,
                    job_id=ns.job_id)
    print(f"submitted; follow with: posebatch wait {job_id}", file=sys.stderr)
    print(job_id)
    return EXIT_OK


def cmd_status(ns: argparse.Namespace) -> int:
    from producer.status import describe, get

    store = _store(ns)
    ids = [ns.job_id] if ns.job_id else store.recent()
    for job_id in ids:
        print(describe(get(store, job_id)))
    return EXIT_OK


def cmd_wait(ns: argparse.Namespace) -> int:
    from posebatch.errors import RetryableError
    from producer.status import describe, wait

    try:
        p = wait(_store(ns), ns.job_id, timeout=ns.timeout,
                 progress=False if ns.no_progress else None)
    except TimeoutError as err:
        raise RetryableError(str(err)) from err
    print(describe(p))
    return EXIT_FAILED_IMAGES if p.failed else EXIT_OK


def cmd_watch(ns: argparse.Namespace) -> int:
    from posebatch.cli import job_settings
    from producer.watch import watch

    rt = _runtime(ns)
    watch(ns.input, ns.out, interval=ns.interval, once=ns.once, job=job_settings(ns),
          broker_url=rt.broker_url, state_url=rt.state_url, batch_images=ns.batch_images)
    return EXIT_OK


def _export_runtime(ns: argparse.Namespace) -> None:
    """Flags become POSEBATCH_* variables, read by the worker's child processes after fork."""
    for name in ("model", "int8", "providers", "batch_size", "intra_threads", "io_threads",
                 "broker_url", "state_url"):
        value = getattr(ns, name, None)
        if value is not None:
            os.environ[f"POSEBATCH_{name.upper()}"] = str(value)


def cmd_worker(ns: argparse.Namespace) -> int:
    _export_runtime(ns)
    from posebatch.modelstore import resolve_model
    from workers.celery_app import make_app

    rt = from_env(RuntimeSettings)
    # Fail now, with a clear message, not later in each child process.
    resolve_model(rt.model, rt.cache_dir, rt.int8)
    app = make_app(rt.broker_url)
    app.worker_main(["worker", f"--concurrency={ns.concurrency}", "--pool=prefork",
                     f"--queues={ns.queues}", f"--loglevel={ns.loglevel}",
                     "--prefetch-multiplier=1", "--without-gossip", "--without-mingle",
                     *([f"--hostname={ns.hostname}"] if ns.hostname else []), *ns.celery_args])
    return EXIT_OK


def cmd_beat(ns: argparse.Namespace) -> int:
    from producer.schedule import load_schedule
    from workers.celery_app import make_app

    rt = _runtime(ns)
    app = make_app(rt.broker_url)
    app.conf.beat_schedule = load_schedule(ns.schedule)
    os.makedirs(os.path.dirname(ns.state_file), exist_ok=True)
    app.Beat(schedule=ns.state_file, loglevel="INFO").run()
    return EXIT_OK
