"""The user's data routes: a copy of all of it, and its erasure. Thin: call,
then send the spooled document or answer 204."""
from __future__ import annotations

from flask import Response, current_app, g

from ..db.extensions import db
from ..services import export as exports
from ..services import user_data
from ..services.rate_limit import RateLimit
from .guards import user_blueprint

bp = user_blueprint("user_data", __name__)

EXPORT_HEADERS = {
    "Content-Disposition": 'attachment; filename="chat-export.json"',
    "Cache-Control": "no-store",
}


def _install_export_gate(state) -> None:
    """One gate per app, so per worker process: its slots and its reading lock."""
    state.app.extensions["export_gate"] = exports.ExportGate(state.app.config["SETTINGS"].export_concurrency)


bp.record_once(_install_export_gate)


@bp.get("/export")
def export():
    """Every row of the user (tasks, conversations and their messages) as one
    JSON document (the right to data portability). It is read whole into a
    temporary file first, so the database connection is back in the pool
    before the first byte goes out, however slowly the client reads; every
    refusal (429, 503, 507) is answered before that."""
    settings = current_app.config["SETTINGS"]
    limits = exports.ExportLimits(RateLimit(*settings.export_rate_limit) if settings.export_rate_limit else None,
                                  settings.export_max_bytes)
    document = exports.open_export(db.engine, current_app.extensions["export_gate"], g.user_id, limits)
    headers = {**EXPORT_HEADERS, "Content-Length": str(document.size)}
    return Response(document, mimetype="application/json", headers=headers)


@bp.delete("/data")
def erase():
    """Erase every row of the user in every table (the right to erasure; the
    hook an account deletion calls), in batches, answering 204 once nothing is
    left. Repeating it is 204 again."""
    user_data.erase_user(db.engine, g.user_id)
    return "", 204
