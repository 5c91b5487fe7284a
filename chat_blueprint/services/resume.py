"""Following a reply that another request produces, on any instance (no Flask here).

A reply is stored while it is produced (`streaming`, its content at most
CHAT_STREAM_FLUSH_S behind; see progress.py), so a reader anywhere can replay
it from the start and follow it live by reading the row again: `follow`
finds the conversation's reply being produced, and the `Following` it returns
yields the text produced so far, then each piece stored since, until the
reply ends. Polling costs the reader a small query per interval and costs
the producer nothing; it needs no session state, so it works behind
PgBouncer's transaction pooling, where LISTEN does not.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from sqlalchemy.engine import Engine

from ..db import tenancy
from ..db.models import CURRENT_STATUS_SQL

# How often a follower reads the reply again, at most (and at least as often
# as CHAT_STREAM_FLUSH_S: a piece is seen within that and one interval).
POLL_S = 0.5

STREAMING_REPLY = """
SELECT id, ui_id, reply_to, content FROM message
WHERE conversation_id = %(conversation_id)s AND user_id = %(user_id)s AND status = 'streaming'
  AND stale_at > now() AND superseded_at IS NULL
ORDER BY id DESC LIMIT 1
"""

REPLY_SINCE = f"""
SELECT {CURRENT_STATUS_SQL}, substr(content, %(offset)s + 1), tool_calls, model, finish_reason, usage,
       superseded_at IS NOT NULL
FROM message WHERE conversation_id = %(conversation_id)s AND id = %(reply_id)s AND user_id = %(user_id)s
"""


@dataclass(frozen=True)
class Piece:
    """Text of the reply not sent yet."""

    text: str


@dataclass(frozen=True)
class Ended:
    """The reply's end: `answer` (blocking mode's JSON, with its `status`) when it
    was stored whole or stopped, else `error` (interrupted, failed or replaced)."""

    answer: dict | None = None
    error: str | None = None


class Following:
    """A reply of another request, from its start to its end."""

    def __init__(self, engine: Engine, user_id: str, conversation_id: uuid.UUID, row, poll_s: float):
        self.engine = engine
        reply_id, self.ui_id, self.user_message_id, self.text = row
        self.conversation_id = conversation_id
        self.params = {"user_id": user_id, "conversation_id": conversation_id, "reply_id": reply_id}
        self.poll_s = poll_s

    def __iter__(self) -> Iterator[Piece | Ended | None]:
        """`Piece`s as they are stored, `None` at each poll that found nothing new, then `Ended`."""
        sent = len(self.text)
        if self.text:
            yield Piece(self.text)
        while True:
            time.sleep(self.poll_s)
            with tenancy.transaction(self.engine, self.params["user_id"]) as connection:
                row = connection.execute(REPLY_SINCE, {**self.params, "offset": sent}).fetchone()
            if row is None:
                yield Ended(error="the assistant failed; the reply was not kept")
                return
            status, more, tool_calls, model, finish_reason, usage, superseded = row
            if more:
                sent += len(more)
                yield Piece(more)
            else:
                yield None
            if superseded:
                yield Ended(error="the reply was replaced by a newer one")
                return
            if status == "interrupted":
                yield Ended(error="the reply was interrupted")
                return
            if status != "streaming":
                yield Ended(answer={
                    "conversation_id": str(self.conversation_id), "response": None, "tool_calls": tool_calls,
                    "user_message_id": self.user_message_id, "assistant_message_id": self.params["reply_id"],
                    "model": model, "finish_reason": finish_reason, "usage": usage, "status": status})
                return


def follow(engine: Engine, user_id: str, conversation_id: uuid.UUID, flush_s: float) -> Following | None:
    """The conversation's reply being produced, to follow; None when none is
    (also when the user has no such conversation)."""
    with tenancy.transaction(engine, user_id) as connection:
        row = connection.execute(STREAMING_REPLY, {"user_id": user_id, "conversation_id": conversation_id}).fetchone()
    return None if row is None else Following(engine, user_id, conversation_id, row, min(POLL_S, flush_s))
