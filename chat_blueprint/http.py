"""Request plumbing shared by the API blueprints: authentication of the path's
user, tenancy binding for the request, strict JSON body parsing, and the
guard that reads a chunked body whole before the app sees it."""
from __future__ import annotations

import io
import json

from flask import Blueprint, Flask, current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.routing import BaseConverter
from werkzeug.wsgi import get_content_length

from . import rate_limit, tenancy
from .auth import Forbidden
from .errors import ApiError
from .extensions import db
from .isolation import ensure_isolation
from .models import BIGINT_MAX

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BigIntConverter(BaseConverter):
    """An id of up to 19 digits. One outside PostgreSQL's bigint (0, or over
    2**63 - 1) is answered 404 after authentication, by `_authenticate_path_user`:
    a converter that rejects a value makes Werkzeug answer 405 to the other
    methods of the same path instead."""

    regex = r"[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value) -> str:
        return str(value)


def user_blueprint(name: str, import_name: str) -> Blueprint:
    """A blueprint under `/api/<user_id>` whose every request is authenticated
    as that user and runs its transactions as that user, and whose every
    write counts against WRITE_RATE_LIMIT."""
    blueprint = Blueprint(name, import_name, url_prefix="/api/<user_id>")
    blueprint.before_request(_authenticate_path_user)
    blueprint.teardown_request(_release_user)
    blueprint.url_value_preprocessor(_pop_user_id)
    return blueprint


def _pop_user_id(endpoint, values):
    if values is not None and "user_id" in values:
        g.path_user_id = values.pop("user_id")


def _authenticate_path_user():
    if request.method == "OPTIONS" and getattr(request.url_rule, "provide_automatic_options", False):
        return  # a CORS preflight carries no token; Flask's automatic answer runs no view
    user_id = current_app.extensions["token_verifier"].user_id(request.headers.get("Authorization"))
    if user_id != g.path_user_id:
        raise Forbidden()
    _require_ids_in_range(request.view_args or {})
    ensure_isolation()
    limit = current_app.config["SETTINGS"].write_rate_limit
    if limit is not None and request.method in WRITE_METHODS:
        rate_limit.take_write(db.engine, user_id, rate_limit.RateLimit(*limit))
    g.user_id = user_id
    g.tenancy_token = tenancy.bind_user(user_id)


def _require_ids_in_range(view_args: dict) -> None:
    """An integer id that no bigint column can hold names nothing: 404."""
    for name, value in view_args.items():
        if isinstance(value, int) and not 1 <= value <= BIGINT_MAX:
            resource = name.removesuffix("_id")
            raise ApiError(404, f"{resource}_not_found", f"no such {resource}")


def _release_user(exc):
    token = g.pop("tenancy_token", None)
    if token is not None:
        tenancy.unbind_user(token)


def json_body(schema):
    """Parse the request body as a JSON object and validate it with `schema`.

    415 for another media type, 400 for invalid JSON or a non-object, 413 over
    the size limit (raised by Werkzeug while reading), 422 for invalid fields.
    """
    mimetype = request.mimetype or ""
    if mimetype != "application/json" and not (mimetype.startswith("application/") and mimetype.endswith("+json")):
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    raw = request.get_data(cache=True)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return schema.load(data)


def query_args(schema):
    """Validate the query string with `schema` (422 on bad values)."""
    return schema.load(request.args.to_dict())


class MalformedBody(ApiError):
    def __init__(self):
        super().__init__(400, "malformed_body", "the chunked framing of the body is malformed")


BODY_ERROR = "chat_blueprint.body_error"


class ChunkedBodyGuard:
    """WSGI middleware: a body without a Content-Length (chunked) is read
    whole, up to `limit` bytes, before the app runs, and handed on as a sized
    body. Werkzeug alone stops reading such a body at MAX_CONTENT_LENGTH and
    hands the app the first part as if it were all, and the server's framing
    errors (a bad chunk size, a missing CRLF, a bad trailer) surface in the
    middle of a view as unexpected exceptions.

    A body over the limit, or one whose framing the server rejects, is
    recorded in the environ and answered by `_refuse_bad_body` as 413 or 400
    from within the app, so the answer is JSON, logged and counted like any
    other. The body is read in full before the request is routed so that
    the refusal is the same on every route, with or without a token, and the
    server never finds a broken body left on the connection after answering.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    def __call__(self, environ, start_response):
        if get_content_length(environ) is None and "wsgi.input" in environ:
            body = b""
            try:
                body = _read_at_most(environ["wsgi.input"], self.limit + 1)
                if len(body) > self.limit:
                    environ[BODY_ERROR] = RequestEntityTooLarge()
            except Exception:  # noqa: BLE001 - the server's parse errors (or a client gone mid-body)
                environ[BODY_ERROR] = MalformedBody()
            if BODY_ERROR in environ:
                body = b""
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            environ.pop("HTTP_TRANSFER_ENCODING", None)
        return self.app(environ, start_response)


def _read_at_most(stream, size: int) -> bytes:
    chunks, total = [], 0
    while total < size:
        data = stream.read(min(64 * 1024, size - total))
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def _refuse_bad_body():
    error = request.environ.get(BODY_ERROR)
    if error is not None:
        raise error


def guard_bodies(app: Flask, limit: int) -> None:
    """Install `ChunkedBodyGuard` and the hook that answers what it found."""
    app.wsgi_app = ChunkedBodyGuard(app.wsgi_app, limit)
    app.before_request(_refuse_bad_body)
