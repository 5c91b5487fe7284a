"""Chat and conversation routes. Thin: parse, call, serialise."""
from __future__ import annotations

import logging
import time
import uuid
from typing import NoReturn

import psycopg
from flask import current_app, g, request

from . import conversations
from .assistants import AssistantError, AssistantTimeout
from .errors import ApiError
from .extensions import db
from .http import json_body, query_args, user_blueprint
from .observability import observe_assistant
from .schemas import (
    ChatRequestSchema,
    ConversationPageSchema,
    ConversationPatchSchema,
    ConversationSchema,
    MessagePageQuerySchema,
    MessagePageSchema,
    PageQuerySchema,
)

log = logging.getLogger(__name__)

bp = user_blueprint("chat", __name__)

conversation_schema = ConversationSchema()
conversation_page_schema = ConversationPageSchema()
message_page_schema = MessagePageSchema()

IDEMPOTENCY_KEY_MAX = 255
STALE_GRACE_S = 30


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_MAX or not key.isprintable():
        raise ApiError(422, "validation_failed", "the request has invalid fields",
                       fields={"Idempotency-Key": [f"Must be 1 to {IDEMPOTENCY_KEY_MAX} printable characters."]})
    return key


@bp.post("/chat")
def chat():
    """One chat turn: store the user message, ask the assistant with the
    stored history, store its reply. No transaction is open while the
    assistant runs."""
    settings = current_app.config["SETTINGS"]
    key = _idempotency_key()
    body = json_body(ChatRequestSchema(max_chars=settings.message_max_chars))
    claim = None
    if key is not None:
        claim = conversations.IdempotencyClaim.of(
            key, body["message"], body["conversation_id"],
            stale_after_s=settings.assistant_timeout_s + STALE_GRACE_S, ttl_s=settings.idempotency_ttl_s)
    engine = db.engine
    rate_limit = conversations.RateLimit(*settings.chat_rate_limit) if settings.chat_rate_limit else None
    pending = conversations.begin_turn(engine, g.user_id, body["message"], body["conversation_id"], claim,
                                       settings.chat_history_limit, rate_limit)
    if isinstance(pending, conversations.Replay):
        return pending.response
    backend = settings.assistant
    started = time.perf_counter()
    try:
        reply = current_app.extensions["assistant"].reply(pending.history, pending.turn)
    except Exception as failure:  # noqa: BLE001 - any assistant failure is the upstream's, not the client's
        observe_assistant(backend, "timeout" if isinstance(failure, AssistantTimeout) else "error",
                          time.perf_counter() - started)
        _assistant_failed(engine, pending, failure)
    observe_assistant(backend, "ok", time.perf_counter() - started)
    try:
        answer = conversations.finish_turn(engine, g.user_id, pending, reply)
    except psycopg.OperationalError:
        _release_key_after_database_error(engine, pending)
        raise
    return answer


def _release_key_after_database_error(engine, pending) -> None:
    """The reply could not be stored: free the key at once (on a fresh
    connection) so a retry can answer the stored message, if the database allows."""
    try:
        conversations.fail_turn(engine, g.user_id, pending)
    except psycopg.OperationalError:
        pass


def _assistant_failed(engine, pending, failure: Exception) -> NoReturn:
    """Release the key and answer 502 or 504 with the stored message's conversation."""
    conversations.fail_turn(engine, g.user_id, pending)
    if isinstance(failure, AssistantTimeout):
        status, code, message = 504, "assistant_timeout", "the assistant did not answer in time"
    elif isinstance(failure, AssistantError):
        status, code, message = 502, "assistant_failed", f"the assistant failed: {failure}"
    else:
        log.exception("assistant raised an unexpected error", exc_info=failure)
        status, code, message = 502, "assistant_failed", "the assistant failed"
    log.warning("chat turn unanswered: %s (%s)", code, type(failure).__name__)
    raise ApiError(status, code, message, conversation_id=str(pending.conversation_id),
                   user_message_id=pending.user_message_id)


@bp.get("/conversations")
def list_conversations():
    """The user's conversations, most recently updated first."""
    args = query_args(PageQuerySchema())
    page, next_cursor = conversations.list_conversations(db.session, g.user_id, args["limit"], args["cursor"])
    return conversation_page_schema.dump({"data": page, "next_cursor": next_cursor})


@bp.get("/conversations/<uuid:conversation_id>")
def get_conversation(conversation_id: uuid.UUID):
    return conversation_schema.dump(conversations.get_conversation(db.session, g.user_id, conversation_id))


@bp.patch("/conversations/<uuid:conversation_id>")
def rename_conversation(conversation_id: uuid.UUID):
    title = json_body(ConversationPatchSchema())["title"]
    return conversation_schema.dump(conversations.rename_conversation(db.session, g.user_id, conversation_id, title))


@bp.delete("/conversations/<uuid:conversation_id>")
def delete_conversation(conversation_id: uuid.UUID):
    conversations.delete_conversation(db.session, g.user_id, conversation_id)
    return "", 204


@bp.get("/conversations/<uuid:conversation_id>/messages")
def list_messages(conversation_id: uuid.UUID):
    """A page of the conversation's messages, oldest first unless order=desc."""
    args = query_args(MessagePageQuerySchema())
    page, next_cursor = conversations.list_messages(db.session, g.user_id, conversation_id, args["limit"],
                                                    args["cursor"], args["order"])
    return message_page_schema.dump({"data": page, "next_cursor": next_cursor})
