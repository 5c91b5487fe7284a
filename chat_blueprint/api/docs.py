"""Interactive documentation of /api/openapi.json at /docs (Swagger UI).

Swagger UI's files come from the flask-swagger-ui package (which ships its
dist directory) and are served by the app itself, so the page works with no
internet. The page's Content-Security-Policy lets it load and call nothing but
this origin: no CDN, no validator badge, no fonts from elsewhere. Paste a token
under "Authorize" (the document's `bearer` scheme), then "Try it out" on any
operation, chat included.
"""
from __future__ import annotations

import base64
import hashlib
from html import escape
from pathlib import Path

import flask_swagger_ui
from flask import Blueprint, Response, send_from_directory, url_for

from ..errors import ApiError

bp = Blueprint("docs", __name__)

SWAGGER_UI_DIST = Path(flask_swagger_ui.__file__).resolve().parent / "dist"
ASSETS = ("swagger-ui.css", "index.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png")
ASSET_MAX_AGE_S = 86_400

# Static, so its hash can stand in the CSP instead of allowing inline scripts at large.
INIT_SCRIPT = """
window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapi,
    dom_id: "#swagger-ui",
    deepLinking: true,
    tryItOutEnabled: true,
    displayRequestDuration: true,
    persistAuthorization: false,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
});
"""
_SCRIPT_HASH = base64.b64encode(hashlib.sha256(INIT_SCRIPT.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; "
    f"script-src 'self' 'sha256-{_SCRIPT_HASH}'; "
    "style-src 'self' 'unsafe-inline'; "  # Swagger UI sets style attributes
    "img-src 'self' data:; "
    "connect-src 'self'; "
    "font-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Todo chat assistant API</title>
  <link rel="stylesheet" href="{css}">
  <link rel="stylesheet" href="{index_css}">
  <link rel="icon" type="image/png" href="{icon}" sizes="32x32">
</head>
<body>
  <div id="swagger-ui" data-openapi="{openapi}"></div>
  <script src="{bundle}"></script>
  <script>{script}</script>
</body>
</html>
"""


@bp.get("/docs")
@bp.get("/docs/")
def docs():
    """The Swagger UI page for this app's OpenAPI document."""
    page = PAGE.format(
        css=escape(url_for("docs.asset", name="swagger-ui.css")),
        index_css=escape(url_for("docs.asset", name="index.css")),
        icon=escape(url_for("docs.asset", name="favicon-32x32.png")),
        bundle=escape(url_for("docs.asset", name="swagger-ui-bundle.js")),
        openapi=escape(url_for("ops.openapi")),
        script=INIT_SCRIPT,
    )
    response = Response(page, mimetype="text/html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@bp.get("/docs/assets/<name>")
def asset(name: str):
    """One of Swagger UI's own files, as the package ships it."""
    if name not in ASSETS:
        raise ApiError(404, "not_found", "no such asset")
    response = send_from_directory(SWAGGER_UI_DIST, name, max_age=ASSET_MAX_AGE_S)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
