"""One typed settings object, read from flags and ``POSEBATCH_*`` environment variables.

Why one object: the local run, the Celery task and the producer must agree on every threshold
and limit; passing a frozen dataclass (serialisable to a plain dict for the broker) makes the job
carry its own settings, so a worker started with other defaults still applies the job's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from posebatch.errors import ConfigError

ENV_PREFIX = "POSEBATCH_"
DEFAULT_BATCH_IMAGES = 32
"""Images per cluster task: a lost worker loses little, the task overhead is amortised (CPU).
GPU workers want 256 or more (README)."""


def default_cache_dir() -> Path:
    base = os.environ.get("POSEBATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "posebatch"
    )
    return Path(base)


@dataclass(frozen=True)
class JobSettings:
    """What decides a job's output; travels with every task so all workers apply the same."""

    imgsz: int = 640
    """Letterbox side (pixels) fed to the model; multiple of 32."""
    det_conf: float = 0.05
    """Persons below this box score are not reported at all."""
    nms_iou: float = 0.6
    max_persons: int = 100
    valid_kpt_score: float = 0.2
    """Validity rule of the seed: more than ``valid_min_kpts`` keypoints above this score ..."""
    valid_min_kpts: int = 3
    valid_box_score: float = 0.03
    """... and a box score above this. Only valid persons are counted in the aggregates."""
    max_image_bytes: int = 4 * 1024 * 1024
    """Limit on the encoded file size (raw bytes, not base64; see README)."""
    min_side: int = 15
    max_side: int = 4096
    rect: bool = False
    """Letterbox to the smallest stride-aligned rectangle (e.g. 480x640 for 4:3) instead of a
    square: fewer pixels, same scale. Only for models with dynamic height/width."""

    def __post_init__(self) -> None:
        checks = [
            (self.imgsz >= 32 and self.imgsz % 32 == 0, "imgsz must be a multiple of 32 >= 32"),
            (0.0 <= self.det_conf <= 1.0, "det_conf must be in [0, 1]"),
            (0.0 < self.nms_iou <= 1.0, "nms_iou must be in (0, 1]"),
            (self.max_persons >= 1, "max_persons must be >= 1"),
            (0.0 <= self.valid_kpt_score <= 1.0, "valid_kpt_score must be in [0, 1]"),
            (0 <= self.valid_min_kpts <= 21, "valid_min_kpts must be in [0, 21]"),
            (0.0 <= self.valid_box_score <= 1.0, "valid_box_score must be in [0, 1]"),
            (self.max_image_bytes > 0, "max_image_bytes must be > 0"),
            (1 <= self.min_side <= self.max_side, "need 1 <= min_side <= max_side"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message}; got {self}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(
                f"unknown job settings {sorted(unknown)}; expected some of {sorted(known)}"
            )
        return cls(**data)


@dataclass(frozen=True)
class RuntimeSettings:
    """How this process runs (not part of a job's identity): model file, threads, batch size."""

    model: str | None = None
    """Path of the ONNX model; None means the default model built by ``posebatch model build``."""
    int8: bool = False
    """Use the INT8 copy made by ``posebatch model quantize`` next to the model."""
    providers: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``."""
    batch_size: int = 0
    """Images per model call; 0 = auto: 4 on CPU (measured: same img/s as 8 with 250 MB less
    memory, see README), 32 on CUDA."""
    intra_threads: int = 0
    """ONNX Runtime intra-op threads; 0 lets it use one per physical core."""
    io_threads: int = 4
    """Threads that download and decode images while the model runs."""
    broker_url: str = "redis://127.0.0.1:6379/0"
    state_url: str | None = None
    """Redis holding job state and per-image records; defaults to the broker's URL."""
    cache_dir: Path = field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        if self.providers not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"providers: expected auto, cpu or cuda, got {self.providers!r}")
        if self.batch_size < 0:
            raise ConfigError(f"batch_size: expected >= 1 (or 0 for auto), got {self.batch_size}")
        if self.io_threads < 1:
            raise ConfigError(f"io_threads: expected >= 1, got {self.io_threads}")



