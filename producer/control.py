"""The control worker's task: a scheduled submission (list INPUT, enqueue its batches).

Why not on the model workers: a listing of a large prefix takes minutes and needs no model; a GPU
worker running it would sit idle. ``posebatch control`` consumes only the control queue, where
``posebatch beat`` sends this task.
"""

from __future__ import annotations

from typing import Any

from posebatch.queue import CONTROL_QUEUE, SUBMIT_JOB, make_app
from posebatch.settings import DEFAULT_BATCH_IMAGES, JobSettings, RuntimeSettings, from_env
from producer.submit import submit

app = make_app(include=["producer.control"])


@app.task(name=SUBMIT_JOB, queue=CONTROL_QUEUE)
def submit_job(input_url: str, output_url: str, settings: dict[str, Any] | None = None,
               batch_images: int = DEFAULT_BATCH_IMAGES, force: bool = False) -> str:
    """What a beat schedule entry runs: list INPUT and enqueue its batches, like `submit`."""
    rt = from_env(RuntimeSettings)
    return submit(input_url, output_url, job=JobSettings.from_dict(settings or {}),
                  broker_url=rt.broker_url, state_url=rt.state_url, batch_images=batch_images,
                  force=force)
