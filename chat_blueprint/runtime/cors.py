"""CORS for a browser frontend on another origin (Next.js on :3000, say).

Flask-CORS answers the preflight and adds the headers; `CORS_ORIGINS` (checked
in config.py) says which origins may call. A preflight carries no token: the
user blueprints let `OPTIONS` through unauthenticated, and Flask's automatic
`OPTIONS` answer runs no view and touches no data. Requests from any other
origin get no `Access-Control-Allow-Origin`, so the browser keeps the answer
from the page. Tokens travel in `Authorization`, never in cookies, so no
credentials mode is needed.
"""
from __future__ import annotations

import re

from flask import Flask
from flask_cors import CORS

ALLOWED_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
ALLOWED_HEADERS = ["Authorization", "Content-Type", "Idempotency-Key", "X-Request-ID"]
# What a client reads from an answer: when to retry, the next page, the request id, the stream's protocol.
EXPOSED_HEADERS = ["Retry-After", "Link", "X-Request-ID", "x-vercel-ai-ui-message-stream", "Content-Disposition",
                   "WWW-Authenticate"]
PREFLIGHT_MAX_AGE_S = 600


def install(app: Flask, origins: tuple[str, ...] | None) -> None:
    """Allow `origins` (or every origin for `("*",)`) to call `/api/*` from a browser."""
    if not origins:
        return
    if origins == ("*",):
        allowed = "*"
    else:
        # Exact matches only: Flask-CORS would take a string with regex characters as a pattern.
        allowed = [re.compile(re.escape(origin) + r"\Z", re.IGNORECASE) for origin in origins]
    CORS(app, resources={r"/api/*": {"origins": allowed}}, methods=ALLOWED_METHODS, allow_headers=ALLOWED_HEADERS,
         expose_headers=EXPOSED_HEADERS, max_age=PREFLIGHT_MAX_AGE_S, send_wildcard=True, always_send=False,
         supports_credentials=False)
