"""The default assistant: deterministic and offline.

Its reply names the turn number read from the database and how much history
it was shown, so a reply proves which history was read.
"""
from __future__ import annotations

from typing import Sequence

from . import HistoryMessage, Reply

ECHO_CHARS = 200


class BuiltinAssistant:
    def reply(self, history: Sequence[HistoryMessage], turn: int) -> Reply:
        message = history[-1].content if history else ""
        echoed = message if len(message) <= ECHO_CHARS else message[:ECHO_CHARS] + "..."
        return Reply(text=f"turn {turn}: you said \"{echoed}\" ({len(history)} messages in view)", tool_calls=[])
