"""``posebatch jobs prune``: remove finished jobs' state from Redis now, not at its expiry."""

from __future__ import annotations

import argparse

from posebatch.cli import exitcodes
from posebatch.cli.flags import add_broker_flags
from posebatch.settings import RuntimeSettings, from_env


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jobs", help="manage the job state kept in Redis",
                       description="Job state (records, counters) is kept in Redis for "
                       "`status`; each finished job's keys expire after POSEBATCH_JOB_RETENTION "
                       "seconds (default 7 days). Results and summaries live in storage and "
                       "are never touched.")
    sub2 = p.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)
    prune = sub2.add_parser("prune", help="delete finished jobs' state now",
                            description=cmd_prune.__doc__)
    prune.add_argument("--older-than", type=float, default=0.0,
                       help="only jobs finished at least this many seconds ago (default 0)")
    prune.add_argument("--stale-submitting", type=float, metavar="SECONDS",
                       help="also delete jobs still 'submitting' this long after they were "
                            "created (their producer died; resubmitted jobs are separate)")
    add_broker_flags(prune)
    prune.set_defaults(handler=cmd_prune)


def cmd_prune(ns: argparse.Namespace) -> int:
    """Delete the Redis state of jobs that finished more than --older-than seconds ago (default 0:
    every finished job), and drop expired jobs from the job list. Running jobs are kept."""
    from posebatch.errors import ConfigError
    from posebatch.jobstate import JobStore

    if ns.older_than < 0:
        raise ConfigError(f"--older-than: expected >= 0 seconds, got {ns.older_than}")
    if ns.stale_submitting is not None and ns.stale_submitting < 60:
        raise ConfigError("--stale-submitting: expected >= 60 seconds (a submission may be "
                          f"running right now), got {ns.stale_submitting}")
    rt = from_env(RuntimeSettings, {"broker_url": ns.broker_url, "state_url": ns.state_url})
    rt.check_urls()
    removed = JobStore.from_url(rt.state_url or rt.broker_url).prune(ns.older_than,
                                                                     ns.stale_submitting)
    for job_id in removed:
        print(job_id)
    print(f"pruned {len(removed)} jobs", flush=True)
    return exitcodes.OK
