"""Prometheus metrics of ``posebatch serve``, in a registry of its own (no global state).

Why these: request rate and latency by API code say whether clients are served; batch sizes and
model time say whether dynamic batching is working; in-flight requests against the limit say
when to scale out (the HPA can follow them through a Prometheus adapter).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, max_batch: int, max_pending: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "posebatch_serve_requests", "body_analysis requests by API result code "
            "(0 = persons returned; disconnected: the client left mid-body; body_timeout)",
            ["code"], registry=r)
        self.latency = Histogram(
            "posebatch_serve_request_seconds", "body_analysis time from request to answer",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("posebatch_serve_token_requests", "token requests", registry=r)
        self.batch = Histogram(
            "posebatch_serve_batch_size", "images per model call",
            buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, max_batch})), registry=r)
        self.model_seconds = Histogram(
            "posebatch_serve_model_seconds", "time of one model call (batch)",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("posebatch_serve_inflight",
                              "requests admitted and not yet answered", registry=r)
        Gauge("posebatch_serve_max_inflight", "limit on admitted requests (--max-queue)",
              registry=r).set(max_pending)

    def observe_request(self, code: int | str, seconds: float) -> None:
        self.requests.labels(code=str(code)).inc()
        self.latency.observe(seconds)

    def observe_token(self) -> None:
        self.tokens.inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch.observe(size)
        self.model_seconds.observe(seconds)

    def render(self, inflight: int) -> tuple[bytes, str]:
        self.inflight.set(inflight)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
