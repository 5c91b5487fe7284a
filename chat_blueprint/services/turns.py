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

import logging
import threading
import uuid
from contextlib import contextmanager
from datetime import timedelta

import psycopg.errors
from sqlalchemy.engine import Engine

from ..assistants import Assistant, HistoryMessage, Reply
from ..assistants.deadlines import cancellable
from ..db import tenancy
from ..errors import DATABASE_ERRORS, ApiError, database_failure
from ..schemas import TITLE_PREVIEW_CHARS
from . import idempotency, rate_limit, rewrites
from .asking import Asking, AssistantFailed
from .conversations import ConversationNotFound
from .idempotency import IdempotencyClaim, KeyState
from .pending import PendingTurn, Replay, TurnRequest, new_ui_id, window_of
from .progress import MINDER, ReplyProgress, Stopped
from .rate_limit import RateLimit
from .replies import Replies
from .rewrites import Rewrite
from .storable import UNSTORABLE
from .turn_relay import TurnStream
from .turn_sql import (
    ANSWER_AGAIN,
    HISTORY_WINDOW,
    LATEST_WINDOW,
    SUPERSEDE_REPLY,
    USER_MESSAGE_TURN,
    store_user_message,
)

log = logging.getLogger(__name__)

STALE_GRACE_S = 30
# A new turn is refused (503 server_busy, before anything is stored) while this
# process holds CHAT_MAX_TURNS_PER_PROCESS turns already (each waits on the
# assistant, cheaply, but a process's CPU answers only so many a second), or
# while some request of it has waited for a pooled connection for more than
# this share of DATABASE_POOL_TIMEOUT_S (then the pool, or the CPU behind it,
# is the bottleneck, and queueing more turns only ends in a 503 anyway).
ADMISSION_WAIT_SHARE = 0.5
UI_ID_INDEX = "uq_message_ui_id"


class Busy(ApiError):
    """This process holds all the turns it can: a new turn is refused before it
    stores anything; a retry after a little while is likely to get in."""

    def __init__(self):
        super().__init__(503, "server_busy", "the server is busy; retry shortly", headers={"Retry-After": "2"})


class InFlight:
    """The turns this process is answering, from `begin` to their end."""

    def __init__(self):
        self.count = 0
        self._lock = threading.Lock()

    def enter(self, limit: int) -> None:
        with self._lock:
            if self.count >= limit:
                raise Busy()
            self.count += 1

    def leave(self) -> None:
        with self._lock:
            self.count -= 1


IN_FLIGHT = InFlight()


