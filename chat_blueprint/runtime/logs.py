"""JSON log lines, for the app and for gunicorn alike (stdlib only).

gunicorn's master configures its logging with this formatter before any
worker exists, so this module imports nothing but the standard library (see
`__init__.py`: the package itself imports Flask lazily).
"""
from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import datetime, timezone

# The id of the request being served, set by observability.py.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

ACCESS_FIELDS = ("method", "route", "path", "status", "duration_ms", "user_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and
    the access fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = getattr(record, "request_id", None) or request_id.get()
        if current:
            entry["request_id"] = current
        for name in ACCESS_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)
