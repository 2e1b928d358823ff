"""Throughput of each ``--quality`` on the benchmark corpus: ``posebatch run`` as a user runs it.

    python bench/quality.py [--images 40] [--rounds 2] [--qualities fast,best]

Runs are interleaved (fast, best, fast, best, ...) so a change in the machine's load hits every
quality alike; the best round of each is reported, with the CPU model, since img/s on a shared
machine says little without it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATE = re.compile(r"\(([\d.]+) img/s\)")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--qualities", default="fast,best")
    ns = ap.parse_args()
    corpus = subprocess.run([sys.executable, str(HERE / "make_corpus.py"), "--images",
                             str(ns.images)], check=True, capture_output=True,
                            text=True).stdout.strip().splitlines()[-1]
    best: dict[str, float] = {}
    for r in range(ns.rounds):
        for q in ns.qualities.split(","):
            with tempfile.TemporaryDirectory() as out:
                line = subprocess.run([sys.executable, "-m", "posebatch.cli", "run", corpus,
                                       "--out", out, "--quality", q, "--no-progress"],
                                      check=True, capture_output=True, text=True).stdout
            rate = float(RATE.search(line).group(1))  # type: ignore[union-attr]
            print(f"round {r + 1} {q:6s} {rate:6.2f} img/s", flush=True)
            best[q] = max(best.get(q, 0.0), rate)
    print(f"\n{ns.images} images of {corpus}; CPU {cpu_model()}")
    first = best[next(iter(best))]
    for q, rate in best.items():
        print(f"{q:6s} {rate:6.2f} img/s (best of {ns.rounds}), {rate / first:.2f}x the first")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
