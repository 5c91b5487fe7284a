"""The Assistant interface and its backends.

An assistant turns the history window of a conversation (oldest first, the
new user message last) into a `Reply`. It runs with no database transaction
open. Failures are `AssistantError` (502) or `AssistantTimeout` (504).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence


@dataclass(frozen=True)
class HistoryMessage:
    role: str  # "user" | "assistant"
    content: str
    tool_calls: list = field(default_factory=list)


@dataclass(frozen=True)
class Reply:
    text: str
    tool_calls: list = field(default_factory=list)  # [{"id": str, "name": str, "arguments": <JSON value>}]


class AssistantError(Exception):
    """The assistant backend failed or answered something unusable (502)."""


class AssistantTimeout(AssistantError):
    """The assistant backend did not answer in time (504)."""


class Assistant(Protocol):
    def reply(self, history: Sequence[HistoryMessage], turn: int) -> Reply:
        """Answer the last message of `history`, the `turn`-th user message of its conversation."""


def build_assistant(settings) -> Assistant:
    """The backend named by ASSISTANT."""
    if settings.assistant == "openai":
        from .openai_compatible import OpenAICompatibleAssistant

        return OpenAICompatibleAssistant.from_settings(settings)
    from .builtin import BuiltinAssistant

    return BuiltinAssistant()
