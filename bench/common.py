"""What every bench module shares: paths, the CLI command line, the goals, the log line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):  # the project and the bench modules, run from anywhere
    if _p not in sys.path:
        sys.path.insert(0, _p)

CLI = [sys.executable, "-m", "posebatch.cli"]
GOALS = {"b/a": 0.85, "c/a": 0.80, "b/d": 3.0, "worker_rss_mb": 600.0}
FALLBACK_GFLOPS_640 = 7.466984  # Ultralytics get_flops, YOLO11n-pose fused, 640x640


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def best_of(repeat: int, fn, *args) -> dict[str, Any]:
    """Run a measurement ``repeat`` times; keep the fastest, list every rate."""
    runs = [fn(*args) for _ in range(max(1, repeat))]
    best = max(runs, key=lambda x: x["img_per_s"])
    return {**best, "all_img_per_s": [round(x["img_per_s"], 2) for x in runs]}


def emit(figures: dict[str, Any], path: str | None) -> None:
    """Print the figures as JSON, and write them to ``path`` too when given (bench/results/)."""
    text = json.dumps(figures, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
