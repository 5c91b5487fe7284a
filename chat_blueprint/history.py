"""Conversation and message history: the ORM queries behind the history API.

Lists are keyset-paginated: a cursor is the base64url JSON of the last row's
sort key, so a page costs the same however deep it is.
"""
from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime, timezone

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.orm import Session

from .errors import ApiError
from .models import BIGINT_MAX, Conversation, Message


class ConversationNotFound(ApiError):
    def __init__(self):
        super().__init__(404, "conversation_not_found", "no such conversation")


class InvalidCursor(ApiError):
    def __init__(self):
        super().__init__(422, "validation_failed", "the request has invalid fields",
                         fields={"cursor": ["Not a cursor returned by this API."]})


def _encode_cursor(*values) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, arity: int) -> list:
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError):
        raise InvalidCursor() from None
    if not isinstance(values, list) or len(values) != arity:
        raise InvalidCursor()
    return values


def _cursor_id(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= BIGINT_MAX:
        raise InvalidCursor()
    return value


def list_conversations(session: Session, user_id: str, limit: int, cursor: str | None) -> tuple[list, str | None]:
    """Most recently updated first, keyset-paginated on (updated_at, id)."""
    query = select(Conversation).where(Conversation.user_id == user_id)
    if cursor is not None:
        updated_at, conversation_id = _decode_cursor(cursor, 2)
        try:
            updated_at = datetime.fromisoformat(updated_at)
            conversation_id = uuid.UUID(conversation_id)
        except (TypeError, ValueError):
            raise InvalidCursor() from None
        if updated_at.tzinfo is None:
            raise InvalidCursor()
        query = query.where(tuple_(Conversation.updated_at, Conversation.id) < tuple_(updated_at, conversation_id))
    query = query.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit + 1)
    with session.begin():
        rows = list(session.scalars(query))
    page, more = rows[:limit], len(rows) > limit
    next_cursor = None
    if more:
        last = page[-1]
        next_cursor = _encode_cursor(last.updated_at.astimezone(timezone.utc).isoformat(), str(last.id))
    return page, next_cursor


def get_conversation(session: Session, user_id: str, conversation_id: uuid.UUID) -> Conversation:
    with session.begin():
        conversation = session.scalar(
            select(Conversation).where(Conversation.id == conversation_id, Conversation.user_id == user_id))
    if conversation is None:
        raise ConversationNotFound()
    return conversation


def rename_conversation(session: Session, user_id: str, conversation_id: uuid.UUID, title: str) -> Conversation:
    """A rename does not move `updated_at`: the list order follows messages only."""
    with session.begin():
        conversation = session.scalar(
            update(Conversation)
            .where(Conversation.id == conversation_id, Conversation.user_id == user_id)
            .values(title=title)
            .returning(Conversation)
            .execution_options(synchronize_session=False)
        )
    if conversation is None:
        raise ConversationNotFound()
    return conversation


def delete_conversation(session: Session, user_id: str, conversation_id: uuid.UUID) -> None:
    """Its messages go with it (ON DELETE CASCADE)."""
    with session.begin():
        deleted = session.scalar(
            delete(Conversation)
            .where(Conversation.id == conversation_id, Conversation.user_id == user_id)
            .returning(Conversation.id)
        )
    if deleted is None:
        raise ConversationNotFound()


def list_messages(session: Session, user_id: str, conversation_id: uuid.UUID, limit: int, cursor: str | None,
                  order: str) -> tuple[list, str | None]:
    """A page of a conversation's messages in id order, keyset-paginated on id."""
    query = select(Message).where(Message.conversation_id == conversation_id, Message.user_id == user_id)
    if cursor is not None:
        (after_id,) = _decode_cursor(cursor, 1)
        after_id = _cursor_id(after_id)
        query = query.where(Message.id > after_id if order == "asc" else Message.id < after_id)
    query = query.order_by(Message.id.asc() if order == "asc" else Message.id.desc()).limit(limit + 1)
    with session.begin():
        exists = session.scalar(
            select(Conversation.id).where(Conversation.id == conversation_id, Conversation.user_id == user_id))
        if exists is None:
            raise ConversationNotFound()
        rows = list(session.scalars(query))
    page, more = rows[:limit], len(rows) > limit
    return page, (_encode_cursor(page[-1].id) if more else None)
