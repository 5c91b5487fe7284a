"""What every request under `/api/<user_id>` passes before its view runs,
one hook per concern, in this order:

1. `authenticate`: the token's user is the path's user (401, 403); a CORS
   preflight carries no token and runs no view, so it passes untouched. A
   verified `sub` is at most 255 characters (auth.MAX_USER_ID_CHARS), so a
   longer user id in the path is a 403 here, before any statement runs;
2. `ids_in_range`: an integer id in the path that no bigint can hold names
   nothing (404);
3. `isolation_in_force`: 503 while the isolation check fails (db/isolation.py);
4. `count_write`: every POST, PUT, PATCH and DELETE counts against
   WRITE_RATE_LIMIT (429): its step goes out with the request's first
   transaction (services/rate_limit.py), at no round trip of its own; a write
   that opened none is counted as it ends (`count_unsent_write`);
5. `bind_tenant`: the request's Session transactions run as that user.

The hooks after the first act only on an authenticated request (`g.user_id`).
"""
from __future__ import annotations

from flask import Blueprint, current_app, g, request
from werkzeug.routing import BaseConverter

from ..auth import Forbidden
from ..db import tenancy
from ..db.extensions import db
from ..db.isolation import check_now
from ..db.models import BIGINT_MAX
from ..errors import DATABASE_ERRORS, ApiError, error_response
from ..services import rate_limit

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BigIntConverter(BaseConverter):
    """An id of up to 19 digits. One outside PostgreSQL's bigint (0, or over
    2**63 - 1) is answered 404 after authentication, by `ids_in_range`: a
    converter that rejects a value makes Werkzeug answer 405 to the other
    methods of the same path instead."""

    regex = r"[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value) -> str:
        return str(value)


def user_blueprint(name: str, import_name: str) -> Blueprint:
    """A blueprint under `/api/<user_id>` whose every request passes the guards above."""
    blueprint = Blueprint(name, import_name, url_prefix="/api/<user_id>")
    blueprint.url_value_preprocessor(_pop_user_id)
    for guard in (authenticate, ids_in_range, isolation_in_force, count_write, bind_tenant):
        blueprint.before_request(guard)
    blueprint.after_request(count_unsent_write)
    blueprint.teardown_request(_release_request)
    return blueprint


def _pop_user_id(endpoint, values):
    if values is not None and "user_id" in values:
        g.path_user_id = values.pop("user_id")


def authenticate():
    if request.method == "OPTIONS" and getattr(request.url_rule, "provide_automatic_options", False):
        return  # a CORS preflight carries no token; Flask's automatic answer runs no view
    user_id = current_app.extensions["token_verifier"].user_id(request.headers.get("Authorization"))
    if user_id != g.path_user_id:
        raise Forbidden()
    g.user_id = user_id


def ids_in_range():
    if "user_id" not in g:
        return
    for name, value in (request.view_args or {}).items():
        if isinstance(value, int) and not 1 <= value <= BIGINT_MAX:
            resource = name.removesuffix("_id")
            raise ApiError(404, f"{resource}_not_found", f"no such {resource}")


def isolation_in_force():
    if "user_id" in g:
        current_app.extensions["isolation_watch"].ensure(lambda: check_now(db.engine))


def count_write():
    limit = current_app.config["SETTINGS"].write_rate_limit
    if "user_id" in g and limit is not None and request.method in WRITE_METHODS:
        g.due_write_token = rate_limit.expect_write(g.user_id, rate_limit.RateLimit(*limit))


def count_unsent_write(response):
    """A write refused before it reached the database (400, 415, 422) still
    counts: in a transaction of its own, and over the limit its answer is the
    429. One the server could not serve (5xx: the database, the pool, the
    assistant) is not counted, and does not wait for a connection to say so."""
    if "due_write_token" in g and response.status_code < 500:
        try:
            rate_limit.take_write_if_due(db.engine)
        except rate_limit.RateLimited as limited:
            return error_response(limited.status, limited.code, limited.message, limited.headers, **limited.extra)
        except DATABASE_ERRORS:
            pass  # the answer stands; the write goes uncounted
    return response


def bind_tenant():
    if "user_id" in g:
        g.tenancy_token = tenancy.bind_user(g.user_id)


def _release_request(exc):
    token = g.pop("tenancy_token", None)
    if token is not None:
        tenancy.unbind_user(token)
    token = g.pop("due_write_token", None)
    if token is not None:
        rate_limit.forget_write(token)
