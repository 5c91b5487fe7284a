"""Service routes: liveness, readiness, and the OpenAPI document."""
from __future__ import annotations

from flask import Blueprint, jsonify
from sqlalchemy import exc as sa_exc

from .errors import error_response
from .isolation import check_now

bp = Blueprint("service", __name__)


@bp.get("/healthz")
def healthz():
    """200 while the process is up; says nothing about the database."""
    return {"status": "ok"}


@bp.get("/readyz")
def readyz():
    """200 when the database answers and isolation is in force, else 503 with the reason."""
    try:
        problems = check_now()
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError):
        return error_response(503, "database_unavailable", "the database does not answer", {"Retry-After": "2"})
    if problems:
        return error_response(503, "isolation_not_in_force", "; ".join(problems), {"Retry-After": "30"})
    return {"status": "ready"}


@bp.get("/api/openapi.json")
def openapi():
    from .openapi import openapi_document

    return jsonify(openapi_document())
