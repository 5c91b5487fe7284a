"""The Assistant interface and its backends.

An assistant turns the history window of a conversation (oldest first, the
new user message last) into a `Reply`, in one of two forms:

- `reply(history, turn, user_id=...)`: the whole reply at once (blocking turns);
- `stream(history, turn, user_id=...)`: the reply's text in pieces (`str`
  deltas) as it is produced, then the final `Reply` as the last item
  (streaming turns). The deltas, concatenated, are the reply's `text`.

`user_id` is the authenticated user the turn is for; a backend may derive an
identifier for the model server from it (never send it as it is).

It runs with no database transaction open. Failures are `AssistantError`
(502) or `AssistantTimeout` (504), raised by either form at any point.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence


@dataclass(frozen=True)
class HistoryMessage:
    role: str  # "user" | "assistant"
    content: str
    tool_calls: list = field(default_factory=list)


@dataclass(frozen=True)
class Reply:
    text: str
    tool_calls: list = field(default_factory=list)  # [{"id": str, "name": str, "arguments": <JSON value>}]
    model: str | None = None  # what the backend reported
    finish_reason: str | None = None  # stop, length, tool_calls, content_filter, or None
    usage: dict | None = None  # {"prompt_tokens", "completion_tokens", "total_tokens"}


class AssistantError(Exception):
    """The assistant backend failed or answered something unusable (502).

    `retry_after_s`: when the backend said how long to wait (a 429 or 503 with
    `Retry-After`), that many seconds, passed on to the client."""

    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AssistantTimeout(AssistantError):
    """The assistant backend did not answer in time (504)."""


class Assistant(Protocol):
    def reply(self, history: Sequence[HistoryMessage], turn: int, *, user_id: str | None = None) -> Reply:
        """Answer the last message of `history`, the `turn`-th user message of its conversation."""

    def stream(self, history: Sequence[HistoryMessage], turn: int, *,
               user_id: str | None = None) -> Iterator[str | Reply]:
        """The same answer as text deltas while it is produced, then the `Reply`."""


def stream_reply(assistant, history: Sequence[HistoryMessage], turn: int, *,
                 user_id: str | None = None) -> Iterator[str | Reply]:
    """`assistant.stream(...)`, or for a backend with only `reply`, its whole text as one delta."""
    stream = getattr(assistant, "stream", None)
    if stream is not None:
        yield from stream(history, turn, user_id=user_id)
        return
    reply = assistant.reply(history, turn, user_id=user_id)
    if reply.text:
        yield reply.text
    yield reply


def build_assistant(settings) -> Assistant:
    """The backend named by ASSISTANT."""
    if settings.assistant == "openai":
        from .openai_compatible import OpenAICompatibleAssistant

        return OpenAICompatibleAssistant.from_settings(settings)
    from .builtin import BuiltinAssistant

    return BuiltinAssistant()
