"""A chat turn as explicit steps (no Flask here):

1. `begin`: claim the Idempotency-Key, take the rate limit, store the user
   message under the conversation's row lock (or create the conversation),
   read the history window: one short transaction.
2. `ask`: the assistant answers from that window, with no transaction open.
3. `finish`: store the reply with `reply_to` = the user message and record
   the answer under the key: a second short transaction.
4. `fail`: whatever went wrong after `begin`, release the key so a retry with
   it can answer the stored message at once.

`run` is the blocking turn: the steps in order, with every failure after
`begin` going through `_released_on_failure`, the one place that maps an
assistant failure to 502/504 and a database failure (psycopg's or
SQLAlchemy's, pool timeouts included) to 503. A new way of delivering a turn
(a stream) calls the same steps and differs only in how it asks and delivers.

The conversation row lock serialises turns of one conversation across any
number of app instances, so message ids follow one total order per
conversation, and each turn sees every message committed before it.

The turn is the hot path, so it skips the ORM: each transaction is a few SQL
statements (turn_sql.py) sent in one psycopg pipeline through
`tenancy.transaction` (one network round trip for a turn without a key). A
streamed turn runs the same steps on a thread of its own (turn_relay.py).
"""
from __future__ import annotations

import json
import logging
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg.errors
from psycopg.types.json import Jsonb
from sqlalchemy.engine import Engine

from ..assistants import Assistant, HistoryMessage, Reply
from ..db import tenancy
from ..errors import DATABASE_ERRORS, database_failure
from ..schemas import TITLE_PREVIEW_CHARS
from . import idempotency, rate_limit
from .asking import Asking, AssistantFailed
from .conversations import ConversationNotFound
from .idempotency import IdempotencyClaim, KeyState
from .rate_limit import RateLimit
from .storable import UNSTORABLE, storable
from .turn_relay import TurnStream
from .turn_sql import (
    HISTORY_WINDOW,
    LATEST_WINDOW,
    STORE_IN_CONVERSATION,
    STORE_IN_NEW_CONVERSATION,
    STORE_REPLY,
    STORED_REPLY,
    USER_MESSAGE_TURN,
)

log = logging.getLogger(__name__)

STALE_GRACE_S = 30
# Answers stored under a key before replies carried the model's report.
ANSWER_DEFAULTS = {"model": None, "finish_reason": None, "usage": None}
# The keys of an answer in the order `_store_reply` gives them: a replay reads the answer back from jsonb,
# which keeps keys in its own order (shortest first), and puts them back in this one.
ANSWER_KEYS = ("conversation_id", "response", "tool_calls", "user_message_id", "assistant_message_id", "model",
               "finish_reason", "usage")

REPLY_TO_INDEX = "uq_message_reply_to"

@dataclass(frozen=True)
class TurnRequest:
    """What a client asked for: a message for a conversation (None: a new one)."""

    user_id: str
    message: str
    conversation_id: uuid.UUID | None
    claim: IdempotencyClaim | None


@dataclass(frozen=True)
class PendingTurn:
    """A stored user message waiting for the assistant."""

    user_id: str
    conversation_id: uuid.UUID
    user_message_id: int
    turn: int
    history: list[HistoryMessage]
    idempotency_key: str | None


@dataclass(frozen=True)
class Replay:
    """The stored answer of an earlier request with the same Idempotency-Key."""

    response: dict

    def __post_init__(self):
        stored = {**ANSWER_DEFAULTS, **self.response}
        ordered = {key: stored.pop(key) for key in ANSWER_KEYS if key in stored}
        object.__setattr__(self, "response", {**ordered, **stored})


def _window(rows, max_chars: int) -> list[HistoryMessage]:
    """The window, oldest first, from its rows newest first (the user message being
    answered is the first): that message always, whole; then older ones for as long
    as the window holds at most `max_chars` characters, so it ends at the first one
    that does not fit. A sum over rows the query returned anyway, no extra query."""
    window, size = [], 0
    for role, content, tool_calls in rows:
        size += len(content) + (len(json.dumps(tool_calls)) if tool_calls else 0)
        if window and size > max_chars:
            break
        window.append(HistoryMessage(role, content, tool_calls))
    window.reverse()
    return window


