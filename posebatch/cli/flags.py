"""Flag groups shared by several subcommands, and the typed settings they become.

Why shared: ``run``, ``submit`` and ``watch`` take the same job settings; defining the flags once
keeps their names, help and defaults identical, and every flag falls back to its
``POSEBATCH_<NAME>`` variable through ``posebatch.settings.from_env``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from posebatch.keys import RESULT_LAYOUTS
from posebatch.settings import DECODES, QUALITIES, JobSettings, RuntimeSettings, from_env

if TYPE_CHECKING:
    from posebatch.selection import Selection
    from posebatch.storage import Storage

JOB_FIELDS = ("imgsz", "rect", "det_conf", "nms_iou", "valid_kpt_score", "valid_min_kpts",
              "valid_box_score", "max_image_bytes", "quality", "precision", "backend",
              "result_layout")
RUNTIME_FIELDS = ("model", "detector", "providers", "precision", "backend", "batch_size",
                  "intra_threads", "io_threads", "decode_workers", "decode", "broker_url",
                  "state_url")


def add_job_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("job settings (also POSEBATCH_<NAME> environment variables)")
    g.add_argument("--imgsz", type=int, help="model input side in pixels (default 640)")
    g.add_argument("--rect", action="store_true", default=None,
                   help="letterbox to a stride-aligned rectangle instead of a square")
    g.add_argument("--quality", choices=QUALITIES,
                   help="fast (default): one pass; best: + mirrored pass + a 1.5x larger pass "
                   "for small people, about 4x slower on CPU (flip, scale: either alone)")
    g.add_argument("--det-conf", type=float,
                   help="persons below this box score are not reported (default 0.05)")
    g.add_argument("--nms-iou", type=float, help="NMS IoU threshold (default 0.6)")
    add_validity_flags(g)
    g.add_argument("--max-image-bytes", type=int,
                   help="largest accepted encoded file in bytes (default 4194304 = 4 MiB)")
    g.add_argument("--result-layout", choices=RESULT_LAYOUTS,
                   help="mirror (default): OUT/a/b.jpg.json beside the input's path; sharded: "
                        "OUT/3f/a/b.jpg.json under 256 hash prefixes, spreading one job's S3 "
                        "requests over 256 partitions (README \"Result layout\")")
    add_engine_flags(g, pinned=True)


def add_engine_flags(g: argparse._ActionsContainer, *, pinned: bool) -> None:
    """--precision and --backend: a job setting for run/submit/watch/serve (pins what every
    worker of the job runs), a worker's own default for jobs that leave them ``auto``."""
    whose = ("pins it for every worker of the job; default auto: each worker's own choice, "
             "README \"Precision\"" if pinned else "this worker's choice for jobs that do not "
             "pin one")
    g.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"],
                   help="model precision (auto: bf16 with OpenVINO on CPUs with AMX or "
                        "AVX512-BF16, else fp32, GPUs included); fp16 uses <model>.fp16.onnx, "
                        f"made on first use; bf16: OpenVINO. {whose}")
    g.add_argument("--backend", choices=["auto", "ort", "openvino"],
                   help="model runtime (auto: ONNX Runtime on a GPU, else the faster one on "
                        f"this CPU, measured once per model and host and cached). {whose}")


def add_validity_flags(g: argparse._ActionsContainer, defaults: tuple[str, str, str] = (
        "0.2", "3", "0.03; 0.05+ stricter")) -> None:
    """The seed's valid-person rule; ``run`` and ``recount`` take the same three flags."""
    kpt, count, box = defaults
    g.add_argument("--valid-kpt-score", type=float,
                   help=f"validity rule: keypoint score threshold (default {kpt})")
    g.add_argument("--valid-min-kpts", type=int,
                   help=f"validity rule: MORE than this many keypoints above it (default {count})")
    g.add_argument("--valid-box-score", type=float,
                   help=f"validity rule: box score must exceed this (default {box})")


