"""JSON logs with a request id, and Prometheus metrics at /metrics.

Every request gets an id: a valid incoming `X-Request-ID` is kept, anything
else is replaced by a fresh one; it is echoed in the response and attached to
every log line written while the request runs. One access line per request
is logged at INFO with the route template, status and duration; never the
query string, a header, a token or a message's content.

Metrics work under several gunicorn workers through prometheus_client's
multiprocess mode: gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before the workers start, and /metrics merges every worker's files.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
import uuid

from flask import Blueprint, Flask, Response, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from sqlalchemy import event

from .logs import JsonFormatter
from .logs import request_id as _request_id

REQUEST_ID_HEADER = "X-Request-ID"
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
LOGGER = "chat_blueprint"


REQUESTS = Counter("http_requests_total", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram("http_request_duration_seconds", "Time to answer an HTTP request", ["method", "route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
ASSISTANT_LATENCY = Histogram("assistant_duration_seconds", "Time the assistant backend took for one reply",
                              ["backend", "outcome"], buckets=(0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60))
PROMPT_TOKENS = Counter("assistant_prompt_tokens_total", "Prompt tokens the assistant backend reported",
                        ["backend", "model"])
COMPLETION_TOKENS = Counter("assistant_completion_tokens_total", "Completion tokens the assistant backend reported",
                            ["backend", "model"])
# `model` is what the backend reported, so a misbehaving one could name a new
# model in every answer; past this many names per process they count as "other".
MODEL_LABELS_MAX = 32
_model_labels: set[str] = set()
POOL_IN_USE = Gauge("db_pool_connections_in_use", "Database connections checked out of the pool",
                    multiprocess_mode="livesum")


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


def observe_assistant(backend: str, outcome: str, seconds: float) -> None:
    ASSISTANT_LATENCY.labels(backend, outcome).observe(seconds)


def observe_tokens(backend: str, model: str | None, usage: dict) -> None:
    """Count a reply's tokens by the model that produced them (cost per model)."""
    label = model or "unknown"
    if label not in _model_labels:
        if len(_model_labels) >= MODEL_LABELS_MAX:
            label = "other"
        else:
            _model_labels.add(label)
    PROMPT_TOKENS.labels(backend, label).inc(usage["prompt_tokens"])
    COMPLETION_TOKENS.labels(backend, label).inc(usage["completion_tokens"])


def watch_pool(engine) -> None:
    """Count checked-out connections (a gauge summed over live workers)."""
    if event.contains(engine, "checkout", _checked_out):
        return
    event.listen(engine, "checkout", _checked_out)
    event.listen(engine, "checkin", _checked_in)


def _checked_out(dbapi_connection, connection_record, connection_proxy) -> None:
    POOL_IN_USE.inc()


def _checked_in(dbapi_connection, connection_record) -> None:
    POOL_IN_USE.dec()


metrics = Blueprint("metrics", __name__)


@metrics.get("/metrics")
def metrics_endpoint():
    """Prometheus text format, merged over every worker when multiprocess mode is on."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)  # it names its charset already


def install(app: Flask) -> None:
    configure_logging()
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(_end_request)
    app.register_blueprint(metrics)
