"""Build the engine, the batcher and the app from settings, then run uvicorn until stopped.

Why one process per model: the model session is per process (as in a Celery worker), and one
ONNX Runtime session already uses every core (or the GPU); more throughput comes from more
replicas behind a load balancer, not from uvicorn's ``--workers``.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from posebatch.modelstore import ModelRef
from posebatch.settings import JobSettings, RuntimeSettings, ServeSettings
from workers.engine.pipeline import PoseEngine
from workers.loading import open_model
from workers.serve.app import ServeConfig, create_app
from workers.serve.auth import Authority, load_keys
from workers.serve.batcher import Batcher
from workers.serve.metrics import Metrics

log = logging.getLogger("posebatch.serve")


def load_authority(settings: ServeSettings, no_auth: bool) -> Authority | None:
    """The key list, or None with ``--no-auth``; refuses to go on with neither (ConfigError)."""
    from posebatch.errors import ConfigError

    keys = load_keys(settings.api_keys, settings.api_keys_file, settings.qps)
    if no_auth:
        if keys:
            log.warning("--no-auth: ignoring the %d configured API keys", len(keys))
        return None
    if not keys:
        raise ConfigError("no API keys: set POSEBATCH_API_KEYS=KEY:SECRET[,KEY2:SECRET2] or "
                          "--api-keys-file FILE (one KEY:SECRET[:QPS] per line); or pass "
                          "--no-auth to accept every request (only behind a trusted gateway)")
    log.info("API keys: %s", ", ".join(sorted(k for k in keys)))  # ids only, never secrets
    return Authority(keys)


def build_batcher(model: ModelRef, job: JobSettings, runtime: RuntimeSettings,
                  settings: ServeSettings, metrics_factory=Metrics) -> tuple[Batcher, Metrics]:
    threads = runtime.io_threads_for(local=True)  # the requests' images are in memory
    engine = PoseEngine(open_model(runtime, model), job, runtime.batch_size, threads)
    _warm_up(engine)
    metrics = metrics_factory(engine.batch_size, settings.max_queue)
    batcher = Batcher(engine, max_batch=engine.batch_size, max_wait_ms=settings.max_wait_ms,
                      max_pending=settings.max_queue, decode_threads=threads,
                      on_batch=metrics.observe_batch)
    return batcher, metrics


def _warm_up(engine: PoseEngine) -> None:
    """One model call before the port opens: the first call plans memory and kernels (slow),
    and a client should not pay for that."""
    side = engine.job.imgsz
    h, w = engine.model.info.fixed_hw or (side, side)
    n = engine.model.info.fixed_batch or 1
    job = engine.job
    engine.model.infer(np.zeros((n, 3, h, w), np.float32), job.det_conf, job.nms_iou,
                       job.max_persons)


def serve(model: ModelRef, job: JobSettings, runtime: RuntimeSettings, settings: ServeSettings,
          authority: Authority | None) -> None:
    import uvicorn

    batcher, metrics = build_batcher(model, job, runtime, settings)
    app = create_app(batcher, authority,
                     ServeConfig(settings.max_base64_bytes, settings.body_timeout_s), metrics)
    print(f"posebatch serve: http://{settings.host}:{settings.port} (model {model.name} on "
          f"{batcher.engine.model.info.provider}, max batch {batcher.max_batch}, max wait "
          f"{settings.max_wait_ms:g} ms, max in flight {settings.max_queue}, auth "
          f"{'off' if authority is None else 'on'})", file=sys.stderr, flush=True)
    # access_log off: uvicorn's access log prints query strings, which carry access tokens
    # (and, on the token URL, client secrets). The app logs method, path and result instead.
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False,
                log_config=None, timeout_graceful_shutdown=30,
                limit_concurrency=settings.max_connections)