def add_runtime_flags(p: argparse.ArgumentParser, *, engine: bool = False) -> None:
    """``engine``: also --precision and --backend (the worker's; jobs have their own)."""
    g = p.add_argument_group("runtime (also POSEBATCH_<NAME> environment variables)")
    if engine:
        add_engine_flags(g, pinned=False)
    g.add_argument("--model", help="ONNX model file (default: the model built by `model build`)")
    g.add_argument("--detector", help="person detector ONNX for a top-down (SimCC) --model "
                   "(default: the default model's boxes); docs/models.md")
    g.add_argument("--providers", choices=["auto", "cpu", "cuda", "tensorrt"],
                   help="ONNX Runtime provider (default auto: TensorRT when its libraries "
                        "load, else CUDA when available, else CPU)")
    g.add_argument("--batch-size", type=int,
                   help="images per model call (default 0 = auto: 4 on CPU, 32 on CUDA)")
    g.add_argument("--intra-threads", type=int, help="ONNX Runtime threads (0 = per core)")
    g.add_argument("--io-threads", type=int,
                   help="download/decode threads, and as many result writers (default 0 = "
                   "auto: one per core, 2 to 4, for a local folder; 4 for S3)")
    g.add_argument("--decode-workers", type=int, metavar="N",
                   help="decode in N processes writing into shared-memory batches (default 0: "
                        "decode in the io threads; README \"Decode processes\")")
    g.add_argument("--decode", choices=DECODES,
                   help="JPEG pixels decoded by: cpu (libjpeg-turbo), gpu (NVIDIA nvImageCodec, "
                        "on the model's GPU; pip extra gpu-decode), auto (default: gpu when the "
                        "model runs on CUDA and nvImageCodec is installed); README \"GPU "
                        "decode\"")


def add_input_output(p: argparse.ArgumentParser, what: str = "with images") -> None:
    """INPUT and --out, the same for run, submit and watch."""
    p.add_argument("input", help=f"folder or s3://bucket/prefix {what}")
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix for results")


def add_broker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", dest="broker_url",
                   help="broker URL, redis:// or rediss:// (default $POSEBATCH_BROKER_URL, "
                        "else redis://127.0.0.1:6379/0)")
    p.add_argument("--state", dest="state_url",
                   help="Redis for job state (default $POSEBATCH_STATE_URL, else the broker)")


def bounded(kind: type, low: float, high: float) -> Callable[[str], int | float]:
    """An argparse type: a finite ``kind`` in [low, high], else a usage error (exit 2) that
    says the range. Flags that are also settings are bounded in ``posebatch.settings``."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (isinstance(value, int) or math.isfinite(value)) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def add_selection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which images (see README, Input rules)")
    g.add_argument("--keys-from", metavar="FILE",
                   help="process the keys listed in FILE (one per line, relative to INPUT; "
                        "- reads stdin) instead of listing INPUT")
    g.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="only keys matching this gitignore-style pattern (repeatable)")
    g.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="skip keys matching this gitignore-style pattern (repeatable)")


def selection(ns: argparse.Namespace, src: Storage,
              single_key: str | None = None) -> Selection:
    """The Selection of the flags; ``single_key``: INPUT named one file."""
    from posebatch.selection import Selection, keys_from_lines

    keys: tuple[str, ...] | None = None
    if single_key is not None:
        keys = (single_key,)
    elif ns.keys_from:
        if ns.keys_from == "-":
            data = sys.stdin.buffer.read()
        else:
            from posebatch.errors import ConfigError

            try:
                with open(ns.keys_from, "rb") as f:
                    data = f.read()
            except OSError as err:
                raise ConfigError(f"--keys-from {ns.keys_from}: {err.strerror or err}") from err
        keys = keys_from_lines(data, src)
    return Selection(tuple(ns.include), tuple(ns.exclude), keys)


def job_settings(ns: argparse.Namespace) -> JobSettings:
    return from_env(JobSettings, {n: getattr(ns, n, None) for n in JOB_FIELDS})


def runtime_settings(ns: argparse.Namespace) -> RuntimeSettings:
    return from_env(RuntimeSettings, {n: getattr(ns, n, None) for n in RUNTIME_FIELDS})
