"""``posebatch compact``: fold the per-job tables pending in an output's root into its base."""

from __future__ import annotations

import argparse

from posebatch.cli import exitcodes
from posebatch.cli.flags import add_broker_flags
from posebatch.settings import RuntimeSettings, from_env


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact", help="merge pending per-job tables into _counts.csv now",
                       description=cmd_compact.__doc__)
    p.add_argument("output", help="folder or s3://bucket/prefix that `submit` wrote into")
    p.add_argument("--no-lock", action="store_true",
                   help="do not take the output's lock in Redis (only when no job can be "
                        "finishing into OUTPUT meanwhile, e.g. no Redis at all)")
    add_broker_flags(p)
    p.set_defaults(handler=cmd_compact)


def cmd_compact(ns: argparse.Namespace) -> int:
    """Job ends list their own tables (_jobs/<job id>/_counts.csv) in OUTPUT's _tables.json and
    compact them into the root _counts.csv/_summary.json only now and then, so between
    compactions the root summary counts the base only. This merges them now (newest row of an
    image wins) and writes exact root tables, holding the output's lock in Redis (the one job
    ends take, from --state/--broker) so no job end is lost meanwhile."""
    from posebatch.roottables import compact, no_lock, read_index
    from posebatch.storage import open_storage

    dst = open_storage(ns.output)
    if ns.no_lock:
        lock = no_lock
    else:
        from posebatch.jobstate import JobStore

        rt = from_env(RuntimeSettings, {"broker_url": ns.broker_url, "state_url": ns.state_url})
        rt.check_urls()
        store = JobStore.from_url(rt.state_url or rt.broker_url)
        store.ping()

        def lock():  # noqa: ANN202
            return store.output_lock(dst.url)

    with lock() as check:
        index = read_index(dst)
        s = compact(dst, index, check)
    print(f"compacted {len(index.pending)} pending tables: {s.get('images_seen', 0)} images, "
          f"{s.get('succeeded', 0)} ok, {s.get('failed', 0)} failed; "
          f"tables in {dst.join('_counts.csv')}", flush=True)
    return exitcodes.OK
