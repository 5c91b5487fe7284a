"""A streaming turn's producer on a thread of its own, and the events the
request relays from it."""
from __future__ import annotations

import contextvars
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

from ..errors import ApiError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delta:
    """A piece of the reply's text, as the assistant produced it."""

    text: str


@dataclass(frozen=True)
class Answered:
    """The reply is stored: the whole answer, as blocking mode returns it."""

    answer: dict


@dataclass(frozen=True)
class Failed:
    """The turn ended unanswered after its user message was stored."""

    error: ApiError


class TurnStream:
    """The events of a streaming turn: `Delta`s, then one `Answered` or `Failed`;
    `None` when nothing happened for `keepalive_s` (time for a keep-alive).

    `ask_streaming` and `finish` run on a thread of their own, started here,
    with the request's context variables (request id, for the logs). The
    caller only relays what it produces, so a client that goes away cannot
    cancel the turn: the reply is stored when the assistant finishes. `close`
    (also run when the caller's generator is closed) waits for that, so a
    graceful shutdown of the server lets the turn end first.
    """

    def __init__(self, turns, pending, keepalive_s: float):
        self.pending = pending
        self.keepalive_s = keepalive_s
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._produce, turns), name="chat-turn")
        self._thread.start()

    def _produce(self, turns) -> None:
        emit = self._events.put
        try:
            answer = turns.answer(self.pending, lambda pending, progress: turns.ask_streaming(pending, progress, emit))
        except ApiError as error:
            emit(Failed(error))
        except Exception:
            log.exception("streaming chat turn failed")
            emit(Failed(ApiError(500, "internal_error", "an unexpected error occurred")))
        else:
            emit(Answered(answer))

    def __iter__(self) -> Iterator[Delta | Answered | Failed | None]:
        while True:
            try:
                event = self._events.get(timeout=self.keepalive_s)
            except queue.Empty:
                yield None
                continue
            yield event
            if isinstance(event, (Answered, Failed)):
                return

    def close(self) -> None:
        self._thread.join()
