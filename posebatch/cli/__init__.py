"""The ``posebatch`` command: one parser, one table of exit codes, one module per command group.

The top layer: the only place that imports both roles (``workers`` and ``producer``), and only
inside the handler of the subcommand that needs them, so ``submit`` never loads a model runtime
and ``run`` never loads Celery. Built as ``make_argument_parser()`` + ``main(args=None)`` so tests
run it as a subprocess and as a function.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from posebatch import __version__
from posebatch.cli import (
    cluster,
    evaluate,
    exitcodes,
    exports,
    jobs,
    model,
    recount,
    run,
    serve,
    tables,
    worker,
)

COMMAND_GROUPS = (run, recount, tables, model, evaluate, cluster, worker, exports, serve,
                  jobs)


def make_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posebatch",
        description="Find every person in many images; write 21 body keypoints per image in "
                    "the cloud body-keypoint API's JSON format, plus per-job person counts.",
        epilog=exitcodes.epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"posebatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--log-json", action="store_true",
                        default=os.environ.get("POSEBATCH_LOG_JSON", "") in ("1", "true", "yes"),
                        help="log one JSON object per line (also POSEBATCH_LOG_JSON=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    ns = make_argument_parser().parse_args(args)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(ns.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if ns.log_json:
        from posebatch.logjson import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    try:
        return int(ns.handler(ns))
    except (KeyboardInterrupt, Exception) as err:
        code = exitcodes.for_error(err)
        if code == exitcodes.INTERRUPTED:
            print("interrupted", file=sys.stderr)
        elif code == exitcodes.CRASH:
            traceback.print_exc()
            print(f"posebatch: unexpected error {type(err).__name__}: {err} (a bug: please "
                  "report it with the traceback above)", file=sys.stderr)
        else:
            hint = " (transient; try again)" if code == exitcodes.TRANSIENT else ""
            print(f"posebatch: {err}{hint}", file=sys.stderr)
        return code
