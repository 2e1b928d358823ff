"""Producer-side commands: ``submit``, ``status``, ``wait``, ``watch``, ``beat``.

None of them loads a model runtime; they talk to Redis and storage only.
"""

from __future__ import annotations

import argparse
import os
import sys

from posebatch.cli import exitcodes
from posebatch.cli.flags import (
    add_broker_flags,
    add_input_output,
    add_job_flags,
    add_selection_flags,
    bounded,
    job_settings,
    selection,
)
from posebatch.settings import DEFAULT_BATCH_IMAGES, RuntimeSettings, from_env


def _runtime(ns: argparse.Namespace) -> RuntimeSettings:
    rt = from_env(RuntimeSettings, {"broker_url": ns.broker_url, "state_url": ns.state_url})
    rt.check_urls()
    return rt


def _store(ns: argparse.Namespace):
    from posebatch.jobstate import JobStore

    rt = _runtime(ns)
    return JobStore.from_url(rt.state_url or rt.broker_url)


def _batch_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-images", type=bounded(int, 1, 10000), default=DEFAULT_BATCH_IMAGES,
                   help=f"images per task (default {DEFAULT_BATCH_IMAGES}): small enough that "
                        "a lost worker loses little, large enough to amortise the task overhead")


def _job_command(sub: argparse._SubParsersAction, name: str, handler, *, nargs: str | None = None,
                 id_help: str = "job id", **texts: str) -> argparse.ArgumentParser:
    """A command about one job: JOB_ID plus the broker flags."""
    p = sub.add_parser(name, **texts)
    p.add_argument("job_id", nargs=nargs, help=id_help)
    add_broker_flags(p)
    p.set_defaults(handler=handler)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="enqueue a job for the cluster; prints the job id last",
                       description=cmd_submit.__doc__)
    add_input_output(p)
    _batch_images(p)
    p.add_argument("--force", action="store_true", help="reprocess images that have results")
    p.add_argument("--job-id", help="use this id instead of a generated one")
    p.add_argument("--inventory", metavar="URL",
                   help="take INPUT's objects from an S3 Inventory report (CSV or Parquet) "
                        "instead of listing: a manifest.json, or the inventory configuration's "
                        "folder (its newest report); for prefixes too large to list")
    add_broker_flags(p)
    add_selection_flags(p)
    add_job_flags(p)
    p.set_defaults(handler=cmd_submit)

    _job_command(sub, "status", cmd_status, nargs="?", id_help="job id (default: list recent "
                 "jobs)", help="a job's progress (done / failed / total, rate)",
                 description="One line per job: state, images done / failed / total, rate, and "
                 "a hint when a running job has stopped moving.")
    p = _job_command(sub, "wait", cmd_wait, help="progress bar until the job is done; exit 1 "
                     "if any failed", description="Follow a job until every image has a record, "
                     "writing its summary if no worker did. Exit 0 when all images succeeded, 1 "
                     "when some failed, 4 on --timeout.")
    p.add_argument("--timeout", type=bounded(float, 0, 10**7),
                   help="give up after this many seconds (exit 4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("watch", help="submit each new image of a drop folder once (polling, "
                       "or S3 event notifications with --events)",
                       description="Every --interval seconds list INPUT and submit the images "
                       "never submitted before (remembered in Redis across restarts). Each "
                       "round is one job; its summary goes to OUTPUT/_jobs/<job id>/. With "
                       "--events QUEUE, read the bucket's ObjectCreated notifications from an "
                       "SQS queue instead (no listing per image; a burst of uploads is one "
                       "job) and list INPUT only every --reconcile-every seconds, to catch "
                       "events that never came.")
    add_input_output(p, "to watch")
    p.add_argument("--interval", type=bounded(float, 1, 86400), default=30.0,
                   help="seconds between polls (default 30; not used with --events)")
    p.add_argument("--incremental", action="store_true",
                   help="list only past the last key listed (S3 StartAfter): O(new) requests "
                        "per poll for inputs whose new keys sort last (timestamps, ULIDs, date "
                        "folders); a full listing every --reconcile-every catches the rest")
    p.add_argument("--once", action="store_true", help="poll once and exit (with --events: "
                   "take what the queue holds now, reconcile if due, exit)")
    p.add_argument("--events", metavar="QUEUE",
                   help="SQS queue the s3:// INPUT bucket sends s3:ObjectCreated:* "
                        "notifications to: its URL, sqs://NAME or NAME (endpoint and "
                        "credentials from the AWS_* variables)")
    p.add_argument("--reconcile-every", type=bounded(float, 0, 30 * 86400), default=3600.0,
                   metavar="SECONDS", help="with --events or --incremental: list INPUT whole "
                   "this often to submit images the events or the incremental listing missed "
                   "(default 3600; 0: never)")
    p.add_argument("--event-window", type=bounded(float, 0, 600), default=2.0,
                   metavar="SECONDS", help="with --events: images whose events come within "
                   "this long of a burst's first one form one job (default 2)")
    p.add_argument("--dedup-ttl", type=bounded(float, 60, 30 * 86400), default=6 * 3600.0,
                   metavar="SECONDS", help="with --events: how long a submitted (key, ETag) "
                   "is remembered, so a re-delivered event is not submitted again (default "
                   "21600; at least 3600 + 2 x --reconcile-every)")
    _batch_images(p)
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
    """List INPUT (s3://bucket/prefix or a folder the workers can read), cut the images into batch
    tasks and enqueue them. Prints the job id alone on the last line of stdout and returns.
    Images whose result already exists are skipped by the workers unless --force."""
    from posebatch.selection import open_input
    from producer.submit import submit

    rt = _runtime(ns)
    src, single = open_input(ns.input)
    job_id = submit(src.url, ns.out, job=job_settings(ns), broker_url=rt.broker_url,
                    state_url=rt.state_url, batch_images=ns.batch_images, force=ns.force,
                    job_id=ns.job_id, selection=selection(ns, src, single),
                    inventory=ns.inventory)
    print(f"submitted; follow with: posebatch wait {job_id}", file=sys.stderr)
    print(job_id)
    return exitcodes.OK


def cmd_status(ns: argparse.Namespace) -> int:
    from producer.status import describe, get

    store = _store(ns)
    ids = [ns.job_id] if ns.job_id else store.recent()
    states = []
    full = store.full()
    for job_id in ids:
        p = get(store, job_id)
        states.append(p.state)
        print(describe(p, full))
    # One job asked for by id: an abandoned one (submission stopped, output gone) needs fixing.
    return exitcodes.CONFIG if ns.job_id and states == ["abandoned"] else exitcodes.OK


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
    if ns.events:
        from producer.events import watch_events

        watch_events(ns.input, ns.out, ns.events, job=job_settings(ns),
                     broker_url=rt.broker_url, state_url=rt.state_url,
                     batch_images=ns.batch_images, window=ns.event_window,
                     reconcile_every=ns.reconcile_every, dedup_ttl=ns.dedup_ttl, once=ns.once,
                     emit=lambda job_id: print(job_id, flush=True), on_sigterm=True)
        return exitcodes.OK
    watch(ns.input, ns.out, interval=ns.interval, once=ns.once, job=job_settings(ns),
          broker_url=rt.broker_url, state_url=rt.state_url, batch_images=ns.batch_images,
          incremental=ns.incremental, reconcile_every=ns.reconcile_every)
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
