"""WSGI middleware that reads a chunked request body whole, within the size
limit, before the app sees it; the app answers what it found (413 or 400)."""
from __future__ import annotations

import io

from flask import Flask, request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import get_content_length

from ..errors import ApiError


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


def install(app: Flask, limit: int) -> None:
    """Install `ChunkedBodyGuard` and the hook that answers what it found."""
    app.wsgi_app = ChunkedBodyGuard(app.wsgi_app, limit)
    app.before_request(_refuse_bad_body)
