"""Steps 3 and 4 of a turn: the end of its reply (no Flask here).

A reply exists from the moment its turn began (`streaming`, see turn_sql.py);
`finish` stores it whole (`complete`), `finish_stopped` keeps what was
produced until a stop (`stopped`), and `discard` drops it when the turn fails,
releasing the turn's Idempotency-Key. Under a key, the answer is recorded in
the same commit as the reply, so a key never says `done` without it.
"""
from __future__ import annotations

import dataclasses
import logging

from psycopg.types.json import Jsonb
from sqlalchemy.engine import Engine

from ..assistants import Reply
from ..db import tenancy
from ..errors import DATABASE_ERRORS
from . import idempotency
from .conversations import ConversationNotFound
from .storable import storable
from .turn_sql import CURRENT_REPLY, DISCARD_REPLY, FINISH_REPLY, FINISH_STOPPED, message_chars

log = logging.getLogger(__name__)

# A reply this large is stored without a pipeline (see tenancy.transaction).
PIPELINED_REPLY_MAX_CHARS = 256 * 1024


class Replies:
    """The replies of turns on one engine."""

    def __init__(self, engine: Engine, stale_after_s: float):
        self.engine = engine
        self.stale_after_s = stale_after_s

    def finish(self, pending, reply: Reply) -> dict:
        """Store the reply whole and, under a key, the answer; return the answer.

        The reply is made storable first (see `storable`). A reply stopped
        meanwhile keeps the text produced (all of it, here); one superseded or
        gone (a retry took the key over) answers with what is stored now.
        """
        reply = storable(reply)
        answer = self._answer(pending, reply, "complete")
        if self._store(pending, reply, answer, FINISH_REPLY):
            return answer
        return self.finish_stopped(pending, reply)

    def finish_stopped(self, pending, reply: Reply) -> dict:
        """Keep the text produced until the stop: `status` stopped, `finish_reason` null."""
        reply = storable(dataclasses.replace(reply, finish_reason=None))
        answer = self._answer(pending, reply, "stopped")
        if self._store(pending, reply, answer, FINISH_STOPPED):
            return answer
        stored = self._current_reply(pending)
        if stored is None:
            raise ConversationNotFound()
        return stored

    @staticmethod
    def _answer(pending, reply: Reply, status: str) -> dict:
        return {"conversation_id": str(pending.conversation_id), "response": reply.text,
                "tool_calls": reply.tool_calls, "user_message_id": pending.user_message_id,
                "assistant_message_id": pending.reply_id, "model": reply.model,
                "finish_reason": reply.finish_reason, "usage": reply.usage, "status": status}

    def _store(self, pending, reply: Reply, answer: dict, statement: str) -> bool:
        """Run `statement` on the reply; False when it matched none. The reply is paid
        for: wait for a connection as long as its key stays the turn's, rather than
        the pool's timeout of a request that could be retried."""
        pipelined = message_chars(reply.text, reply.tool_calls) <= PIPELINED_REPLY_MAX_CHARS
        with tenancy.transaction(self.engine, pending.user_id, patience_s=self.stale_after_s,
                                 pipeline=pipelined) as connection:
            stored = connection.cursor()
            stored.execute(statement, {
                "user_id": pending.user_id, "conversation_id": pending.conversation_id, "reply_id": pending.reply_id,
                "content": reply.text, "tool_calls": Jsonb(reply.tool_calls), "key": pending.idempotency_key,
                "reply_ui_id": pending.reply_ui_id,
                "response": Jsonb({**answer, "ui_id": pending.reply_ui_id}), "model": reply.model,
                "finish_reason": reply.finish_reason, "usage": Jsonb(reply.usage) if reply.usage is not None else None,
            })
            connection.commit()
            return stored.fetchone() is not None

    def _current_reply(self, pending) -> dict | None:
        with tenancy.transaction(self.engine, pending.user_id, patience_s=self.stale_after_s) as connection:
            found = connection.cursor()
            found.execute(CURRENT_REPLY, {"conversation_id": pending.conversation_id,
                                          "user_message_id": pending.user_message_id, "user_id": pending.user_id})
            row = found.fetchone()
        if row is None:
            return None
        reply_id, content, tool_calls, model, finish_reason, usage, status = row
        return {"conversation_id": str(pending.conversation_id), "response": content, "tool_calls": tool_calls,
                "user_message_id": pending.user_message_id, "assistant_message_id": reply_id,
                "model": model, "finish_reason": finish_reason, "usage": usage, "status": status}

    def discard(self, pending) -> None:
        """Drop the reply and release the key, if the database allows: the user
        message stays, and a retry with the key may answer it at once (not only
        once it is stale). Left behind, the reply reads as interrupted once stale."""
        try:
            with tenancy.transaction(self.engine, pending.user_id) as connection:
                connection.cursor().execute(DISCARD_REPLY, {"conversation_id": pending.conversation_id,
                                                            "reply_id": pending.reply_id, "user_id": pending.user_id})
                if pending.idempotency_key is not None:
                    idempotency.fail(connection, pending.user_id, pending.idempotency_key)
        except DATABASE_ERRORS as exc:
            log.warning("could not discard a failed reply (%s); it reads as interrupted once stale",
                        type(exc).__name__)
