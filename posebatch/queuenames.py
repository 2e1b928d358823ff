"""The names the producer and the workers agree on: queues and tasks.

Why apart from ``posebatch.queue``: the command line needs the queue names to build its
``--help`` for every subcommand, and importing them from the Celery app's module loaded Celery,
kombu and redis (~0.2 s) even for ``posebatch run``, which never touches a broker.
"""

from __future__ import annotations

QUEUE = "posebatch"
"""Batches of images: consumed by model workers."""
CONTROL_QUEUE = "posebatch-control"
"""Job-level work (scheduled submissions): consumed by a control worker, not by model workers."""
PROCESS_BATCH = "posebatch.process_batch"
SUBMIT_JOB = "posebatch.submit_job"
