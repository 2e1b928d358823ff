"""The dev set through the default model with the issue's plain top_head rule and with the module's.

Usage (from the repository root): ``python scripts/eval_plain_rule.py [--dev ../shared/data/dev]``

Why: the plain implementation of the issue (same ONNX, square 640 letterbox, NMS, simple
geometric derived points) differs from ``--quality fast`` only in ``TOP_HEAD_K`` (1.0 there), so
one run of each, scored by ``posebatch eval``'s code, shows that ``fast`` is at least as accurate
on every metric (README "Accuracy on the dev set").
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from posebatch.devdata import dev_data_dir  # noqa: E402
from posebatch.evaluate import evaluate  # noqa: E402
from posebatch.modelstore import resolve_model  # noqa: E402
from posebatch.settings import JobSettings, RuntimeSettings  # noqa: E402
from workers.engine import keypoints as K  # noqa: E402
from workers.engine.pipeline import PoseEngine  # noqa: E402
from workers.engine.runner import PoseModel  # noqa: E402

METRICS = ("recall", "AP17", "PCK21_10", "PCK21_05", "AP")


def run(dev: Path, model: PoseModel, top_head_k: float) -> dict:
    module_k = K.TOP_HEAD_K
    K.derive.__defaults__ = (top_head_k,)      # the rule's one constant, for this run only
    try:
        gt = json.loads((dev / "annotations.json").read_text())
        items = [(im["file_name"], lambda p=dev / "images" / im["file_name"]: p.read_bytes())
                 for im in gt["images"]]
        with tempfile.TemporaryDirectory() as tmp:
            for key, result in PoseEngine(model, JobSettings(), 4, 2).run(items):
                path = Path(tmp) / (key + ".json")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result))
            return evaluate(str(dev / "annotations.json"), tmp)
    finally:
        K.derive.__defaults__ = (module_k,)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", type=Path, default=dev_data_dir())
    args = ap.parse_args(argv)
    if args.dev is None:
        raise SystemExit("dev set not found; pass --dev or set POSEBATCH_DEV_DATA")
    rt = RuntimeSettings()
    model = PoseModel(str(resolve_model(rt.model, rt.cache_dir).path), "cpu")
    print("| rule | " + " | ".join(METRICS) + " | top_head PCK@0.05 |")
    print("|---" * (len(METRICS) + 2) + "|")
    for label, k in (("plain (TOP_HEAD_K = 1.0)", 1.0), (f"module ({K.TOP_HEAD_K})",
                                                          K.TOP_HEAD_K)):
        r = run(args.dev, model, k)
        print(f"| {label} | " + " | ".join(f"{r[m]:.3f}" for m in METRICS)
              + f" | {r['per_keypoint']['top_head']['within_5pct']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
