"""Request plumbing shared by the API blueprints: authentication of the path's
user, tenancy binding for the request, and strict JSON body parsing."""
from __future__ import annotations

import json

from flask import Blueprint, current_app, g, request
from werkzeug.routing import BaseConverter, ValidationError as RoutingValidationError

from . import tenancy
from .auth import Forbidden
from .errors import ApiError
from .isolation import ensure_isolation

BIGINT_MAX = 2**63 - 1


class BigIntConverter(BaseConverter):
    """A positive integer that fits PostgreSQL's bigint; anything else is a 404."""

    regex = r"[0-9]{1,19}"

    def to_python(self, value: str) -> int:
        number = int(value)
        if number < 1 or number > BIGINT_MAX:
            raise RoutingValidationError()
        return number

    def to_url(self, value) -> str:
        return str(value)


def user_blueprint(name: str, import_name: str) -> Blueprint:
    """A blueprint under `/api/<user_id>` whose every request is authenticated
    as that user and runs its transactions as that user."""
    blueprint = Blueprint(name, import_name, url_prefix="/api/<user_id>")
    blueprint.before_request(_authenticate_path_user)
    blueprint.teardown_request(_release_user)
    blueprint.url_value_preprocessor(_pop_user_id)
    return blueprint


def _pop_user_id(endpoint, values):
    if values is not None and "user_id" in values:
        g.path_user_id = values.pop("user_id")


def _authenticate_path_user():
    user_id = current_app.extensions["token_verifier"].user_id(request.headers.get("Authorization"))
    if user_id != g.path_user_id:
        raise Forbidden()
    ensure_isolation()
    g.user_id = user_id
    g.tenancy_token = tenancy.bind_user(user_id)


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
