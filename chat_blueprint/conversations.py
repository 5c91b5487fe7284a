"""The persistence of a chat turn and of conversation history (no Flask here).

A turn is two short transactions with the assistant call between them, so no
connection is held while the assistant thinks:

1. `begin_turn`: claim the Idempotency-Key (if any), lock the conversation by
   updating its counters (or create it), store the user message, read the
   history window from the `(conversation_id, id)` index, commit.
2. the assistant answers from that window (the caller does this);
3. `finish_turn`: lock the conversation again, store the reply with
   `reply_to` = the user message, record the answer under the key, commit.

The conversation row lock serialises turns of one conversation across any
number of app instances, so message ids follow one total order per
conversation, and each turn sees every message committed before it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, insert, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from .assistants import HistoryMessage, Reply
from .errors import ApiError
from .models import Conversation, IdempotencyKey, Message
from .schemas import TITLE_PREVIEW_CHARS

BIGINT_MAX = 2**63 - 1


class ConversationNotFound(ApiError):
    def __init__(self):
        super().__init__(404, "conversation_not_found", "no such conversation")


class IdempotencyKeyReused(ApiError):
    def __init__(self):
        super().__init__(422, "idempotency_key_reused",
                         "this Idempotency-Key was used with a different request body")


class IdempotencyKeyInFlight(ApiError):
    def __init__(self):
        super().__init__(409, "idempotency_key_in_flight",
                         "the first request with this Idempotency-Key is still running; retry later",
                         headers={"Retry-After": "1"})


class InvalidCursor(ApiError):
    def __init__(self):
        super().__init__(422, "validation_failed", "the request has invalid fields",
                         fields={"cursor": ["Not a cursor returned by this API."]})


@dataclass(frozen=True)
class IdempotencyClaim:
    """An `Idempotency-Key` with the fingerprint of the request it came with."""

    key: str
    request_hash: str
    stale_after_s: float
    ttl_s: int

    @classmethod
    def of(cls, key: str, message: str, conversation_id: uuid.UUID | None, *, stale_after_s: float, ttl_s: int):
        body = json.dumps({"message": message, "conversation_id": str(conversation_id) if conversation_id else None},
                          sort_keys=True)
        return cls(key, hashlib.sha256(body.encode()).hexdigest(), stale_after_s, ttl_s)


@dataclass(frozen=True)
class PendingTurn:
    """A stored user message waiting for the assistant."""

    conversation_id: uuid.UUID
    user_message_id: int
    turn: int
    history: list[HistoryMessage]
    idempotency_key: str | None


@dataclass(frozen=True)
class Replay:
    """The stored answer of an earlier request with the same Idempotency-Key."""

    response: dict


def begin_turn(session: Session, user_id: str, message: str, conversation_id: uuid.UUID | None,
               claim: IdempotencyClaim | None, history_limit: int) -> PendingTurn | Replay:
    """Transaction 1 of a turn: store the user message and read the window."""
    with session.begin():
        if claim is not None:
            outcome = _claim_key(session, user_id, claim)
            if isinstance(outcome, Replay):
                return outcome
            if outcome is not None:
                return _resume(session, user_id, outcome, claim.key, history_limit)
        if conversation_id is None:
            conversation_id, turn = _create_conversation(session, user_id, message)
        else:
            turn = _count_user_message(session, user_id, conversation_id)
        user_message_id = session.scalar(
            insert(Message)
            .values(conversation_id=conversation_id, user_id=user_id, role="user", content=message, turn=turn)
            .returning(Message.id)
        )
        if claim is not None:
            session.execute(
                update(IdempotencyKey)
                .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == claim.key)
                .values(conversation_id=conversation_id, user_message_id=user_message_id)
            )
        history = history_window(session, conversation_id, user_message_id, history_limit)
    return PendingTurn(conversation_id, user_message_id, turn, history, claim.key if claim else None)


def finish_turn(session: Session, user_id: str, pending: PendingTurn, reply: Reply) -> dict:
    """Transaction 2 of a turn: store the reply and, under a key, the answer."""
    with session.begin():
        locked = session.scalar(
            update(Conversation)
            .where(Conversation.id == pending.conversation_id, Conversation.user_id == user_id)
            .values(message_count=Conversation.message_count + 1, updated_at=func.now())
            .returning(Conversation.id)
        )
        if locked is None:
            raise ConversationNotFound()
        assistant_message_id = session.scalar(
            insert(Message)
            .values(conversation_id=pending.conversation_id, user_id=user_id, role="assistant", content=reply.text,
                    tool_calls=reply.tool_calls, reply_to=pending.user_message_id)
            .returning(Message.id)
        )
        response = {
            "conversation_id": str(pending.conversation_id),
            "response": reply.text,
            "tool_calls": reply.tool_calls,
            "user_message_id": pending.user_message_id,
            "assistant_message_id": assistant_message_id,
        }
        if pending.idempotency_key is not None:
            session.execute(
                update(IdempotencyKey)
                .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == pending.idempotency_key)
                .values(status="done", response=response, updated_at=func.now())
            )
    return response


def fail_turn(session: Session, user_id: str, pending: PendingTurn) -> None:
    """The assistant failed: the user message stays; the key may be retried at once."""
    if pending.idempotency_key is None:
        return
    with session.begin():
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == pending.idempotency_key)
            .values(status="failed", updated_at=func.now())
        )


def history_window(session: Session, conversation_id: uuid.UUID, up_to_message_id: int,
                   limit: int) -> list[HistoryMessage]:
    """The last `limit` messages up to and including `up_to_message_id`, oldest first.

    A backward scan of the `(conversation_id, id)` index that stops after
    `limit` rows: its cost does not grow with the conversation's length.
    """
    rows = session.execute(
        select(Message.role, Message.content, Message.tool_calls)
        .where(Message.conversation_id == conversation_id, Message.id <= up_to_message_id)
        .order_by(Message.id.desc())
        .limit(limit)
    ).all()
    return [HistoryMessage(role, content, tool_calls) for role, content, tool_calls in reversed(rows)]


def _create_conversation(session: Session, user_id: str, message: str) -> tuple[uuid.UUID, int]:
    conversation_id = session.scalar(
        insert(Conversation)
        .values(user_id=user_id, title=message[:TITLE_PREVIEW_CHARS], message_count=1, turn_count=1)
        .returning(Conversation.id)
    )
    return conversation_id, 1


def _count_user_message(session: Session, user_id: str, conversation_id: uuid.UUID) -> int:
    """Lock the conversation (the UPDATE takes its row lock until commit) and
    number the new user message. A missing or foreign conversation is a 404."""
    turn = session.scalar(
        update(Conversation)
        .where(Conversation.id == conversation_id, Conversation.user_id == user_id)
        .values(turn_count=Conversation.turn_count + 1, message_count=Conversation.message_count + 1,
                updated_at=func.now())
        .returning(Conversation.turn_count)
    )
    if turn is None:
        raise ConversationNotFound()
    return turn


def _claim_key(session: Session, user_id: str, claim: IdempotencyClaim) -> Replay | IdempotencyKey | None:
    """Claim `claim.key` for this request.

    Returns None when this request is the first (go on as a new turn), a
    Replay when the first one finished, or the key's row when the first one
    failed or died after storing its user message (resume it). Raises 422 for
    another body under the key and 409 while the first is still running.
    """
    inserted = session.scalar(
        pg_insert(IdempotencyKey)
        .values(user_id=user_id, key=claim.key, request_hash=claim.request_hash, status="running")
        .on_conflict_do_nothing()
        .returning(IdempotencyKey.key)
    )
    if inserted is not None:
        return None
    row = session.scalar(
        select(IdempotencyKey)
        .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == claim.key)
        .with_for_update()
    )
    now = session.scalar(select(func.now()))
    if row.created_at < now - timedelta(seconds=claim.ttl_s):
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == claim.key)
            .values(request_hash=claim.request_hash, status="running", conversation_id=None, user_message_id=None,
                    response=None, created_at=func.now(), updated_at=func.now())
        )
        return None
    if row.request_hash != claim.request_hash:
        raise IdempotencyKeyReused()
    if row.status == "done":
        return Replay(row.response)
    if row.status == "running" and row.updated_at > now - timedelta(seconds=claim.stale_after_s):
        raise IdempotencyKeyInFlight()
    session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.user_id == user_id, IdempotencyKey.key == claim.key)
        .values(status="running", updated_at=func.now())
    )
    return row if row.user_message_id is not None else None


def _resume(session: Session, user_id: str, key_row: IdempotencyKey, key: str, history_limit: int) -> PendingTurn:
    """Answer the user message a failed first request stored, without storing it again."""
    turn = session.scalar(
        select(Message.turn).where(Message.id == key_row.user_message_id, Message.user_id == user_id)
    )
    if turn is None:
        raise ConversationNotFound()
    history = history_window(session, key_row.conversation_id, key_row.user_message_id, history_limit)
    return PendingTurn(key_row.conversation_id, key_row.user_message_id, turn, history, key)


# Conversation history


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