class Turns:
    """The turn service for one assistant backend on one engine."""

    def __init__(self, engine: Engine, assistant: Assistant, *, backend: str, history_limit: int,
                 history_max_chars: int, stale_after_s: float, idempotency_ttl_s: int, keepalive_s: float,
                 rate_limit: RateLimit | None = None):
        self.engine = engine
        self.asking = Asking(assistant, backend)
        self.history_limit = history_limit
        self.history_max_chars = history_max_chars
        self.stale_after_s = stale_after_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.rate_limit = rate_limit
        self.keepalive_s = keepalive_s

    @classmethod
    def from_settings(cls, engine: Engine, assistant: Assistant, settings) -> Turns:
        return cls(engine, assistant, backend=settings.assistant, history_limit=settings.chat_history_limit,
                   stale_after_s=settings.assistant_timeout_s + STALE_GRACE_S,
                   idempotency_ttl_s=settings.idempotency_ttl_s,
                   rate_limit=RateLimit(*settings.chat_rate_limit) if settings.chat_rate_limit else None,
                   keepalive_s=settings.stream_keepalive_s, history_max_chars=settings.chat_history_max_chars)

    def request(self, user_id: str, message: str, conversation_id: uuid.UUID | None,
                key: str | None = None) -> TurnRequest:
        claim = None
        if key is not None:
            claim = IdempotencyClaim.of(key, message, conversation_id, stale_after_s=self.stale_after_s,
                                        ttl_s=self.idempotency_ttl_s)
        return TurnRequest(user_id, message, conversation_id, claim)

    def run(self, request: TurnRequest) -> dict:
        """A blocking turn: the answer, or an ApiError (404, 409, 422, 429, 502, 503, 504)."""
        pending = self.begin(request)
        if isinstance(pending, Replay):
            return pending.response
        return self.answer(pending, self.ask)

    def answer(self, pending: PendingTurn, ask) -> dict:
        """`ask(pending)` then `finish`, every failure going through `_released_on_failure`:
        the one sequence both deliveries run, differing only in how they ask."""
        with self._released_on_failure(pending):
            return self.finish(pending, ask(pending))

    def stream(self, pending: PendingTurn) -> TurnStream:
        """A streaming turn: `ask` in the assistant's streaming form and `finish`, run
        at once on a thread of their own, whose events the caller relays."""
        return TurnStream(self, pending, self.keepalive_s)

    # Step 1

    def begin(self, request: TurnRequest) -> PendingTurn | Replay:
        """Store the user message and read the window, in one transaction.

        A replay or the resumption of a stored message does not count against
        the rate limit; a new message does, and over the limit nothing is
        stored (429).
        """
        with tenancy.transaction(self.engine, request.user_id) as connection:
            if request.claim is not None:
                outcome = idempotency.claim(connection, request.user_id, request.claim)
                outcome.refuse()
                if outcome.state is KeyState.REPLAY:
                    return Replay(outcome.response)
                if outcome.state is KeyState.RESUME:
                    return self._resume(connection, request, outcome)
            limited = None
            if self.rate_limit is not None:
                limited = rate_limit.queue_take(connection, request.user_id, self.rate_limit, rate_limit.CHAT)
            return self._store_user_message(connection, request, limited)

    def _store_user_message(self, connection, request: TurnRequest,
                            limited: rate_limit.PendingTake | None = None) -> PendingTurn:
        """Store the message; with a rate limit, its step went out first in the
        same transaction, and a 429 or a 404 rolls both back, so a turn into
        an unknown conversation is not counted."""
        params = {"user_id": request.user_id, "content": request.message, "key": request.claim and request.claim.key,
                  "conversation_id": request.conversation_id, "title": request.message[:TITLE_PREVIEW_CHARS],
                  "limit": self.history_limit}
        stored, window = connection.cursor(), connection.cursor()
        if request.conversation_id is None:
            stored.execute(STORE_IN_NEW_CONVERSATION, params)
        else:
            stored.execute(STORE_IN_CONVERSATION, params)
            window.execute(LATEST_WINDOW, params)
        if request.claim is None and limited is None:
            # Nothing to undo if the conversation is unknown: send it all in one round trip.
            connection.commit()
        if limited is not None:
            limited.check()  # 429: the message goes with the rollback
        row = stored.fetchone()
        if row is None:
            raise ConversationNotFound()  # rolls back the claim and the rate-limit step
        if request.conversation_id is None:
            history = [HistoryMessage("user", request.message, [])]
        else:
            history = _window(window.fetchall(), self.history_max_chars)
        conversation_id, user_message_id, turn = row
        return PendingTurn(request.user_id, conversation_id, user_message_id, turn, history,
                           request.claim and request.claim.key)

    def _resume(self, connection, request: TurnRequest, outcome) -> PendingTurn:
        """Answer the user message the key's first request stored."""
        turn, window = connection.cursor(), connection.cursor()
        turn.execute(USER_MESSAGE_TURN, {"conversation_id": outcome.conversation_id, "id": outcome.user_message_id,
                                         "user_id": request.user_id})
        window.execute(HISTORY_WINDOW, {"conversation_id": outcome.conversation_id, "up_to": outcome.user_message_id,
                                        "limit": self.history_limit})
        row = turn.fetchone()
        if row is None:
            # The conversation was deleted since: the key can never be
            # answered, so it ends failed (not running, which would make every
            # retry a 409 until it is stale) and every retry is this 404.
            idempotency.fail(connection, request.user_id, request.claim.key)
            connection.commit()
            raise ConversationNotFound()
        connection.commit()
        return PendingTurn(request.user_id, outcome.conversation_id, outcome.user_message_id, row[0],
                           _window(window.fetchall(), self.history_max_chars), request.claim.key)

    # Step 2

    def ask(self, pending: PendingTurn) -> Reply:
        """The assistant's reply to the window; any failure is an AssistantFailed."""
        return self.asking.reply(pending)

    def ask_streaming(self, pending: PendingTurn, emit) -> Reply:
        """Like `ask`, calling `emit(Delta(text))` for each piece of text as it comes."""
        return self.asking.stream(pending, emit)

    # Step 3

    def finish(self, pending: PendingTurn, reply: Reply) -> dict:
        """Store the reply and, under a key, the answer; return the answer.

        The reply is made storable first (see `storable`). If another request
        answered the same user message meanwhile (a retry that took over the
        key of a slow first request), the unique index on `reply_to` refuses
        this reply, and the answer is the one stored.
        """
        reply = storable(reply)
        try:
            return self._store_reply(pending, reply)
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != REPLY_TO_INDEX:
                raise
        stored = self._stored_reply(pending)
        if stored is None:
            raise ConversationNotFound()
        return stored

    def _stored_reply(self, pending: PendingTurn) -> dict | None:
        with tenancy.transaction(self.engine, pending.user_id) as connection:
            found = connection.cursor()
            found.execute(STORED_REPLY, {"conversation_id": pending.conversation_id,
                                         "reply_to": pending.user_message_id, "user_id": pending.user_id})
            row = found.fetchone()
        if row is None:
            return None
        assistant_message_id, content, tool_calls, model, finish_reason, usage = row
        return {"conversation_id": str(pending.conversation_id), "response": content, "tool_calls": tool_calls,
                "user_message_id": pending.user_message_id, "assistant_message_id": assistant_message_id,
                "model": model, "finish_reason": finish_reason, "usage": usage}

    def _store_reply(self, pending: PendingTurn, reply: Reply) -> dict:
        response = {
            "conversation_id": str(pending.conversation_id),
            "response": reply.text,
            "tool_calls": reply.tool_calls,
            "user_message_id": pending.user_message_id,
            "assistant_message_id": None,
            "model": reply.model,
            "finish_reason": reply.finish_reason,
            "usage": reply.usage,
        }
        with tenancy.transaction(self.engine, pending.user_id) as connection:
            stored = connection.cursor()
            stored.execute(STORE_REPLY, {
                "user_id": pending.user_id, "conversation_id": pending.conversation_id, "content": reply.text,
                "tool_calls": Jsonb(reply.tool_calls), "reply_to": pending.user_message_id,
                "key": pending.idempotency_key, "response": Jsonb(response), "model": reply.model,
                "finish_reason": reply.finish_reason, "usage": Jsonb(reply.usage) if reply.usage is not None else None,
            })
            connection.commit()
            row = stored.fetchone()
        if row is None:
            raise ConversationNotFound()
        response["assistant_message_id"] = row[0]
        return response

    # Step 4

    def fail(self, pending: PendingTurn) -> None:
        """Release the key, if the database allows: the user message stays, and a
        retry with the key may answer it at once (not only once it is stale)."""
        if pending.idempotency_key is None:
            return
        try:
            with tenancy.transaction(self.engine, pending.user_id) as connection:
                idempotency.fail(connection, pending.user_id, pending.idempotency_key)
        except DATABASE_ERRORS as exc:
            log.warning("could not release an Idempotency-Key (%s); it is retried once stale", type(exc).__name__)

    @contextmanager
    def _released_on_failure(self, pending: PendingTurn):
        """Every failure after `begin` releases the key; a database failure is a 503."""
        try:
            yield
        except Exception as failure:
            self.fail(pending)
            if isinstance(failure, UNSTORABLE):
                log.error("the assistant's reply could not be stored: %s", type(failure).__name__)
                raise AssistantFailed(502, "assistant_failed", "the assistant's reply could not be stored",
                                      pending) from None
            if isinstance(failure, DATABASE_ERRORS):
                log.warning("chat turn unanswered: database unavailable (%s)", type(failure).__name__)
                raise database_failure(failure) from None
            raise


