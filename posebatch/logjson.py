"""One JSON object per log line (``posebatch --log-json`` or ``POSEBATCH_LOG_JSON=1``).

Why: a cluster's logs go to a collector (Loki, CloudWatch, Elasticsearch) that indexes fields;
JSON lines need no parsing rules there. Celery's worker logs go through the same root handler.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "process": record.processName,
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
