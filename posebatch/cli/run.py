"""``posebatch run``: a whole job in this process (local folder, one image, or s3:// prefix)."""

from __future__ import annotations

import argparse
import os

from posebatch.cli import exitcodes
from posebatch.cli.flags import (
    add_input_output,
    add_job_flags,
    add_runtime_flags,
    add_selection_flags,
    job_settings,
    runtime_settings,
    selection,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="process a folder (or s3:// prefix) in this process",
                       description=cmd_run.__doc__)
    add_input_output(p, "or image file with images")
    p.add_argument("--force", action="store_true",
                   help="reprocess images that already have a result")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overlays", action="store_true",
                   help="also write OUT/<relative path>.overlay.jpg: the image with boxes, scores "
                        "and skeletons drawn (images skipped as already done get none)")
    add_selection_flags(p)
    add_job_flags(p)
    add_runtime_flags(p)
    p.set_defaults(handler=cmd_run)


def cmd_run(ns: argparse.Namespace) -> int:
    """Walk INPUT recursively and write OUT/<relative path>.json per image, then OUT/_summary.json
    and OUT/_counts.csv. INPUT may also name one image file. Images whose result exists are
    skipped unless --force. Exit 0 even when some images fail (see the summary); non-zero only
    when the job cannot run."""
    from posebatch.errors import ConfigError
    from posebatch.selection import open_input
    from posebatch.storage import LocalStorage, open_storage
    from workers.loading import select_model
    from workers.local_run import run_job

    job, runtime = job_settings(ns), runtime_settings(ns)
    src, single = open_input(ns.input)
    dst = open_storage(ns.out)
    if isinstance(dst, LocalStorage) and os.path.lexists(dst.root) and not os.path.isdir(
            dst.root):
        raise ConfigError(f"--out {dst.url} is a file, not a folder: name a folder for results")
    chosen = selection(ns, src, single)
    model = select_model(job.pinned_runtime(runtime)).ref
    outcome = run_job(src, dst, model, job, runtime, force=ns.force,
                      progress=False if ns.no_progress else None, selection=chosen,
                      overlays=ns.overlays)
    s = outcome.summary
    rate = s["images_seen"] / outcome.seconds if outcome.seconds else 0.0
    failed = ", ".join(f"{c}: {n}" for c, n in s["failed_by_code"].items())
    print(f"{s['images_seen']} images, {s['succeeded']} ok, {s['failed']} failed"
          f"{f' ({failed})' if failed else ''}, {s['valid_persons_total']} valid persons; "
          f"{outcome.seconds:.1f} s ({rate:.1f} img/s); results in {dst.url}")
    return exitcodes.OK