@dataclass(frozen=True)
class ClusterSettings:
    """How the cluster keeps its promises: leases on batches, how long job state is kept.

    Read from ``POSEBATCH_*`` variables by every process of the cluster (workers, control worker,
    producer); they must agree, so set them once in the deployment's environment.
    """

    visibility_timeout: int = 60
    """Seconds an unacknowledged batch stays invisible before Redis gives it to another worker.
    A live worker renews it (``lease_renew``), so it bounds how long a lost machine's batch
    waits, not how long a batch may run."""
    lease_renew: float = 0.0
    """Seconds between lease renewals by a worker's main process; 0 = a quarter of the
    visibility timeout (15 s by default), so a missed renewal or two (a Redis blip) does not
    hand a running batch out again."""
    job_retention: int = 7 * 24 * 3600
    """Seconds a finished job's state (records, counters) stays in Redis for ``status``; every
    job key gets this expiry when the job is finalized. The results live in storage."""

    storage_patience: int = 600
    """Seconds a cluster batch waits out a storage outage (connection refused, timeouts, 5xx),
    retrying with backoff up to a minute apart, before its images are recorded as failed."""

    requeue_after: int = 30
    """Seconds a running job may go without a recorded image before `wait` and the control
    worker look for batches lost with a machine (neither queued nor held) and queue them again."""

    queue_high_water: int = 5000
    """Batches the queue may hold before `submit` waits for workers to drain it (back-pressure):
    a 10M-image submission otherwise puts every batch into Redis at once. 0 = no limit."""

    metrics_port: int = 0
    """Port of a model worker's Prometheus endpoint (``/metrics``), served by its main
    process; 0 = off."""

    def __post_init__(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port: expected 0 to 65535, got {self.metrics_port}")
        if self.queue_high_water < 0:
            raise ConfigError(f"queue_high_water: expected >= 0, got {self.queue_high_water}")
        if not 1 <= self.requeue_after <= 24 * 3600:
            raise ConfigError(f"requeue_after: expected 1 to 86400 seconds, got "
                              f"{self.requeue_after}")
        if not 0 <= self.storage_patience <= 24 * 3600:
            raise ConfigError("storage_patience: expected 0 to 86400 seconds, got "
                              f"{self.storage_patience}")
        if not 2 <= self.visibility_timeout <= 24 * 3600:
            raise ConfigError("visibility_timeout: expected 2 to 86400 seconds, got "
                              f"{self.visibility_timeout}")
        if self.lease_renew != 0 and not 0.1 <= self.lease_renew <= self.visibility_timeout / 2:
            raise ConfigError(f"lease_renew: expected 0.1 s to half the visibility timeout "
                              f"({self.visibility_timeout / 2:g} s), got {self.lease_renew}")
        if self.job_retention < 60:
            raise ConfigError(f"job_retention: expected >= 60 seconds, got {self.job_retention}")

    @property
    def renew_seconds(self) -> float:
        return self.lease_renew or self.visibility_timeout / 4


def from_env(cls: type, overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None):
    """Build ``cls`` from defaults < ``POSEBATCH_<FIELD>`` variables < explicit overrides (flags).

    Overrides whose value is None are ignored, so argparse flags left unset fall through to the
    environment.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(cls):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None or raw == "":
            continue
        values[f.name] = _coerce(f.name, raw, f.type)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
    return cls(**values)


def _coerce(name: str, raw: str, typ: Any) -> Any:
    typ = str(typ)
    if typ == "bool":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected true or false, got {raw!r}")
    try:
        if typ.startswith("int"):
            return int(raw)
        if typ.startswith("float"):
            return float(raw)
        if typ == "Path":
            return Path(raw)
    except ValueError as err:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}: expected {typ}, got {raw!r}") from err
    return raw
