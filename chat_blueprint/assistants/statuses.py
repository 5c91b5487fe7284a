"""An error status from the model server as the AssistantError a call fails with.

The HTTP client reads an error status's body whole, with no deadline, before it
raises: a server that trickles that body held a call far past ASSISTANT_TIMEOUT_S,
and one that never ends it, forever and with no bound on memory. So the backend
refuses any status other than 2xx (a redirect included) itself, from the client's
response hook, having read at most ERROR_BODY_BYTES of the body by the call's
deadline; and of that body it keeps only the error code, never the upstream text,
which may echo the API key.
"""
from __future__ import annotations

import json
import math
import re
import time
from email.utils import parsedate_to_datetime
from typing import Callable

from . import AssistantError, AssistantTimeout

# Enough for an error object's code; the rest of an error body is never read.
ERROR_BODY_BYTES = 64 * 1024
SAFE_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# Statuses that say the model server (or a gateway before it) timed out: a 504 here too.
TIMEOUT_STATUSES = (408, 504)
# Statuses whose Retry-After is passed on, and the longest wait passed on.
RETRY_AFTER_STATUSES = (429, 503)
RETRY_AFTER_MAX_S = 60


def status_error(status: int, headers, body_head: bytes, redact: Callable[[str], str]) -> AssistantError:
    """A 504 for a status that says the upstream timed out, else a 502 carrying the wait a
    429 or 503 asked for; the message is the status and the upstream's error code, if any
    (`redact` takes the API key out of it)."""
    code = _error_code(body_head)
    message = redact(f"the assistant backend answered HTTP {status}{f' ({code})' if code else ''}")
    if status in TIMEOUT_STATUSES:
        return AssistantTimeout(message)
    return AssistantError(message, retry_after_s=_retry_after(status, headers))


def _error_code(body_head: bytes) -> str | None:
    """The `code` (else `type`) of an OpenAI-style error body when it is a short identifier."""
    try:
        body = json.loads(body_head)
    except (ValueError, RecursionError):  # not JSON, or cut at ERROR_BODY_BYTES
        return None
    error = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    code = next((value for value in (error.get("code"), error.get("type")) if isinstance(value, str)), None)
    return code if code and SAFE_ERROR_CODE.fullmatch(code) else None


def _retry_after(status: int, headers) -> int | None:
    """The wait a 429 or 503 asked for, in whole seconds (at most RETRY_AFTER_MAX_S): from
    `retry-after-ms` (OpenAI's) or `Retry-After` (seconds or an HTTP date); None without one."""
    if status not in RETRY_AFTER_STATUSES:
        return None
    seconds = None
    try:
        if headers.get("retry-after-ms"):
            seconds = float(headers["retry-after-ms"]) / 1000
        elif headers.get("retry-after", "").strip().isdigit():
            seconds = int(headers["retry-after"])
        elif headers.get("retry-after"):
            seconds = parsedate_to_datetime(headers["retry-after"]).timestamp() - time.time()
    except (ValueError, TypeError, OverflowError):
        return None
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(math.ceil(seconds), 0), RETRY_AFTER_MAX_S)