class Turns:
    """The turn service for one assistant backend on one engine."""

    def __init__(self, engine: Engine, assistant: Assistant, *, backend: str, history_limit: int,
                 history_max_chars: int, stale_after_s: float, idempotency_ttl_s: int, keepalive_s: float,
                 admission_wait_s: float, flush_s: float, max_turns: int, rate_limit: RateLimit | None = None):
        self.engine = engine
        self.max_turns = max_turns
        self.replies = Replies(engine, stale_after_s)
        self.flush_s = flush_s
        self.admission_wait_s = admission_wait_s
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
                   keepalive_s=settings.stream_keepalive_s, history_max_chars=settings.chat_history_max_chars,
                   admission_wait_s=ADMISSION_WAIT_SHARE * settings.pool_timeout_s, flush_s=settings.stream_flush_s,
                   max_turns=settings.chat_max_turns_per_process)

    def request(self, user_id: str, message: str | None, conversation_id: uuid.UUID | None,
                key: str | None = None, *, user_ui_id: str | None = None, create: bool = False,
                rewrite: Rewrite | None = None) -> TurnRequest:
        claim = None
        if key is not None:
            what = {"rewrite": [rewrite.kind, rewrite.message_id, rewrite.ui_id]} if rewrite else {}
            claim = IdempotencyClaim.of(key, message, conversation_id, stale_after_s=self.stale_after_s,
                                        ttl_s=self.idempotency_ttl_s, **what)
        return TurnRequest(user_id, message, conversation_id, claim, user_ui_id, create, rewrite)

    def run(self, request: TurnRequest) -> dict:
        """A blocking turn: the answer, or an ApiError (404, 409, 422, 429, 502, 503, 504)."""
        pending = self.begin(request)
        if isinstance(pending, Replay):
            return pending.response
        return self.answer(pending, self.ask)

    def answer(self, pending: PendingTurn, ask) -> dict:
        """`ask(pending, progress)` then `finish`, every failure going through
        `_released_on_failure`: the one sequence both deliveries run, differing
        only in how they ask. While the assistant answers, the process's minder
        watches for a stop; a stopped reply keeps the text produced so far."""
        progress = ReplyProgress(self.engine, pending, self.flush_s)
        MINDER.watch(progress)
        try:  # the turn entered IN_FLIGHT in `begin`
            with self._released_on_failure(pending), cancellable(progress.scope):
                try:
                    reply = ask(pending, progress)
                except Stopped:
                    return self.finish_stopped(pending, Reply(text=progress.text))
                return self.finish(pending, reply)
        finally:
            MINDER.forget(progress)
            IN_FLIGHT.leave()

    def stream(self, pending: PendingTurn) -> TurnStream:
        """A streaming turn: `ask` in the assistant's streaming form and `finish`, run
        at once on a thread of their own, whose events the caller relays."""
        return TurnStream(self, pending, self.keepalive_s)

    # Step 1

    def begin(self, request: TurnRequest) -> PendingTurn | Replay:
        """Store the user message and read the window, in one transaction.

        A replay or the resumption of a stored message does not count against
        the chat rate limit; a new message does, and over the limit nothing is
        stored (429). The request's write-limit step goes into the statement
        that stores the message (without a key) or out with the binding (with
        one): over WRITE_RATE_LIMIT nothing is stored either.
        """
        if tenancy.queue_age_s(self.engine) > self.admission_wait_s:
            raise Busy()
        IN_FLIGHT.enter(self.max_turns)
        try:
            begun = self._begin(request)
        except BaseException:
            IN_FLIGHT.leave()
            raise
        if isinstance(begun, Replay):
            IN_FLIGHT.leave()  # nothing to answer
        return begun

    def _begin(self, request: TurnRequest) -> PendingTurn | Replay:
        plain = request.claim is None and request.rewrite is None
        due = rate_limit.take_due_write() if plain else None
        try:
            with tenancy.transaction(self.engine, request.user_id) as connection:
                if request.claim is not None:
                    outcome = idempotency.claim(connection, request.user_id, request.claim)
                    outcome.refuse()
                    if outcome.state is KeyState.REPLAY:
                        return Replay.of(outcome.response)
                    if outcome.state is KeyState.RESUME:
                        return self._resume(connection, request, outcome)
                if request.rewrite is not None:
                    return self._pending(request, *rewrites.rewrite(self, connection, request, new_ui_id))
                limited = None
                if self.rate_limit is not None:
                    limited = rate_limit.queue_take(connection, request.user_id, self.rate_limit, rate_limit.CHAT)
                return self._store_user_message(connection, request, due, limited)
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != UI_ID_INDEX:
                raise
            raise rewrites.ReplyInProgress() from None  # the same message sent twice at once: the other answers

    def _store_user_message(self, connection, request: TurnRequest, due: rate_limit.DueWrite | None,
                            limited: rate_limit.PendingTake | None) -> PendingTurn:
        """Store the message and its reply-to-be; with a chat rate limit, its
        step went out first in the same transaction, and a 429 or a 404 rolls
        both back, so a turn into an unknown conversation is not counted."""
        params = {"user_id": request.user_id, "content": request.message, "key": request.claim and request.claim.key,
                  "conversation_id": request.conversation_id, "title": request.message[:TITLE_PREVIEW_CHARS],
                  "limit": self.history_limit, "user_ui_id": request.user_ui_id or new_ui_id(),
                  "reply_ui_id": new_ui_id(), "stale_after": timedelta(seconds=self.stale_after_s),
                  **(due.limit.params if due is not None else {})}
        target = "new" if request.conversation_id is None else "existing_or_new" if request.create else "existing"
        stored, window = connection.cursor(), connection.cursor()
        stored.execute(store_user_message(target, due is not None, request.user_ui_id is not None), params)
        if request.conversation_id is not None:
            window.execute(LATEST_WINDOW, params)
        # A message the conversation may hold already is looked up in this transaction.
        sent = request.claim is None and limited is None and request.user_ui_id is None
        if sent:
            # Nothing to undo if the write is refused or the conversation unknown
            # (neither stores anything): send it all in one round trip.
            connection.commit()
        try:
            if limited is not None:
                limited.check()  # 429: the message goes with the rollback
            admitted, retry_after_s, duplicate, conversation_id, user_message_id, turn, reply_id = stored.fetchone()
            if not admitted:
                raise rate_limit.RateLimited(retry_after_s, rate_limit.WRITES.what)
            if duplicate:
                before = rewrites.sent_before(self, connection, request, new_ui_id)
                return Replay(*before) if isinstance(before[0], dict) else self._pending(request, *before)
            if user_message_id is None:
                raise ConversationNotFound()  # rolls back the claim and the rate-limit steps
        except ApiError:
            if due is not None and not sent:
                due.taken = False  # its step goes with the rollback: counted as the request ends
            raise
        if request.conversation_id is None:
            history = [HistoryMessage("user", request.message, [])]
        else:
            history = window_of(window.fetchall(), self.history_max_chars)
        return PendingTurn(request.user_id, conversation_id, user_message_id, turn, history,
                           request.claim and request.claim.key, reply_id, params["reply_ui_id"])

    def _pending(self, request: TurnRequest, user_message_id: int, turn: int, window_rows, reply_id: int,
                 reply_ui_id: str) -> PendingTurn:
        return PendingTurn(request.user_id, request.conversation_id, user_message_id, turn,
                           window_of(window_rows, self.history_max_chars), request.claim and request.claim.key,
                           reply_id, reply_ui_id)

    def _resume(self, connection, request: TurnRequest, outcome) -> PendingTurn:
        """Answer again the user message the key's first request stored: the reply
        it had, if any (interrupted, or left by a failure), is superseded."""
        params = {"conversation_id": outcome.conversation_id, "user_message_id": outcome.user_message_id,
                  "id": outcome.user_message_id, "up_to": outcome.user_message_id, "user_id": request.user_id,
                  "limit": self.history_limit, "reply_ui_id": new_ui_id(),
                  "stale_after": timedelta(seconds=self.stale_after_s)}
        turn, window, reply = connection.cursor(), connection.cursor(), connection.cursor()
        turn.execute(USER_MESSAGE_TURN, params)
        window.execute(HISTORY_WINDOW, params)
        connection.cursor().execute(SUPERSEDE_REPLY, params)
        reply.execute(ANSWER_AGAIN, params)
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
                           window_of(window.fetchall(), self.history_max_chars), request.claim.key,
                           reply.fetchone()[0], params["reply_ui_id"])

    # Step 2

    def ask(self, pending: PendingTurn, progress: ReplyProgress) -> Reply:
        """The assistant's reply to the window; any failure is an AssistantFailed."""
        return self.asking.reply(pending, progress)

    def ask_streaming(self, pending: PendingTurn, progress: ReplyProgress, emit) -> Reply:
        """Like `ask`, calling `emit(Delta(text))` for each piece of text as it comes."""
        return self.asking.stream(pending, progress, emit)

    # Steps 3 and 4: the reply's end (replies.py)

    def finish(self, pending: PendingTurn, reply: Reply) -> dict:
        return self.replies.finish(pending, reply)

    def finish_stopped(self, pending: PendingTurn, reply: Reply) -> dict:
        return self.replies.finish_stopped(pending, reply)

    def fail(self, pending: PendingTurn) -> None:
        self.replies.discard(pending)

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


