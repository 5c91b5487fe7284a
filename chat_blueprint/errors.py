"""One JSON error shape for every failure:
`{"error": {"code": "<snake_case>", "message": "<human text>", ...}}`."""
from __future__ import annotations

import json
import logging

import psycopg
import psycopg.errors
from flask import Flask, jsonify
from marshmallow import ValidationError
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException, NotFound

log = logging.getLogger(__name__)

RETRY_AFTER_S = "2"

# Every way the database can be unreachable: psycopg's own errors (raw SQL),
# SQLAlchemy's wrappers of them (the ORM, `engine.connect()`), and a pool that
# has no connection to give within DATABASE_POOL_TIMEOUT_S.
DATABASE_ERRORS = (psycopg.OperationalError, sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError,
                   sa_exc.DisconnectionError)

# A 422 lists the fields that failed, but never more than this many bytes of
# them (as JSON), so a body of thousands of unknown keys cannot make an answer
# larger than itself; the whole answer stays well under 64 KiB.
FIELDS_BUDGET_BYTES = 32 * 1024
FIELD_NAME_MAX_CHARS = 100

# A path no route matches, a malformed id in it included (`/tasks/abc`, `/conversations/not-a-uuid`), is
# Werkzeug's 404 with a paragraph written for a browser; the API says it in a line, and what an id looks like.
NO_ROUTE_MESSAGE = "no such route: a task id is a positive integer, a conversation id a UUID"


class ApiError(Exception):
    """An expected failure with a status, a code and optional extra fields."""

    def __init__(self, status: int, code: str, message: str, headers=None, **extra):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.extra = extra


class DatabaseUnavailable(ApiError):
    def __init__(self, message="the database is unavailable; retry shortly", code="database_unavailable"):
        super().__init__(503, code, message, headers={"Retry-After": RETRY_AFTER_S})


# A transaction that ran into DATABASE_STATEMENT_TIMEOUT_S or
# DATABASE_LOCK_TIMEOUT_S (both OperationalErrors, so in DATABASE_ERRORS).
DATABASE_TIMEOUTS = (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable)


def database_failure(error: Exception) -> DatabaseUnavailable:
    """The 503 for one of DATABASE_ERRORS: a timeout says so, anything else is unavailability."""
    cause = getattr(error, "orig", error)
    if isinstance(cause, DATABASE_TIMEOUTS):
        return DatabaseUnavailable("the database did not answer in time; retry shortly", "database_timeout")
    return DatabaseUnavailable()


def error_response(status: int, code: str, message: str, headers=None, **extra):
    body = {"error": {"code": code, "message": message, **extra}}
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def bounded_fields(fields: dict) -> tuple[dict, int]:
    """The field messages that fit FIELDS_BUDGET_BYTES, in order, with names
    cut to FIELD_NAME_MAX_CHARS, and how many fields were left out."""
    shown, used = {}, 2
    for name, messages in fields.items():
        name = str(name)
        if len(name) > FIELD_NAME_MAX_CHARS:
            name = name[:FIELD_NAME_MAX_CHARS] + "\u2026"
        if name in shown:
            continue
        size = len(json.dumps({name: messages})) - 1
        if used + size > FIELDS_BUDGET_BYTES:
            break
        shown[name] = messages
        used += size
    return shown, len(fields) - len(shown)


def invalid_fields(fields: dict) -> ApiError:
    """The one 422 of the API: each failed field with its messages, bounded
    by FIELDS_BUDGET_BYTES, and how many were left out if any were."""
    shown, omitted = bounded_fields(fields)
    if not omitted:
        return ApiError(422, "validation_failed", "the request has invalid fields", fields=shown)
    return ApiError(422, "validation_failed", f"the request has invalid fields; {omitted} more are not listed",
                    fields=shown, fields_omitted=omitted)


def _snake(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(error: ApiError):
        return error_response(error.status, error.code, error.message, error.headers, **error.extra)

    @app.errorhandler(ValidationError)
    def validation_error(error: ValidationError):
        fields = error.messages if isinstance(error.messages, dict) else {"_schema": error.messages}
        return api_error(invalid_fields(fields))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        headers = {}
        if error.code == 405 and getattr(error, "valid_methods", None):
            headers["Allow"] = ", ".join(error.valid_methods)
        message = error.description or error.name
        if isinstance(error, NotFound) and error.description == NotFound.description:
            message = NO_ROUTE_MESSAGE
        return error_response(error.code or 500, _snake(error.name), message, headers)

    def database_unavailable(error):
        log.warning("database unavailable: %s", type(getattr(error, "orig", error)).__name__)
        return api_error(database_failure(error))

    for database_error in DATABASE_ERRORS:
        app.register_error_handler(database_error, database_unavailable)

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "an unexpected error occurred")
