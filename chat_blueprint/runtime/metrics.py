"""Prometheus metrics, counted in every worker and merged at /metrics.

Metrics work under several gunicorn workers through prometheus_client's
multiprocess mode: gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a fresh
directory before the workers start, and `exposition()` merges every worker's
files. No Flask here: the services count assistant calls and tokens, the
request log counts requests, and api/ops.py serves the text.
"""
from __future__ import annotations

import os

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

REQUESTS = Counter("http_requests_total", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram("http_request_duration_seconds", "Time to answer an HTTP request", ["method", "route"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
ASSISTANT_LATENCY = Histogram("assistant_duration_seconds", "Time the assistant backend took for one reply",
                              ["backend", "outcome"], buckets=(0.001, 0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60))
PROMPT_TOKENS = Counter("assistant_prompt_tokens_total", "Prompt tokens the assistant backend reported",
                        ["backend", "model"])
COMPLETION_TOKENS = Counter("assistant_completion_tokens_total", "Completion tokens the assistant backend reported",
                            ["backend", "model"])
# Changes of a user's rating of a reply: how the team running a model learns
# which model's replies users rate down. One count per change, under the new
# rating ("none": cleared); an "up" changed to "down" counts once under each.
FEEDBACK = Counter("assistant_feedback_total", "Changes of users' ratings of assistant replies",
                   ["rating", "model"])
# `model` is what the backend reported, so a misbehaving one could name a new
# model in every answer; past this many names per process they count as "other".
MODEL_LABELS_MAX = 32
_model_labels: set[str] = set()
POOL_IN_USE = Gauge("db_pool_connections_in_use", "Database connections checked out of the pool",
                    multiprocess_mode="livesum")


def observe_assistant(backend: str, outcome: str, seconds: float) -> None:
    ASSISTANT_LATENCY.labels(backend, outcome).observe(seconds)


def _model_label(model: str | None) -> str:
    """The model's name as a label, "unknown" for none, "other" past MODEL_LABELS_MAX names."""
    label = model or "unknown"
    if label not in _model_labels:
        if len(_model_labels) >= MODEL_LABELS_MAX:
            return "other"
        _model_labels.add(label)
    return label


def observe_tokens(backend: str, model: str | None, usage: dict) -> None:
    """Count a reply's tokens by the model that produced them (cost per model)."""
    label = _model_label(model)
    PROMPT_TOKENS.labels(backend, label).inc(usage["prompt_tokens"])
    COMPLETION_TOKENS.labels(backend, label).inc(usage["completion_tokens"])


def count_feedback(rating: str | None, model: str | None) -> None:
    """A user changed their rating of a reply of `model` to `rating` (None: cleared)."""
    FEEDBACK.labels(rating or "none", _model_label(model)).inc()


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


def exposition() -> tuple[bytes, str]:
    """The metrics in Prometheus text format and its content type, merged over
    every worker when multiprocess mode is on."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST  # the content type names its charset already
