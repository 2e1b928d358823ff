"""Scheduled jobs: cron expressions in a TOML file, run by Celery beat.

Why beat sends ``posebatch.submit_job`` instead of listing itself: beat must stay a tiny,
single process; the submission (the listing) runs on the control worker (``posebatch
control``), never on a model worker. Each run lists
the whole INPUT again; images with results are skipped, so the summary at OUTPUT always covers
everything in INPUT.

File format (``deploy/schedules.example.toml``)::

    [[job]]
    name = "nightly"
    cron = "0 2 * * *"           # minute hour day-of-month month day-of-week (UTC)
    input = "s3://bucket/in/"
    output = "s3://bucket/out/"
    batch_images = 32            # optional
    [job.settings]               # optional job settings, as in `posebatch run --help`
    valid_box_score = 0.05
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from posebatch.errors import ConfigError
from posebatch.queue import SUBMIT_JOB
from posebatch.settings import DEFAULT_BATCH_IMAGES, JobSettings


def parse_cron(expr: str):
    from celery.schedules import crontab

    fields = expr.split()
    if len(fields) != 5:
        raise ConfigError(f"cron {expr!r}: expected 5 fields (minute hour day month weekday), "
                          f"got {len(fields)}")
    minute, hour, dom, month, dow = fields
    try:
        return crontab(minute=minute, hour=hour, day_of_month=dom, month_of_year=month,
                       day_of_week=dow)
    except ValueError as err:
        raise ConfigError(f"cron {expr!r}: {err}") from err


def load_schedule(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read the TOML file into a Celery ``beat_schedule`` mapping; errors name the entry."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"schedule file {path}: {err}") from err
    entries = data.get("job", [])
    if not entries:
        raise ConfigError(f"schedule file {path}: no [[job]] entries")
    schedule: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        name = entry.get("name") or f"job-{i}"
        missing = [k for k in ("cron", "input", "output") if k not in entry]
        if missing:
            raise ConfigError(f"schedule {path}, job {name!r}: missing {missing}")
        if name in schedule:
            raise ConfigError(f"schedule {path}: job name {name!r} used twice")
        settings = JobSettings.from_dict(entry.get("settings", {})).to_dict()
        schedule[name] = {
            "task": SUBMIT_JOB,
            "schedule": parse_cron(entry["cron"]),
            "kwargs": {"input_url": entry["input"], "output_url": entry["output"],
                       "settings": settings,
                       "batch_images": int(entry.get("batch_images", DEFAULT_BATCH_IMAGES)),
                       "force": bool(entry.get("force", False)),
                       "inventory": entry.get("inventory")},
        }
    return schedule
