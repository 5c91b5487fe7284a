"""What a turn carries from one step to the next: the client's request, the
stored message waiting for its reply, a replayed answer, and the window the
assistant reads (no Flask here)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from ..assistants import HistoryMessage
from .idempotency import IdempotencyClaim
from .rewrites import Rewrite
from .turn_sql import message_chars

# Answers stored under a key before replies carried the model's report, or a status.
ANSWER_DEFAULTS = {"model": None, "finish_reason": None, "usage": None, "status": "complete"}
# The keys of an answer in the order `Replies._answer` gives them: a replay reads the answer back from jsonb,
# which keeps keys in its own order (shortest first), and puts them back in this one.
ANSWER_KEYS = ("conversation_id", "response", "tool_calls", "user_message_id", "assistant_message_id", "model",
               "finish_reason", "usage", "status")


@dataclass(frozen=True)
class TurnRequest:
    """What a client asked for: a message for a conversation (None: a new one);
    `create`: an unknown conversation id starts a conversation with that id;
    `user_ui_id`: the client's id for the message (sent twice, it replays the turn);
    `rewrite`: regenerate a reply, or edit a message (rewrites.py)."""

    user_id: str
    message: str | None
    conversation_id: uuid.UUID | None
    claim: IdempotencyClaim | None
    user_ui_id: str | None = None
    create: bool = False
    rewrite: Rewrite | None = None


@dataclass(frozen=True)
class PendingTurn:
    """A stored user message, and its reply being produced (`streaming`)."""

    user_id: str
    conversation_id: uuid.UUID
    user_message_id: int
    turn: int
    history: list[HistoryMessage]
    idempotency_key: str | None
    reply_id: int
    reply_ui_id: str


def new_ui_id() -> str:
    """The id a chat UI keys a message by, for a message whose client gave none."""
    return f"msg-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Replay:
    """The stored answer of an earlier request with the same Idempotency-Key,
    and the id its reply's stream started with (None: stored before it had one)."""

    response: dict
    ui_id: str | None = None

    @classmethod
    def of(cls, stored: dict) -> Replay:
        stored = {**ANSWER_DEFAULTS, **stored}
        ui_id = stored.pop("ui_id", None)
        return cls({key: stored[key] for key in ANSWER_KEYS}, ui_id)


def window_of(rows, max_chars: int) -> list[HistoryMessage]:
    """The window, oldest first, from its rows newest first (the user message being
    answered is the first): that message always, whole; then older ones for as long
    as the window holds at most `max_chars` characters, so it ends at the first one
    that does not fit. A sum over rows the query returned anyway, no extra query."""
    window, size = [], 0
    for role, content, tool_calls in rows:
        size += message_chars(content, tool_calls)
        if window and size > max_chars:
            break
        window.append(HistoryMessage(role, content, tool_calls))
    window.reverse()
    return window
