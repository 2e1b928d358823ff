"""``posebatch serve``: the original body-analysis API over HTTP, for its existing clients."""

from __future__ import annotations

import argparse

from posebatch.cli import exitcodes
from posebatch.cli.flags import add_job_flags, add_runtime_flags, job_settings, runtime_settings
from posebatch.settings import ServeSettings, from_env

SERVE_FIELDS = ("host", "port", "api_keys_file", "qps", "max_wait_ms", "max_queue",
                "max_base64_bytes", "body_timeout_s", "max_connections")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve the cloud body-analysis API (its SDK works unchanged)",
        description=cmd_serve.__doc__)
    g = p.add_argument_group("server (also POSEBATCH_<NAME> environment variables)")
    g.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    g.add_argument("--port", type=int, help="port (default 8080)")
    g.add_argument("--api-keys-file",
                   help="file of KEY:SECRET[:QPS] lines (POSEBATCH_API_KEYS takes the same "
                        "entries, comma-separated)")
    g.add_argument("--no-auth", action="store_true",
                   help="accept requests without a valid token (only behind a trusted gateway)")
    g.add_argument("--qps", type=float,
                   help="requests/s per key and replica, error 18 past it (default 0 = no limit)")
    g.add_argument("--max-batch", dest="batch_size", type=int, metavar="N",
                   help="most requests per model call (same as --batch-size; default auto: 4 on "
                        "CPU, 32 on CUDA)")
    g.add_argument("--max-wait-ms", type=float,
                   help="how long a request waits for others to share its model call "
                        "(default 5)")
    g.add_argument("--max-queue", type=int,
                   help="requests in flight at once; more are refused with error 2 (default 64)")
    g.add_argument("--max-base64-bytes", type=int,
                   help="largest image field after base64 (default 4194304, the API's 4 MB)")
    g.add_argument("--body-timeout", dest="body_timeout_s", type=float, metavar="S",
                   help="seconds a client has to send its whole body; slower ones get HTTP 408 "
                        "and do not hold a --max-queue slot meanwhile (default 10)")
    g.add_argument("--max-connections", type=int,
                   help="connections served at once, HTTP 503 past it (default 256)")
    add_job_flags(p)
    add_runtime_flags(p)
    p.set_defaults(handler=cmd_serve)


def cmd_serve(ns: argparse.Namespace) -> int:
    """POST /rest/2.0/image-classify/v1/body_analysis (form field image, base64) answers the per-
    image JSON of `run`; /oauth/2.0/token gives access tokens for the keys in POSEBATCH_API_KEYS
    or --api-keys-file; /healthz; /metrics (Prometheus). Concurrent requests share model calls
    (dynamic batching)."""
    from workers.loading import select_model
    from workers.serve.server import load_authority, serve

    settings = from_env(ServeSettings, {n: getattr(ns, n, None) for n in SERVE_FIELDS})
    authority = load_authority(settings, ns.no_auth)  # before the model: fail fast
    job, runtime = job_settings(ns), runtime_settings(ns)
    model = select_model(runtime).ref
    serve(model, job, runtime, settings, authority)
    return exitcodes.OK
