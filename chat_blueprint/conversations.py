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

The turn is the hot path, so it skips the ORM: each transaction is a few SQL
statements sent in one psycopg pipeline (one network round trip for a turn
without a key), with the user bound by `tenancy.bind_cursor` as the first
statement. Everything else here uses SQLAlchemy.
"""
from __future__ import annotations

import base64
import hashlib
import json
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import tenancy
from .assistants import HistoryMessage, Reply
from .errors import ApiError
from .models import BIGINT_MAX, Conversation, Message
from .schemas import TITLE_PREVIEW_CHARS


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


class RateLimited(ApiError):
    def __init__(self, retry_after_s: int):
        super().__init__(429, "rate_limited", "too many chat turns; retry later",
                         headers={"Retry-After": str(retry_after_s)}, retry_after=retry_after_s)


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
class RateLimit:
    """At most `turns` chat turns per `period_s` seconds per user, in bursts of up to `turns`."""

    turns: int
    period_s: int

    @property
    def params(self) -> dict:
        return {"interval": timedelta(seconds=self.period_s / self.turns), "period": timedelta(seconds=self.period_s)}


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


# Transaction 1. The user message goes in with the conversation's row lock
# taken by the UPDATE (or the conversation is created), numbered by the
# conversation's new turn_count, and under a key the key row learns which
# message it stored. Both statements end with the same two steps.
STORE_USER_MESSAGE = """
, stored AS (
    INSERT INTO message (conversation_id, user_id, role, content, turn)
    SELECT id, %(user_id)s, 'user', %(content)s, turn_count FROM counted
    RETURNING conversation_id, id, turn
), claimed AS (
    UPDATE idempotency_key SET conversation_id = stored.conversation_id, user_message_id = stored.id
    FROM stored WHERE idempotency_key.user_id = %(user_id)s AND idempotency_key.key = %(key)s
)
SELECT conversation_id, id, turn FROM stored
"""

STORE_IN_CONVERSATION = """
WITH counted AS (
    UPDATE conversation
    SET turn_count = turn_count + 1, message_count = message_count + 1, updated_at = now()
    WHERE id = %(conversation_id)s AND user_id = %(user_id)s
    RETURNING id, turn_count
)""" + STORE_USER_MESSAGE

STORE_IN_NEW_CONVERSATION = """
WITH counted AS (
    INSERT INTO conversation (user_id, title, message_count, turn_count)
    VALUES (%(user_id)s, %(title)s, 1, 1)
    RETURNING id, turn_count
)""" + STORE_USER_MESSAGE

# The last messages up to and including the user message, newest first: a
# backward scan of the (conversation_id, id) primary key that stops after
# `limit` rows, so its cost does not grow with the conversation's length
# (migration 0002 says why no index is led by `id` alone).
HISTORY_WINDOW = """
SELECT role, content, tool_calls FROM message
WHERE conversation_id = %(conversation_id)s AND id <= %(up_to)s
ORDER BY id DESC LIMIT %(limit)s
"""

LATEST_WINDOW = """
SELECT role, content, tool_calls FROM message
WHERE conversation_id = %(conversation_id)s
ORDER BY id DESC LIMIT %(limit)s
"""

# GCRA: admit the turn when moving the theoretical arrival time one emission
# interval later keeps it within one period of now; the row lock serialises a
# user's concurrent turns on every instance. No row returned: limited.
TAKE_TURN = """
INSERT INTO chat_rate_limit AS state (user_id, tat)
VALUES (%(user_id)s, now() + %(interval)s)
ON CONFLICT (user_id) DO UPDATE
SET tat = greatest(state.tat, now()) + %(interval)s
WHERE greatest(state.tat, now()) + %(interval)s <= now() + %(period)s
RETURNING tat
"""

RETRY_AFTER = """
SELECT greatest(1, ceil(extract(epoch FROM greatest(tat, now()) + %(interval)s - now() - %(period)s)))::int
FROM chat_rate_limit WHERE user_id = %(user_id)s
"""

CLAIM_KEY = """
INSERT INTO idempotency_key (user_id, key, request_hash, status)
VALUES (%(user_id)s, %(key)s, %(request_hash)s, 'running')
ON CONFLICT DO NOTHING
RETURNING key
"""

LOCK_KEY = """
SELECT request_hash, status, conversation_id, user_message_id, response,
       created_at < now() - make_interval(secs => %(ttl_s)s) AS expired,
       updated_at < now() - make_interval(secs => %(stale_after_s)s) AS stale
