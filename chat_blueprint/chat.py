"""Chat and conversation routes. Thin: parse, call, serialise."""
from __future__ import annotations

import uuid

from flask import current_app, g, request

from . import history, ui_stream
from .errors import ApiError
from .extensions import db
from .http import json_body, query_args, user_blueprint
from .schemas import (
    ChatRequestSchema,
    ConversationPageSchema,
    ConversationPatchSchema,
    ConversationSchema,
    MessagePageQuerySchema,
    MessagePageSchema,
    PageQuerySchema,
)
from .turns import Replay, Turns

bp = user_blueprint("chat", __name__)

conversation_schema = ConversationSchema()
conversation_page_schema = ConversationPageSchema()
message_page_schema = MessagePageSchema()

IDEMPOTENCY_KEY_MAX = 255


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not key.isprintable():
        raise ApiError(422, "validation_failed", "the request has invalid fields",
                       fields={"Idempotency-Key": [f"Must be 1 to {IDEMPOTENCY_KEY_MAX} printable characters."]})
    return key


def _turns() -> Turns:
    return Turns.from_settings(db.engine, current_app.extensions["assistant"], current_app.config["SETTINGS"])


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
    body = json_body(ChatRequestSchema(max_chars=settings.message_max_chars))
    turns = _turns()
    turn = turns.request(g.user_id, body["message"], body["conversation_id"], key)
    if not _wants_stream(body):
        return turns.run(turn)
    started = turns.begin(turn)
    if isinstance(started, Replay):
        return ui_stream.response(ui_stream.replay_events(started))
    return ui_stream.response(ui_stream.turn_events(turns.stream(started)))


@bp.get("/conversations")
def list_conversations():
    """The user's conversations, most recently updated first."""
    args = query_args(PageQuerySchema())
    page, next_cursor = history.list_conversations(db.session, g.user_id, args["limit"], args["cursor"])
    return conversation_page_schema.dump({"data": page, "next_cursor": next_cursor})


@bp.get("/conversations/<uuid:conversation_id>")
def get_conversation(conversation_id: uuid.UUID):
    return conversation_schema.dump(history.get_conversation(db.session, g.user_id, conversation_id))


@bp.patch("/conversations/<uuid:conversation_id>")
def rename_conversation(conversation_id: uuid.UUID):
    title = json_body(ConversationPatchSchema())["title"]
    return conversation_schema.dump(history.rename_conversation(db.session, g.user_id, conversation_id, title))


@bp.delete("/conversations/<uuid:conversation_id>")
def delete_conversation(conversation_id: uuid.UUID):
    history.delete_conversation(db.session, g.user_id, conversation_id)
    return "", 204


@bp.get("/conversations/<uuid:conversation_id>/messages")
def list_messages(conversation_id: uuid.UUID):
    """A page of the conversation's messages, oldest first unless order=desc."""
    args = query_args(MessagePageQuerySchema())
    page, next_cursor = history.list_messages(db.session, g.user_id, conversation_id, args["limit"],
                                              args["cursor"], args["order"])
    return message_page_schema.dump({"data": page, "next_cursor": next_cursor})
