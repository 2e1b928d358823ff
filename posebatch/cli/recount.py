"""``posebatch recount``: new counts from existing results, with other validity thresholds."""

from __future__ import annotations

import argparse

from posebatch.cli import exitcodes
from posebatch.cli.flags import add_validity_flags


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recount", help="rebuild _summary.json/_counts.csv with new thresholds",
                       description=cmd_recount.__doc__)
    p.add_argument("output", help="folder or s3://bucket/prefix that `run` or `submit` wrote")
    add_validity_flags(p, ("the output's",) * 3)
    p.set_defaults(handler=cmd_recount)


def cmd_recount(ns: argparse.Namespace) -> int:
    """Read every per-image result in OUTPUT (no model runs) and write _summary.json and
    _counts.csv again, counting valid persons with the thresholds given here; thresholds not
    given keep the output's own (from _posebatch.json)."""
    from posebatch.recount import recount
    from posebatch.storage import open_storage

    dst = open_storage(ns.output)
    s = recount(dst, {"valid_kpt_score": ns.valid_kpt_score,
                      "valid_min_kpts": ns.valid_min_kpts,
                      "valid_box_score": ns.valid_box_score})
    print(f"{s['images_seen']} results, {s['succeeded']} ok, {s['failed']} failed, "
          f"{s['valid_persons_total']} valid persons (of {s['persons_total']}); "
          f"summary in {dst.join('_summary.json')}")
    return exitcodes.OK
