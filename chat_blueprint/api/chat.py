"""The chat route: one turn, blocking or streamed. Thin: parse, call, deliver."""
from __future__ import annotations

import uuid

from flask import current_app, g, request

from ..chat_schemas import ChatEditSchema, ChatRegenerateSchema, ChatRequestSchema
from ..db.extensions import db
from ..errors import invalid_fields
from ..services import resume as resume_service
from ..services.rewrites import Rewrite
from ..services.turns import Replay, Turns
from . import ui_stream
from .bodies import json_object
from .guards import user_blueprint
from .ui_body import is_ui_body, ui_turn

bp = user_blueprint("chat", __name__)

IDEMPOTENCY_KEY_MAX = 255


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not key.isprintable():
        raise invalid_fields({"Idempotency-Key": [f"Must be 1 to {IDEMPOTENCY_KEY_MAX} printable characters."]})
    return key


def _turns() -> Turns:
    return Turns.from_settings(db.engine, current_app.extensions["assistant"], current_app.config["SETTINGS"])


def native_body(data: dict, max_chars: int) -> dict:
    """Our own body, in one of its three forms: a message, an edit, a regenerate."""
    if data.get("regenerate") is True:
        return ChatRegenerateSchema().load(data)
    if "edit" in data:
        return ChatEditSchema(max_chars=max_chars).load(data)
    return ChatRequestSchema(max_chars=max_chars).load(data)


def _wants_stream(body: dict) -> bool:
    """`"stream": true`, or `Accept` naming text/event-stream itself (not through */*)."""
    return body["stream"] or any(mimetype == ui_stream.MIMETYPE and quality > 0
                                 for mimetype, quality in request.accept_mimetypes)


@bp.post("/chat")
def chat():
    """One chat turn: store the user message, ask the assistant with the
    stored history, store its reply. No transaction is open while the
    assistant runs. Streamed, every refusal still comes from `begin`, before
    the first event, as a JSON error with its status."""
    settings = current_app.config["SETTINGS"]
    key = _idempotency_key()
    data = json_object()
    turns = _turns()
    if is_ui_body(data):  # useChat's own body: always streamed
        asked = ui_turn(data, settings.message_max_chars)
        turn = turns.request(g.user_id, asked.message, asked.conversation_id, key, user_ui_id=asked.user_ui_id,
                             create=True, rewrite=asked.rewrite)
    else:
        body = native_body(data, settings.message_max_chars)
        rewrite = (Rewrite("regenerate") if body["regenerate"] else
                   Rewrite("edit", message_id=body["edit"]) if "edit" in body else None)
        turn = turns.request(g.user_id, body.get("message"), body["conversation_id"], key, rewrite=rewrite)
        if not _wants_stream(body):
            return turns.run(turn)
    started = turns.begin(turn)
    if isinstance(started, Replay):
        return ui_stream.response(ui_stream.replay_events(started))
    return ui_stream.response(ui_stream.turn_events(turns.stream(started)))


@bp.get("/chat/<uuid:conversation_id>/stream")
def resume(conversation_id: uuid.UUID):
    """The conversation's reply being produced, as the stream its turn sends,
    from its start and then live, whichever instance produces it (where the AI
    SDK's transport reconnects, `useChat({ resume: true })`); 204 when no
    reply is being produced, also for a conversation the user does not have."""
    settings = current_app.config["SETTINGS"]
    following = resume_service.follow(db.engine, g.user_id, conversation_id, settings.stream_flush_s)
    if following is None:
        return "", 204
    return ui_stream.response(ui_stream.resumed_events(following, settings.stream_keepalive_s))
