"""Prometheus metrics of a model worker, served by its main process on ``POSEBATCH_METRICS_PORT``.

Why multiprocess mode: batches run in Celery's pool children, the HTTP endpoint lives in the main
process; prometheus-client's multiprocess collector adds up what every child wrote to files in
``PROMETHEUS_MULTIPROC_DIR``. ``enable`` must run in the main process before the pool forks and
before anything imports prometheus_client (the mode is chosen at import). Without a port nothing
is collected and these helpers cost nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

from posebatch.records import Record

log = logging.getLogger(__name__)
ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
_metrics: dict[str, Any] | None = None


def enable(port: int) -> None:
    """Main process, before fork: set up the shared directory and serve ``/metrics``."""
    if not port:
        return
    os.environ.setdefault(ENV_DIR, tempfile.mkdtemp(prefix="posebatch-metrics-"))
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, registry=registry)
    log.warning("metrics on http://0.0.0.0:%d/metrics", port)


def _get() -> dict[str, Any] | None:
    """The metric objects, created on first use in each process (after fork), or None when
    metrics are off."""
    global _metrics
    if _metrics is None and os.environ.get(ENV_DIR):
        from prometheus_client import Counter, Gauge, Histogram

        _metrics = {
            "images": Counter("posebatch_images", "Images processed, by status and error code",
                              ["status", "code"]),
            "batch": Histogram("posebatch_batch_seconds", "Wall time of one batch task",
                               buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)),
            "in_flight": Gauge("posebatch_batches_in_flight", "Batches running now",
                               multiprocess_mode="livesum"),
            "renewals": Counter("posebatch_lease_renewals", "Held batches whose lease was "
                                "renewed"),
            "model_load": Gauge("posebatch_model_load_seconds", "Time to load the model",
                                multiprocess_mode="max"),
            "handed_back": Counter("posebatch_batches_handed_back", "Batches of jobs that run "
                                   "another model, handed back to the queue untouched"),
        }
    return _metrics


@contextlib.contextmanager
def batch() -> Iterator[None]:
    m = _get()
    if m is None:
        yield
        return
    m["in_flight"].inc()
    start = time.perf_counter()
    try:
        yield
    finally:
        m["batch"].observe(time.perf_counter() - start)
        m["in_flight"].dec()


def images(records: Iterable[Record]) -> None:
    m = _get()
    if m is None:
        return
    for r in records:
        m["images"].labels("ok" if r.ok else "error", "" if r.ok else str(r.error_code)).inc()


def lease_renewed(n: int) -> None:
    m = _get()
    if m is not None and n:
        m["renewals"].inc(n)


def model_loaded(seconds: float) -> None:
    m = _get()
    if m is not None:
        m["model_load"].set(seconds)


def handed_back() -> None:
    m = _get()
    if m is not None:
        m["handed_back"].inc()
