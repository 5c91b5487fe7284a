"""A request id and one JSON access line per request.

Every request gets an id: a valid incoming `X-Request-ID` is kept, anything
else is replaced by a fresh one; it is echoed in the response and attached to
every log line written while the request runs. One access line per request
is logged at INFO with the route template, status and duration; never the
query string, a header, a token or a message's content.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
import uuid

from flask import Flask, Response, g, request

from .logs import JsonFormatter
from .logs import request_id as _request_id
from .metrics import LATENCY, REQUESTS

REQUEST_ID_HEADER = "X-Request-ID"
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
LOGGER = "chat_blueprint"


def configure_logging() -> None:
    """JSON lines on stdout for the package's loggers, written once each.

    Under gunicorn, gunicorn.conf.py's logging configuration gives the root
    logger the JSON stdout handler, and the package's records reach it by
    propagation; a handler of the package's own would write each line a
    second time. Only where nothing is configured (`flask run`, a script)
    does the package get a handler of its own.
    """
    logger = logging.getLogger(LOGGER)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        logger.propagate = False  # a root handler added later would print every line a second time
    logger.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())


def _start_request() -> None:
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if VALID_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    g.request_id = request_id
    g.request_id_token = _request_id.set(request_id)
    g.started = time.perf_counter()


def _finish_request(response: Response) -> Response:
    request_id = g.get("request_id")
    if request_id:
        response.headers[REQUEST_ID_HEADER] = request_id
    started = g.get("started")
    if started is None:
        return response
    elapsed = time.perf_counter() - started
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    REQUESTS.labels(request.method, route, str(response.status_code)).inc()
    LATENCY.labels(request.method, route).observe(elapsed)
    logging.getLogger(f"{LOGGER}.access").info(
        "request", extra={"method": request.method, "route": route, "path": request.path,
                          "status": response.status_code, "duration_ms": round(elapsed * 1000, 2),
                          "user_id": g.get("user_id")})
    return response


def _end_request(exc) -> None:
    token = g.pop("request_id_token", None)
    if token is not None:
        _request_id.reset(token)


def install(app: Flask) -> None:
    configure_logging()
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(_end_request)
