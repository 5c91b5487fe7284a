"""The user's data routes: a copy of all of it, and its erasure. Thin: call,
then stream the document or answer 204."""
from __future__ import annotations

from flask import Response, g

from ..db.extensions import db
from ..services import user_data
from .guards import user_blueprint

bp = user_blueprint("user_data", __name__)

EXPORT_HEADERS = {
    "Content-Disposition": 'attachment; filename="chat-export.json"',
    "Cache-Control": "no-store",
}


@bp.get("/export")
def export():
    """Every row of the user (tasks, conversations and their messages) as one
    JSON document, written out as it is read (the right to data portability).
    The transaction opens here, so a database failure is still a 503."""
    document = user_data.Export(db.engine, g.user_id)
    return Response(document, mimetype="application/json", headers=EXPORT_HEADERS)


@bp.delete("/data")
def erase():
    """Erase every row of the user in every table (the right to erasure; the
    hook an account deletion calls). Repeating it is 204 again."""
    user_data.erase_user(db.session, g.user_id)
    return "", 204
