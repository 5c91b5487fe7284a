"""Strict parsing of what a client sends: the JSON body and the query string."""
from __future__ import annotations

import json

from flask import request

from ..errors import ApiError


def json_body(schema):
    """Parse the request body as a JSON object and validate it with `schema`.

    415 for another media type, 400 for invalid JSON or a non-object, 413 over
    the size limit (raised by Werkzeug while reading), 422 for invalid fields.
    """
    return schema.load(json_object())


def json_object() -> dict:
    """The request body, a JSON object (415, 400 and 413 as `json_body` says)."""
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
    return data


def query_args(schema):
    """Validate the query string with `schema` (422 on bad values)."""
    return schema.load(request.args.to_dict())
