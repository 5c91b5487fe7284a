"""JSON log lines, for the app and for gunicorn alike (stdlib only).

gunicorn's master configures its logging with this formatter before any
worker exists, so this module imports nothing but the standard library (see
`__init__.py`: the package itself imports Flask lazily).
"""
from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar
from datetime import datetime, timezone

# The id of the request being served, set by observability.py.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

ACCESS_FIELDS = ("method", "route", "path", "status", "duration_ms", "user_id")
# What json.dumps leaves raw that a reader of the log must not get raw from a
# request (a path, a token's `sub`, a request line gunicorn refused): DEL and
# the C1 controls (U+0085 ends a line for str.splitlines()), the line and
# paragraph separators, and the bidirectional overrides and isolates, which
# make a terminal show a line in another order than it was written.
UNSAFE_CHARACTERS = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and
    the access fields when present. The characters of UNSAFE_CHARACTERS are
    written as JSON escapes (`\\u2028`): the line reads back the same, and is
    one line to any reader."""

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
        return UNSAFE_CHARACTERS.sub(_escaped, json.dumps(entry, ensure_ascii=False))
