"""Operational routes: liveness, readiness, metrics and the OpenAPI document."""
from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from ..db.extensions import db
from ..db.isolation import IsolationNotInForce, check_now
from ..runtime import metrics

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """200 while the process is up; says nothing about the database."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """200 when the database answers and isolation is in force, else 503 with
    the reason (a database that does not answer goes to the 503 handler).
    The verdict also becomes this process's, so the API follows it at once."""
    problems = check_now(db.engine)
    current_app.extensions["isolation_watch"].record(problems)
    if problems:
        raise IsolationNotInForce(problems)
    return {"status": "ready"}


@bp.get("/metrics")
def metrics_endpoint():
    """Prometheus text format, merged over every worker."""
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


@bp.get("/api/openapi.json")
def openapi():
    from .openapi import openapi_document

    return jsonify(openapi_document())
