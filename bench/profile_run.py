"""Where the time of ``posebatch run`` goes, stage by stage: the engine's own stage timers.

Runs the real CLI (``-vv``) on the bench corpus and prints the ``stages:`` line of its log as a
table (workers/engine/stages.py says what each stage covers): wall milliseconds per image summed
over the threads that run the stage, the model thread's wall and CPU milliseconds per image (its
ceiling in img/s is 1000 / that), and the process's CPU per image from wait4().

Why the timers and no wrapping: the engine times itself (a perf_counter pair per stage), so the
figures come from the code that runs in production, with nothing monkey-patched; any other run
shows the same line with ``posebatch -vv run``. For a sampling view add ``--py-spy`` (py-spy
next to this Python or on PATH).

    profile_run.py --images 200 [--model bench/null.onnx] [--batch-size 4] [--io-threads 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import make_corpus
from common import CLI, ROOT
from host_ceiling import STAGE_LINE, host
from procstat import run_measured


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", help="WxH of generated images (default: make_corpus's mix)")
    ap.add_argument("--model", help="ONNX model (default: the built one; bench/null.onnx for "
                                    "the host side alone)")
    ap.add_argument("--batch-size", type=int, default=0)
    ap.add_argument("--intra-threads", type=int, default=0)
    ap.add_argument("--io-threads", type=int, default=0)
    ap.add_argument("--py-spy", action="store_true", help="also sample the run with py-spy")
    ap.add_argument("args", nargs="*", help="more flags for posebatch run (after --)")
    ns = ap.parse_args()
    extra = {} if not ns.size else {"sizes": (tuple(int(v) for v in ns.size.split("x")),)}
    images = make_corpus.ensure_corpus(ns.images, quiet=True, **extra) / "images"
    with tempfile.TemporaryDirectory(prefix="profile-run-") as tmp:
        work = Path(tmp)
        cmd = [*CLI, "-vv", "run", str(images), "--out", str(work / "out"), "--force",
               "--no-progress", *ns.args]
        for flag, value in (("--model", ns.model), ("--batch-size", ns.batch_size),
                            ("--intra-threads", ns.intra_threads),
                            ("--io-threads", ns.io_threads)):
            if value:
                cmd += [flag, str(value)]
        if ns.py_spy:
            spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
            if spy is None:
                raise SystemExit("--py-spy: py-spy is not installed (pip install py-spy)")
            cmd = [spy, "record", "--threads", "--format", "raw", "-o",
                   str(ROOT / "bench" / "results" / "profile.txt"), "--", *cmd]
        r = run_measured(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, work=work)
    if r["rc"] != 0:
        raise SystemExit(f"posebatch run failed ({r['rc']}):\n{r['stderr'][-3000:]}")
    found = STAGE_LINE.findall(r["stderr"])
    if not found:
        raise SystemExit("no stages: line in the log (an engine without stage timers?)")
    s = json.loads(found[-1])
    n = s["images"]
    print(f"host: {host()}; {n} images, {s['batches']} batches; {r['wall']:.1f} s wall, "
          f"{1000 * r['cpu'] / n:.2f} CPU ms per image for the whole process")
    print(f"{'stage':<10} {'ms/img':>8}  (wall, summed over the stage's threads)")
    for stage, ms in s["ms_per_image"].items():
        print(f"{stage:<10} {ms:8.3f}")
    print(f"model thread: {s['model_thread_ms_per_image']:.3f} ms/img wall, "
          f"{s['model_thread_cpu_ms_per_image']:.3f} ms/img CPU (infer + post)")
    if ns.py_spy:
        print(f"py-spy samples: {ROOT / 'bench' / 'results' / 'profile.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
