"""Reading a finished job's results back, streamed: the summary, the count table, each JSON.

Why the count table drives it: the current rows (``_counts.csv`` and the per-job tables not
compacted into it yet, merged) list every image once, sorted, with its status and
upright size, so an export visits results in a stable order, skips failures without opening them,
and never decodes an image. Result files are fetched a window ahead on threads (S3 latency).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any

from posebatch.aggregate import SUMMARY_NAME
from posebatch.errors import ConfigError, StorageNotFound
from posebatch.keys import result_key
from posebatch.roottables import current_rows, current_summary
from posebatch.settings import JobSettings
from posebatch.storage import Storage, open_storage

WINDOW = 64


@dataclass(frozen=True)
class Row:
    key: str
    ok: bool
    width: int | None
    height: int | None


class JobOutput:
    """A finished job's output folder or prefix."""

    def __init__(self, url: str, storage: Storage | None = None) -> None:
        self.storage = storage or open_storage(url)
        try:
            self.summary: dict[str, Any] = json.loads(self.storage.read(SUMMARY_NAME))
        except StorageNotFound as err:
            raise ConfigError(
                f"{self.storage.join(SUMMARY_NAME)} does not exist: {url} is not a finished job's "
                f"output (wait for `posebatch status` to say done, or run `posebatch run`)"
            ) from err

    @property
    def settings(self) -> dict[str, Any]:
        return self.summary.get("settings", {})

    def job_settings(self) -> JobSettings:
        """The job's settings; fields this version does not know (a newer writer) are ignored."""
        known = {f.name for f in fields(JobSettings)}
        return JobSettings.from_dict({k: v for k, v in self.settings.items() if k in known})

    def input_storage(self) -> Storage | None:
        url = self.summary.get("input")
        return open_storage(url) if url else None

    def rows(self) -> Iterator[Row]:
        """The output's current rows (the root base and the per-job tables not compacted into
        it yet, newest row of an image winning: ``roottables.current_rows``), in key order,
        streamed from local files (a table on S3 is downloaded first, ~70 bytes per image)."""
        with current_rows(self.storage) as records:
            for r in records:
                yield Row(r.key, r.ok, r.width, r.height)

    def current_summary(self) -> dict[str, Any]:
        """The summary with exact counts: the stored one, or, while per-job tables are pending
        (not compacted into the root tables yet), one tallied over the current rows."""
        if not self.summary.get("pending"):
            return self.summary
        return current_summary(self.storage)

    def results(self, rows: Iterator[Row], threads: int = 8
                ) -> Iterator[tuple[Row, dict[str, Any]]]:
        """``(row, result)`` for the ``ok`` rows, in order, fetched ``WINDOW`` ahead."""
        window: deque[tuple[Row, Future[dict[str, Any]]]] = deque()
        with ThreadPoolExecutor(threads, thread_name_prefix="results") as pool:
            for row in rows:
                if not row.ok:
                    continue
                window.append((row, pool.submit(self._load, row.key)))
                if len(window) >= WINDOW:
                    row0, fut = window.popleft()
                    yield row0, fut.result()
            while window:
                row0, fut = window.popleft()
                yield row0, fut.result()

    @property
    def layout(self) -> str:
        """Where the job put each result (``posebatch.keys.RESULT_LAYOUTS``)."""
        return str(self.settings.get("result_layout", "mirror"))

    def result_key(self, key: str) -> str:
        return result_key(key, self.layout)

    def _load(self, key: str) -> dict[str, Any]:
        return json.loads(self.storage.read(self.result_key(key)))
