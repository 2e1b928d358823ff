"""``posebatch eval``: score a results folder against COCO-format ground truth."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from posebatch.cli import exitcodes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="OKS AP and per-keypoint accuracy against COCO ground truth",
                       description="Match the per-image results in PRED to COCO keypoints "
                       "ground truth with the 21 API keypoints and print OKS AP (pycocotools) "
                       "and, per keypoint, the share within 5%% and 10%% of the box size.")
    p.add_argument("--gt", required=True, help="COCO keypoints JSON with the 21 API keypoints")
    p.add_argument("--pred", required=True, help="output folder of `posebatch run`")
    p.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")
    p.add_argument("--max-dets", type=int, default=20,
                   help="detections per image that count (default 20, COCO's; crowded images "
                        "need up to the job's max_persons, 100)")
    p.set_defaults(handler=cmd_eval)


def cmd_eval(ns: argparse.Namespace) -> int:
    from posebatch.evaluate import evaluate, format_report

    report = evaluate(ns.gt, ns.pred, ns.max_dets)
    print(format_report(report))
    if ns.json_out:
        Path(ns.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return exitcodes.OK
