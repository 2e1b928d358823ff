"""``posebatch worker`` (model worker, one per GPU) and ``posebatch control`` (job-level tasks)."""

from __future__ import annotations

import argparse
import os

from posebatch.cli import exitcodes
from posebatch.cli.flags import RUNTIME_FIELDS, add_broker_flags, add_runtime_flags, bounded
from posebatch.queuenames import CONTROL_QUEUE, QUEUE
from posebatch.settings import RuntimeSettings, from_env


def _celery_flags(p: argparse.ArgumentParser, queues: str) -> None:
    p.add_argument("--queues", default=queues, help=f"queues to consume (default {queues})")
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")
    p.add_argument("--hostname", help="worker node name (Celery -n), e.g. gpu0@%%h")
    p.add_argument("celery_args", nargs="*", help="passed to celery worker")
    add_broker_flags(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run a model worker (one process per GPU)",
                       description="Consume batches from the broker. Needs no flags when "
                       "POSEBATCH_BROKER_URL and the AWS_* variables are set. Extra arguments "
                       "after -- go to `celery worker`.")
    p.add_argument("--concurrency", type=bounded(int, 1, 256), default=1,
                   help="worker processes (default 1: one per GPU; on CPU one process uses "
                        "all cores through ONNX Runtime's threads)")
    _celery_flags(p, QUEUE)
    add_runtime_flags(p, engine=True)
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("control", help="run the control worker (scheduled submissions)",
                       description="Consume the control queue: the submissions `posebatch beat` "
                       "sends. Loads no model; one small process per cluster is enough.")
    _celery_flags(p, CONTROL_QUEUE)
    p.set_defaults(handler=cmd_control)


def _export_runtime(ns: argparse.Namespace) -> None:
    """Flags become POSEBATCH_* variables, read by the worker's child processes after fork."""
    for name in RUNTIME_FIELDS:
        value = getattr(ns, name, None)
        if value is not None:
            os.environ[f"POSEBATCH_{name.upper()}"] = str(value)


def _celery_argv(ns: argparse.Namespace, concurrency: int, pool: str) -> list[str]:
    return ["worker", f"--concurrency={concurrency}", f"--pool={pool}", f"--queues={ns.queues}",
            f"--loglevel={ns.loglevel}", "--prefetch-multiplier=1", "--without-gossip",
            "--without-mingle", *([f"--hostname={ns.hostname}"] if ns.hostname else []),
            *ns.celery_args]


def cmd_worker(ns: argparse.Namespace) -> int:
    _export_runtime(ns)
    from posebatch.s3storage import check_s3_environment

    rt = from_env(RuntimeSettings)
    rt.check_urls()  # a malformed broker or S3 endpoint URL: exit 3 now, naming it
    check_s3_environment()
    from workers.celery_app import app
    from workers.loading import select_model

    # Fail now, with a clear message, not later in each child process; and make the fp16 copy
    # here, once, before the children start.
    select_model(rt)
    from posebatch.settings import ClusterSettings
    from workers import metrics

    metrics.enable(from_env(ClusterSettings).metrics_port)  # before the pool forks
    app.worker_main(_celery_argv(ns, ns.concurrency, "prefork"))
    return exitcodes.OK


def cmd_control(ns: argparse.Namespace) -> int:
    _export_runtime(ns)
    from_env(RuntimeSettings).check_urls()
    from producer.control import app

    app.worker_main(_celery_argv(ns, 1, "threads"))  # main thread: lease + watchdog
    return exitcodes.OK