FROM idempotency_key WHERE user_id = %(user_id)s AND key = %(key)s
FOR UPDATE
"""

RENEW_KEY = """
UPDATE idempotency_key
SET request_hash = %(request_hash)s, status = 'running', conversation_id = NULL, user_message_id = NULL,
    response = NULL, created_at = now(), updated_at = now()
WHERE user_id = %(user_id)s AND key = %(key)s
"""

RESTART_KEY = """
UPDATE idempotency_key SET status = 'running', updated_at = now()
WHERE user_id = %(user_id)s AND key = %(key)s
"""

FAIL_KEY = """
UPDATE idempotency_key SET status = 'failed', updated_at = now()
WHERE user_id = %(user_id)s AND key = %(key)s AND status = 'running'
"""

USER_MESSAGE_TURN = """
SELECT turn FROM message WHERE conversation_id = %(conversation_id)s AND id = %(id)s AND user_id = %(user_id)s
"""

# Transaction 2: lock the conversation again, store the reply, and under a
# key record the whole answer (with the new message's id) in the same commit.
STORE_REPLY = """
WITH locked AS (
    UPDATE conversation SET message_count = message_count + 1, updated_at = now()
    WHERE id = %(conversation_id)s AND user_id = %(user_id)s
    RETURNING id
), reply AS (
    INSERT INTO message (conversation_id, user_id, role, content, tool_calls, reply_to)
    SELECT id, %(user_id)s, 'assistant', %(content)s, %(tool_calls)s, %(reply_to)s FROM locked
    RETURNING id
), answered AS (
    UPDATE idempotency_key
    SET status = 'done', updated_at = now(),
        response = jsonb_set(%(response)s, '{assistant_message_id}', to_jsonb(reply.id))
    FROM reply WHERE idempotency_key.user_id = %(user_id)s AND idempotency_key.key = %(key)s
)
SELECT id FROM reply
"""


@contextmanager
def _turn_transaction(engine: Engine, user_id: str):
    """A pooled psycopg connection in pipeline mode, its transaction bound to
    `user_id` by the first (queued) statement. The caller commits; anything
    else rolls back. A connection found dead is invalidated with every other
    pooled one, as SQLAlchemy does on a disconnect."""
    with engine.connect() as pooled:
        connection = pooled.connection.driver_connection
        try:
            with connection.pipeline():
                tenancy.bind_cursor(connection.cursor(), user_id)
                yield connection
        except BaseException as exc:
            if connection.broken or connection.closed:
                pooled.invalidate(exc if isinstance(exc, Exception) else None)
                engine.dispose()
            else:
                try:
                    connection.rollback()
                except psycopg.Error:
                    pooled.invalidate()
            raise


def _window(rows) -> list[HistoryMessage]:
    return [HistoryMessage(role, content, tool_calls) for role, content, tool_calls in reversed(rows)]


def begin_turn(engine: Engine, user_id: str, message: str, conversation_id: uuid.UUID | None,
               claim: IdempotencyClaim | None, history_limit: int,
               rate_limit: RateLimit | None = None) -> PendingTurn | Replay:
    """Transaction 1 of a turn: store the user message and read the window.

    A replay or the resumption of a stored message does not count against the
    rate limit; a new message does, and over the limit nothing is stored (429).
    """
    key = claim.key if claim else None
    params = {"user_id": user_id, "content": message, "conversation_id": conversation_id, "key": key,
              "title": message[:TITLE_PREVIEW_CHARS], "limit": history_limit}
    with _turn_transaction(engine, user_id) as connection:
        if claim is not None:
            outcome = _claim_key(connection, user_id, claim, history_limit)
            if outcome is not None:
                return outcome
        if rate_limit is not None:
            _take_turn(connection, user_id, rate_limit)
        stored = connection.cursor()
        window = connection.cursor()
        if conversation_id is None:
            stored.execute(STORE_IN_NEW_CONVERSATION, params)
        else:
            stored.execute(STORE_IN_CONVERSATION, params)
            window.execute(LATEST_WINDOW, params)
        if claim is None:
            connection.commit()
        row = stored.fetchone()
        if row is None:
            raise ConversationNotFound()
        history = _window(window.fetchall()) if conversation_id else [HistoryMessage("user", message, [])]
        if claim is not None:
            connection.commit()
    conversation_id, user_message_id, turn = row
    return PendingTurn(conversation_id, user_message_id, turn, history, key)


def _take_turn(connection, user_id: str, rate_limit: RateLimit) -> None:
    params = {"user_id": user_id, **rate_limit.params}
    taken = connection.cursor()
    taken.execute(TAKE_TURN, params)
    if taken.fetchone() is None:
        retry_after = connection.cursor()
        retry_after.execute(RETRY_AFTER, params)
        raise RateLimited(retry_after.fetchone()[0])


def _claim_key(connection, user_id: str, claim: IdempotencyClaim, history_limit: int) -> PendingTurn | Replay | None:
    """Claim `claim.key` for this request, inside transaction 1.

    None: this request is the first (or the key expired, or the first died
    before storing anything): go on as a new turn. Replay: the first finished.
    PendingTurn: the first failed or died after storing its user message;
    answer that message. 422 for another body under the key; 409 while the
    first is still running.
    """
    params = {"user_id": user_id, "key": claim.key, "request_hash": claim.request_hash, "ttl_s": claim.ttl_s,
              "stale_after_s": claim.stale_after_s}
    claimed = connection.cursor()
    claimed.execute(CLAIM_KEY, params)
    if claimed.fetchone() is not None:
        return None
    locked = connection.cursor()
    locked.execute(LOCK_KEY, params)
    request_hash, status, conversation_id, user_message_id, response, expired, stale = locked.fetchone()
    if expired:
        connection.cursor().execute(RENEW_KEY, params)
        return None
    if request_hash != claim.request_hash:
        raise IdempotencyKeyReused()
    if status == "done":
        connection.rollback()
        return Replay(response)
    if status == "running" and not stale:
        raise IdempotencyKeyInFlight()
    connection.cursor().execute(RESTART_KEY, params)
    if user_message_id is None:
        return None
    turn, window = connection.cursor(), connection.cursor()
    turn.execute(USER_MESSAGE_TURN, {"conversation_id": conversation_id, "id": user_message_id, "user_id": user_id})
    window.execute(HISTORY_WINDOW, {"conversation_id": conversation_id, "up_to": user_message_id,
                                    "limit": history_limit})
    connection.commit()
    row = turn.fetchone()
    if row is None:
        raise ConversationNotFound()
    return PendingTurn(conversation_id, user_message_id, row[0], _window(window.fetchall()), claim.key)


def finish_turn(engine: Engine, user_id: str, pending: PendingTurn, reply: Reply) -> dict:
    """Transaction 2 of a turn: store the reply and, under a key, the answer."""
    response = {
        "conversation_id": str(pending.conversation_id),
        "response": reply.text,
        "tool_calls": reply.tool_calls,
        "user_message_id": pending.user_message_id,
        "assistant_message_id": None,
    }
    with _turn_transaction(engine, user_id) as connection:
        stored = connection.cursor()
        stored.execute(STORE_REPLY, {
            "user_id": user_id, "conversation_id": pending.conversation_id, "content": reply.text,
            "tool_calls": Jsonb(reply.tool_calls), "reply_to": pending.user_message_id,
            "key": pending.idempotency_key, "response": Jsonb(response),
        })
        connection.commit()
        row = stored.fetchone()
    if row is None:
        raise ConversationNotFound()
    response["assistant_message_id"] = row[0]
    return response


def fail_turn(engine: Engine, user_id: str, pending: PendingTurn) -> None:
    """The assistant failed: the user message stays; the key may be retried at once."""
    if pending.idempotency_key is None:
        return
    with _turn_transaction(engine, user_id) as connection:
        connection.cursor().execute(FAIL_KEY, {"user_id": user_id, "key": pending.idempotency_key})
        connection.commit()


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
