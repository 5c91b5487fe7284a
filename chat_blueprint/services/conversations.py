"""Conversations and their messages: the ORM queries behind the history API.

Lists are keyset-paginated: a cursor (pagination.py) is the base64url JSON of
the last row's sort key, so a page costs the same however deep it is.
"""
from __future__ import annotations

import uuid

from sqlalchemy import delete, select, text, tuple_, update
from sqlalchemy.orm import Session

from ..db.models import Conversation, Message
from ..errors import ApiError
from . import pagination


class ConversationNotFound(ApiError):
    def __init__(self):
        super().__init__(404, "conversation_not_found", "no such conversation")


def list_conversations(session: Session, user_id: str, limit: int, cursor: str | None) -> tuple[list, str | None]:
    """Most recently updated first, keyset-paginated on (updated_at, id)."""
    query = select(Conversation).where(Conversation.user_id == user_id)
    if cursor is not None:
        updated_at, conversation_id = pagination.decode_conversation(cursor)
        query = query.where(tuple_(Conversation.updated_at, Conversation.id) < tuple_(updated_at, conversation_id))
    query = query.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit + 1)
    with session.begin():
        rows = list(session.scalars(query))
    return pagination.keyset_page(rows, limit, lambda last: pagination.encode_conversation(last.updated_at, last.id))


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
                  order: str, superseded: bool = False) -> tuple[list, str | None]:
    """A page of a conversation's current messages (with `superseded`, also the
    ones a newer message replaced) in id order, keyset-paginated on id."""
    query = select(Message).where(Message.conversation_id == conversation_id, Message.user_id == user_id)
    if not superseded:
        query = query.where(Message.superseded_at.is_(None))
    if cursor is not None:
        after_id = pagination.decode_message(cursor)
        query = query.where(Message.id > after_id if order == "asc" else Message.id < after_id)
    query = query.order_by(Message.id.asc() if order == "asc" else Message.id.desc()).limit(limit + 1)
    with session.begin():
        exists = session.scalar(
            select(Conversation.id).where(Conversation.id == conversation_id, Conversation.user_id == user_id))
        if exists is None:
            raise ConversationNotFound()
        rows = list(session.scalars(query))
    return pagination.keyset_page(rows, limit, lambda last: pagination.encode_message(last.id))


# The conversation (to tell a 404), and its reply being produced made `stopped`
# (its producer, on any instance, sees it at its next flush or check).
STOP = text("""
WITH conversation AS (
    SELECT id FROM conversation WHERE id = :conversation_id AND user_id = :user_id
), stopped AS (
    UPDATE message SET status = 'stopped', stale_at = NULL
    WHERE conversation_id = :conversation_id AND user_id = :user_id AND status = 'streaming'
      AND stale_at > now() AND superseded_at IS NULL
    RETURNING id
)
SELECT EXISTS (SELECT FROM conversation), (SELECT max(id) FROM stopped)
""")


def stop(session: Session, user_id: str, conversation_id: uuid.UUID) -> int | None:
    """Stop the reply the conversation is producing, on whichever instance: the
    id of the reply stopped, or None when none was being produced."""
    with session.begin():
        exists, stopped = session.execute(STOP, {"conversation_id": conversation_id, "user_id": user_id}).one()
    if not exists:
        raise ConversationNotFound()
    return stopped
