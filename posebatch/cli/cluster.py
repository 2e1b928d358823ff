"""Producer-side commands: ``submit``, ``status``, ``wait``, ``watch``, ``beat``.

None of them loads a model runtime; they talk to Redis and storage only.
"""

from __future__ import annotations

import argparse
import os
import sys

from posebatch.cli import exitcodes
from posebatch.cli.flags import add_broker_flags, add_job_flags, job_settings
from posebatch.settings import DEFAULT_BATCH_IMAGES, RuntimeSettings, from_env


def _runtime(ns: argparse.Namespace) -> RuntimeSettings:
    return from_env(RuntimeSettings, {"broker_url": ns.broker_url, "state_url": ns.state_url})


def _store(ns: argparse.Namespace):
    from posebatch.jobstate import JobStore

    rt = _runtime(ns)
    return JobStore.from_url(rt.state_url or rt.broker_url)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="enqueue a job for the cluster; prints the job id last",
                       description="List INPUT (s3://bucket/prefix or a folder the workers can "
                       "read), cut the images into batch tasks and enqueue them. Prints the job "
                       "id alone on the last line of stdout and returns. Images whose result "
                       "already exists are skipped by the workers unless --force.")
    p.add_argument("input", help="s3://bucket/prefix or folder with images")
    p.add_argument("--out", required=True, help="s3://bucket/prefix or folder for results")
    p.add_argument("--batch-images", type=int, default=DEFAULT_BATCH_IMAGES,
                   help=f"images per task (default {DEFAULT_BATCH_IMAGES}): small enough that "
                        "a lost worker loses little, large enough to amortise the task overhead")
    p.add_argument("--force", action="store_true", help="reprocess images that have results")
    p.add_argument("--job-id", help="use this id instead of a generated one")
    add_broker_flags(p)
    add_job_flags(p)
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser("status", help="a job's progress (done / failed / total, rate)",
                       description="One line per job: state, images done / failed / total, "
                       "rate, and a hint when a running job has stopped moving.")
    p.add_argument("job_id", nargs="?", help="job id (default: list recent jobs)")
    add_broker_flags(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("wait", help="progress bar until the job is done; exit 1 if any failed",
                       description="Follow a job until every image has a record, writing its "
                       "summary if no worker did. Exit 0 when all images succeeded, 1 when some "
                       "failed, 4 on --timeout.")
    p.add_argument("job_id")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (exit 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_broker_flags(p)
    p.set_defaults(handler=cmd_wait)

    p = sub.add_parser("watch", help="poll a drop folder and submit each new image once",
                       description="Every --interval seconds list INPUT and submit the images "
                       "never submitted before (remembered in Redis across restarts). Each "
                       "round is one job; its summary goes to OUTPUT/_jobs/<job id>/.")
    p.add_argument("input", help="s3://bucket/prefix or folder to watch")
    p.add_argument("--out", required=True, help="s3://bucket/prefix or folder for results")
    p.add_argument("--interval", type=float, default=30.0,
                   help="seconds between polls (default 30)")
    p.add_argument("--once", action="store_true", help="poll once and exit")
    p.add_argument("--batch-images", type=int, default=DEFAULT_BATCH_IMAGES,
                   help=f"images per task (default {DEFAULT_BATCH_IMAGES})")
    add_broker_flags(p)
    add_job_flags(p)
    p.set_defaults(handler=cmd_watch)

    p = sub.add_parser("beat", help="run Celery beat with cron schedules from a TOML file",
                       description="Send each schedule entry's submission to the control queue "
                       "at its cron times; `posebatch control` runs them.")
    p.add_argument("--schedule", required=True, help="TOML file (deploy/schedules.example.toml)")
    p.add_argument("--state-file", default=os.path.expanduser("~/.cache/posebatch/beat-state"),
                   help="where beat remembers the last run of each entry "
                        "(default ~/.cache/posebatch/beat-state)")
    add_broker_flags(p)
    p.set_defaults(handler=cmd_beat)


def cmd_submit(ns: argparse.Namespace) -> int:
    from producer.submit import submit

    rt = _runtime(ns)
    job_id = submit(ns.input, ns.out, job=job_settings(ns), broker_url=rt.broker_url,
                    state_url=rt.state_url, batch_images=ns.batch_images, force=ns.force,
                    job_id=ns.job_id)
    print(f"submitted; follow with: posebatch wait {job_id}", file=sys.stderr)
    print(job_id)
    return exitcodes.OK


def cmd_status(ns: argparse.Namespace) -> int:
    from producer.status import describe, get

    store = _store(ns)
    ids = [ns.job_id] if ns.job_id else store.recent()
    for job_id in ids:
        print(describe(get(store, job_id)))
    return exitcodes.OK


def cmd_wait(ns: argparse.Namespace) -> int:
    from posebatch.errors import RetryableError
    from posebatch.settings import ClusterSettings
    from producer.reaper import Reaper
    from producer.status import describe, wait

    store, rt, cluster = _store(ns), _runtime(ns), from_env(ClusterSettings)
    try:
        p = wait(store, ns.job_id, timeout=ns.timeout,
                 progress=False if ns.no_progress else None,
                 reaper=Reaper(store, rt.broker_url), requeue_after=cluster.requeue_after)
    except TimeoutError as err:
        raise RetryableError(str(err)) from err
    print(describe(p))
    return exitcodes.FAILED_IMAGES if p.failed else exitcodes.OK


def cmd_watch(ns: argparse.Namespace) -> int:
    from producer.watch import watch

    rt = _runtime(ns)
    watch(ns.input, ns.out, interval=ns.interval, once=ns.once, job=job_settings(ns),
          broker_url=rt.broker_url, state_url=rt.state_url, batch_images=ns.batch_images)
    return exitcodes.OK


def cmd_beat(ns: argparse.Namespace) -> int:
    from posebatch.queue import make_app
    from producer.schedule import load_schedule

    rt = _runtime(ns)
    app = make_app(rt.broker_url)
    app.conf.beat_schedule = load_schedule(ns.schedule)
    os.makedirs(os.path.dirname(ns.state_file), exist_ok=True)
    app.Beat(schedule=ns.state_file, loglevel="INFO").run()
    return exitcodes.OK
