"""``posebatch export`` and ``posebatch report``: a finished job's results for tools and for eyes.

Both read only the output storage (and the input, for images), so they need no model or broker.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from posebatch.cli import exitcodes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write results as COCO, YOLO pose, CVAT or Label Studio files",
        description=cmd_export.__doc__)
    p.add_argument("output", help="a finished job's output: folder or s3://bucket/prefix")
    p.add_argument("--format", required=True, choices=("coco", "yolo", "cvat", "labelstudio"),
                   help="coco: annotations.json; yolo: images/, labels/, data.yaml; cvat: "
                        "annotations.xml (+ cvat_labels.json); labelstudio: tasks.json "
                        "(+ labeling_config.xml)")
    p.add_argument("--to", required=True, dest="dest", help="local folder to write (new or empty)")
    p.add_argument("--all-persons", action="store_true",
                   help="export every detected person, not only the valid ones the job counts")
    p.add_argument("--kpt-threshold", type=float, default=None,
                   help="keypoints scoring at least this are visible (v=2 / not outside); the "
                        "others are v=0 / outside / left out. Default: the job's valid_kpt_score")
    images = p.add_mutually_exclusive_group()
    images.add_argument("--copy-images", action="store_const", const="copy", dest="images",
                        help="yolo/cvat: copy images into DEST/images instead of symlinking "
                             "(s3:// inputs are always downloaded)")
    images.add_argument("--no-images", action="store_const", const="none", dest="images",
                        help="yolo/cvat: write labels only")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="yolo: put this share of images (chosen by a hash of the name, stable) "
                        "in images/val; default 0: val = train")
    p.add_argument("--image-url", default=None,
                   help="labelstudio: prefix of each task's image URL (the relative name is "
                        "appended); default /data/local-files/?d=<input folder>/ for a local "
                        "input, the s3:// URL for a bucket")
    p.add_argument("--force", action="store_true", help="write into a non-empty DEST")
    p.set_defaults(handler=cmd_export)

    r = sub.add_parser(
        "report", help="a static HTML page: counts, charts, failures, overlay galleries",
        description="Read the finished job in OUTPUT and write DIR/index.html (opens from disk, "
        "no network): summary, persons-per-image histogram, mean keypoint scores, failures, and "
        "galleries of skeleton overlays (most crowded, least confident, random sample).")
    r.add_argument("output", help="a finished job's output: folder or s3://bucket/prefix")
    r.add_argument("--to", required=True, dest="dest", help="local folder for index.html")
    r.add_argument("--per-gallery", type=int, default=12, help="images per gallery (default 12)")
    r.set_defaults(handler=cmd_report)


def cmd_export(ns: argparse.Namespace) -> int:
    """Read the finished job in OUTPUT (folder or s3://bucket/prefix) and write its results to the
    local folder DEST in an annotation tool's or trainer's format. Streams: memory does not grow
    with the number of images. Image sizes come from OUTPUT/_counts.csv; images are never
    decoded."""
    from posebatch.exports.run import ExportOptions, export

    opts = ExportOptions(fmt=ns.format, dest=Path(ns.dest), all_persons=ns.all_persons,
                         kpt_threshold=ns.kpt_threshold, images=ns.images,
                         val_fraction=ns.val_fraction, image_url=ns.image_url, force=ns.force)
    res = export(ns.output, opts)
    note = (f"; {res.sizes_read} sizes read from image headers (not in _counts.csv)"
            if res.sizes_read else "")
    print(f"{res.images} images, {res.persons} persons exported as {ns.format}{note}: "
          + ", ".join(res.files))
    return exitcodes.OK


def cmd_report(ns: argparse.Namespace) -> int:
    from posebatch.report.build import build_report

    index = build_report(ns.output, Path(ns.dest), per_gallery=ns.per_gallery)
    print(f"report: {index}")
    return exitcodes.OK
