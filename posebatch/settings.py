"""One typed settings object, read from flags and ``POSEBATCH_*`` environment variables.

Why one object: the local run, the Celery task and the producer must agree on every threshold
and limit; passing a frozen dataclass (serialisable to a plain dict for the broker) makes the job
carry its own settings, so a worker started with other defaults still applies the job's.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.parse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from posebatch.errors import ConfigError
from posebatch.keys import RESULT_LAYOUTS

ENV_PREFIX = "POSEBATCH_"
QUALITIES = ("fast", "flip", "scale", "best")
"""``fast``: one pass. ``best``: horizontal-flip TTA plus a second, larger scale (README
"Quality"); ``flip`` and ``scale`` are each of the two alone, to measure them separately."""
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
BACKENDS = ("auto", "ort", "openvino")
DECODES = ("auto", "cpu", "gpu")
"""``--decode``: who decodes JPEG pixels (``RuntimeSettings.decode``)."""
DEFAULT_BATCH_IMAGES = 32
"""Images per cluster task: a lost worker loses little, the task overhead is amortised (CPU).
GPU workers want 256 or more (README)."""


def default_cache_dir() -> Path:
    base = os.environ.get("POSEBATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "posebatch"
    )
    return Path(base)


MAX_IMGSZ = 2048
MAX_IMAGE_BYTES = 128 * 1024 * 1024
MAX_SIDE = 16384


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
    quality: str = "fast"
    """One of QUALITIES: ``best`` is more accurate and about 4x slower than ``fast`` on CPU."""
    precision: str = "auto"
    """Pins the numeric precision every worker of the job runs (``fp32``, ``fp16``, ``bf16``);
    ``auto`` lets each worker take its own choice (bf16 on AMX hosts with OpenVINO, else fp32),
    so answers may differ by host within the accuracy guard (README "Precision")."""
    backend: str = "auto"
    """Pins the model runtime (``ort`` or ``openvino``); ``auto``: each worker's own choice."""
    result_layout: str = "mirror"
    """Where each result goes below OUTPUT (``posebatch.keys.RESULT_LAYOUTS``): ``mirror``
    beside the input's path, or ``sharded`` under 256 hash prefixes."""

    def __post_init__(self) -> None:
        # Upper bounds keep a typo from exhausting memory: --imgsz 100000 once held 23.6 GB.
        # Measured peak RSS of `posebatch run` at batch 4 on CPU: 2.2 GB at imgsz 2048 (README).
        checks = [
            ("imgsz", 32 <= self.imgsz <= MAX_IMGSZ and self.imgsz % 32 == 0,
             f"a multiple of 32 from 32 to {MAX_IMGSZ}"),
            ("det_conf", 0.0 <= self.det_conf <= 1.0, "in [0, 1]"),
            ("nms_iou", 0.0 < self.nms_iou <= 1.0, "in (0, 1]"),
            ("max_persons", 1 <= self.max_persons <= 1000, "from 1 to 1000"),
            ("valid_kpt_score", 0.0 <= self.valid_kpt_score <= 1.0, "in [0, 1]"),
            ("valid_min_kpts", 0 <= self.valid_min_kpts <= 21, "from 0 to 21"),
            ("valid_box_score", 0.0 <= self.valid_box_score <= 1.0, "in [0, 1]"),
            ("max_image_bytes", 1 <= self.max_image_bytes <= MAX_IMAGE_BYTES,
             f"from 1 to {MAX_IMAGE_BYTES} (128 MiB: more than any image within max_side)"),
            ("min_side", 1 <= self.min_side <= self.max_side, "from 1 to max_side"),
            ("max_side", self.max_side <= MAX_SIDE, f"at most {MAX_SIDE}"),
            ("quality", self.quality in QUALITIES, f"one of {', '.join(QUALITIES)}"),
            ("precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            ("backend", self.backend in BACKENDS, f"one of {', '.join(BACKENDS)}"),
            ("result_layout", self.result_layout in RESULT_LAYOUTS,
             f"one of {', '.join(RESULT_LAYOUTS)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name} must be {expected}; got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def pinned_runtime(self, rt: RuntimeSettings) -> RuntimeSettings:
        """``rt`` with this job's pinned precision and backend (``auto`` keeps the worker's)."""
        pins = {name: value for name, value in (("precision", self.precision),
                                                ("backend", self.backend)) if value != "auto"}
        return dataclasses.replace(rt, **pins) if pins else rt

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
    detector: str | None = None
    """Person detector ONNX for a top-down (SimCC) ``model``; None: the default model's boxes."""
    providers: str = "auto"
    """``auto`` (TensorRT when its libraries load, else CUDA when available, else CPU), ``cpu``,
    ``cuda`` or ``tensorrt``."""
    precision: str = "auto"
    """``fp32``, ``fp16`` (the copy made by ``posebatch model fp16``, converted on first use),
    ``bf16`` (OpenVINO runner only) or ``auto`` (with OpenVINO bf16 where the CPU has
    AMX/AVX512-BF16; else fp32, GPUs included). A job's own ``precision`` overrides it."""
    backend: str = "auto"
    """``ort`` (ONNX Runtime), ``openvino``, or ``auto``: ONNX Runtime on a GPU, else the faster
    of the two on this CPU, measured once per model and host (cached in ``cache_dir``)."""
    batch_size: int = 0
    """Images per model call; 0 = auto: 4 on CPU (measured: same img/s as 8 with 250 MB less
    memory, see README), 32 on CUDA."""
    intra_threads: int = 0
    """ONNX Runtime intra-op threads; 0 lets it use one per physical core."""
    io_threads: int = 0
    """Threads that download and decode images while the model runs (and write results);
    0 = auto (``io_threads_for``)."""
    decode_workers: int = 0
    """Processes that decode images into shared-memory batches (workers.engine.decodeproc);
    0: the io threads decode. Used where every image gets the same input shape (no ``rect``,
    ``quality fast``, no overlays); elsewhere the threads decode."""
    decode: str = "auto"
    """Who decodes JPEG pixels: ``cpu`` (libjpeg-turbo), ``gpu`` (nvImageCodec: on the GPU when
    the model runs there; extra ``gpu-decode``), ``auto`` (gpu when the model is on a CUDA device
    and nvImageCodec is installed). Every input rule is checked on the CPU either way."""
    broker_url: str = "redis://127.0.0.1:6379/0"
    state_url: str | None = None
    """Redis holding job state and per-image records; defaults to the broker's URL."""
    cache_dir: Path = field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        if self.providers not in ("auto", "cpu", "cuda", "tensorrt"):
            raise ConfigError("providers: expected auto, cpu, cuda or tensorrt, got "
                              f"{self.providers!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: expected auto, fp32, fp16 or bf16, got "
                              f"{self.precision!r}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: expected auto, ort or openvino, got {self.backend!r}")
        if not 0 <= self.batch_size <= 256:
            raise ConfigError(f"batch_size: expected 1 to 256 (or 0 for auto), got "
                              f"{self.batch_size}")
        if not 0 <= self.intra_threads <= 256:
            raise ConfigError(f"intra_threads: expected 0 (one per core) to 256, got "
                              f"{self.intra_threads}")
        if not 0 <= self.io_threads <= 64:
            raise ConfigError(f"io_threads: expected 0 (auto) to 64, got {self.io_threads}")
        if self.decode not in DECODES:
            raise ConfigError(f"decode: expected auto, cpu or gpu, got {self.decode!r}")
        if not 0 <= self.decode_workers <= 64:
            raise ConfigError(f"decode_workers: expected 0 (decode in the io threads) to 64 "
                              f"processes, got {self.decode_workers}")

    def io_threads_for(self, local: bool) -> int:
        """``io_threads``, or for 0 (auto): for a local folder (or images in memory) one per
        core, 2 to 4; for S3, 4, whose GETs wait on the network rather than the cores.

        Why not 4 everywhere: every one of these threads takes the GIL for its Python between
        the C calls, and on 2 cores 4 readers and 4 writers made the model's thread wait for
        it; 2 of each ran the null model 1.15x as fast (bench/host_ceiling.py, README)."""
        if self.io_threads:
            return self.io_threads
        if not local:
            return 4
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        return min(4, max(2, cores))

    def check_urls(self) -> None:
        """ConfigError (exit 3) naming the flag and variable of a malformed broker/state URL.
        Called by the commands that use them (not in __post_init__: ``run`` ignores both)."""
        check_redis_url(self.broker_url, "--broker or POSEBATCH_BROKER_URL")
        if self.state_url is not None:
            check_redis_url(self.state_url, "--state or POSEBATCH_STATE_URL")


REDIS_SCHEMES = ("redis", "rediss", "unix")


def check_redis_url(url: str, where: str) -> None:
    """Refuse a broker/state URL Redis cannot take, naming where it came from (exit 3). Why
    here: redis-py and Celery raise a bare ValueError deep inside (exit 70, "a bug") or, for
    ``http://x``, try to reach it as Redis."""
    expected = ("expected redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS) or "
                "unix:///path/to/redis.sock")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        raise ConfigError(f"{where}: {_redacted(url)!r} is not a Redis URL; {expected}")
    try:
        parts.port  # noqa: B018 - raises ValueError for "host:abc" or a port over 65535
    except ValueError as err:
        raise ConfigError(f"{where}: {_redacted(url)!r} has a bad port ({err}); {expected}") \
            from err
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"{where}: {_redacted(url)!r} names no socket path; {expected}")


def check_endpoint_url(url: str, where: str) -> None:
    """An S3 endpoint (``AWS_ENDPOINT_URL``) must be ``http(s)://host[:port]``: botocore's own
    check raises a bare ValueError ("Invalid endpoint"), which read as a bug (exit 70)."""
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for "host:abc" or a port over 65535
        port_ok = True
    except ValueError:
        port_ok = False
    if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
        raise ConfigError(f"{where}={url!r} is not an S3 endpoint URL; expected "
                          "http://HOST[:PORT] or https://HOST[:PORT] (unset it for AWS itself)")


def _redacted(url: str) -> str:
    """The URL without its password: error messages end up in logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return url



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

    state_patience: int = 60
    """Seconds a batch waits for its job state (Redis down, failing over, or full at maxmemory)
    before it goes back to the queue untouched, to come back after the visibility timeout."""

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
        if not 1 <= self.state_patience <= 24 * 3600:
            raise ConfigError(f"state_patience: expected 1 to 86400 seconds, got "
                              f"{self.state_patience}")
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


@dataclass(frozen=True)
class ServeSettings:
    """``posebatch serve``: where it listens, who may call it, how it batches and sheds load."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: str = field(default="", repr=False)
    """``KEY:SECRET[:QPS],...``; never shown in a repr or an error message."""
    api_keys_file: str | None = None
    """A file with the same entries, one per line (``#`` comments); e.g. a mounted k8s Secret."""
    qps: float = 0.0
    """Requests per second per key (the API's error 18 past it), per replica; 0 = unlimited.
    A key's own ``:QPS`` wins."""
    max_wait_ms: float = 5.0
    """How long a lone request waits for others to share its model call."""
    max_queue: int = 64
    """Requests in flight at once (reading, decoding, queued, in the model); past it a request
    is refused at once (error 2, retry later) instead of queueing without bound."""
    max_base64_bytes: int = 4 * 1024 * 1024
    """The API's rule: the ``image`` field is at most 4 MB after base64."""
    body_timeout_s: float = 10.0
    """Seconds a client has to send its whole request body (HTTP 408 after): a client sending
    at 1 byte/s must not hold a connection, let alone a ``max_queue`` slot, for minutes."""
    max_connections: int = 256
    """Connections served at once (uvicorn's ``limit_concurrency``; HTTP 503 past it): bounds the
    bodies being read before admission to ``max_connections`` x the largest body."""

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65535, "port must be in [0, 65535]"),
            (0 < self.body_timeout_s <= 3600, "body_timeout_s must be in (0, 3600]"),
            (self.max_connections >= 1, "max_connections must be >= 1"),
            (self.qps >= 0, "qps must be >= 0 (0 = unlimited)"),
            (0 <= self.max_wait_ms <= 10_000, "max_wait_ms must be in [0, 10000]"),
            (self.max_queue >= 1, "max_queue must be >= 1"),
            (self.max_base64_bytes >= 4, "max_base64_bytes must be >= 4"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{message}; got {self}")
