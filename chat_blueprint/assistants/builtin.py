"""The default assistant: deterministic and offline.

Its reply names the turn number read from the database and how much history
it was shown, so a reply proves which history was read.
"""
from __future__ import annotations

import re
from typing import Iterator, Sequence

from . import HistoryMessage, Reply

ECHO_CHARS = 200
MODEL = "builtin"
WORDS = re.compile(r"\s*\S+|\s+$")


class BuiltinAssistant:
    def reply(self, history: Sequence[HistoryMessage], turn: int, *, user_id: str | None = None) -> Reply:
        message = history[-1].content if history else ""
        echoed = message if len(message) <= ECHO_CHARS else message[:ECHO_CHARS] + "..."
        in_view = f"{len(history)} message" if len(history) == 1 else f"{len(history)} messages"
        return Reply(text=f"turn {turn}: you said \"{echoed}\" ({in_view} in view)", tool_calls=[], model=MODEL,
                     finish_reason="stop", usage=None)

    def stream(self, history: Sequence[HistoryMessage], turn: int, *,
               user_id: str | None = None) -> Iterator[str | Reply]:
        """The same reply, word by word (each delta a word with the spaces before it)."""
        reply = self.reply(history, turn)
        yield from WORDS.findall(reply.text)
        yield reply
