"""The exit codes of every ``posebatch`` command, and which error gets which.

Why one table: scripts and schedulers branch on these; a code must mean the same thing whichever
subcommand returns it, and ``--help`` prints this table.
"""

from __future__ import annotations

from posebatch.errors import PosebatchError, RetryableError

OK = 0
FAILED_IMAGES = 1
"""``wait``: the job finished but some images have error results (see its summary)."""
USAGE = 2
"""Bad flags (argparse's own code)."""
CONFIG = 3
"""Bad settings, missing model, refused output, wrong credentials: fix something, then rerun."""
TRANSIENT = 4
"""Storage or broker unreachable: nothing is wrong with the job; try again later."""
CRASH = 70
"""An unexpected error: a bug (sysexits' EX_SOFTWARE); the traceback is printed, please report."""
INTERRUPTED = 130
"""Ctrl-C."""

TABLE = (
    (OK, "ok (per-image failures are in the summary, not in the exit code)"),
    (FAILED_IMAGES, "`wait`: the job finished but some images failed"),
    (USAGE, "bad flags"),
    (CONFIG, "bad settings, missing model, refused output or credentials: fix, then rerun"),
    (TRANSIENT, "storage or broker unreachable: try again later"),
    (CRASH, "unexpected error (a bug: the traceback is printed; please report it)"),
    (INTERRUPTED, "interrupted"),
)


def for_error(err: BaseException) -> int:
    """The exit code of an error that ended a command."""
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED
    if isinstance(err, RetryableError):
        return TRANSIENT
    if isinstance(err, PosebatchError):
        return CONFIG
    return CRASH


def epilog() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in TABLE)
