"""Step 2 of a turn: ask the assistant backend, with no transaction open, and
map whatever goes wrong to the 502 or 504 the client gets (no Flask here)."""
from __future__ import annotations

import logging
import time

from ..assistants import Assistant, AssistantError, AssistantTimeout, Reply, stream_reply
from ..errors import ApiError
from ..runtime.metrics import observe_assistant, observe_tokens
from .progress import ReplyProgress, Stopped
from .turn_relay import Delta

log = logging.getLogger(__name__)


class AssistantFailed(ApiError):
    """The assistant let the turn down after its user message was stored (502 or 504)."""

    def __init__(self, status: int, code: str, message: str, pending, headers=None):
        super().__init__(status, code, message, headers, conversation_id=str(pending.conversation_id),
                         user_message_id=pending.user_message_id)


class Asking:
    """One assistant backend, asked for replies to pending turns, timed and counted."""

    def __init__(self, assistant: Assistant, backend: str):
        self.assistant = assistant
        self.backend = backend

    def reply(self, pending, progress: ReplyProgress) -> Reply:
        """The assistant's reply to the window; any failure is an AssistantFailed,
        and a stop seen meanwhile (`progress`) is `Stopped`."""
        started = time.perf_counter()
        try:
            with progress.scope.interruptible():  # a stop ends the wait for the whole answer at once
                reply = self.assistant.reply(pending.history, pending.turn, user_id=pending.user_id)
        except Exception as failure:  # noqa: BLE001 - any assistant failure is the upstream's, not the client's
            raise self._failed(pending, progress, failure, started) from None
        self._observe("ok", started, reply)
        return reply

    def stream(self, pending, progress: ReplyProgress, emit) -> Reply:
        """Like `reply`, calling `emit(Delta(text))` for each piece of text as it
        comes, once `progress` has it (and stored it when a flush was due).

        Each piece goes out made storable (NUL and lone surrogates as U+FFFD), as
        `finish` will store the whole reply, so the pieces add up to what is stored
        and none can break the event it is sent in."""
        started = time.perf_counter()
        try:
            for item in stream_reply(self.assistant, pending.history, pending.turn, user_id=pending.user_id):
                if progress.stopped:
                    raise Stopped()
                if isinstance(item, Reply):
                    reply = item
                    break
                if item:
                    emit(Delta(progress.add(item)))
            else:
                raise AssistantError("the assistant's stream ended without a reply")
        except Exception as failure:  # noqa: BLE001 - as in `reply`
            raise self._failed(pending, progress, failure, started) from None
        self._observe("ok", started, reply)
        return reply

    def _failed(self, pending, progress: ReplyProgress, failure: Exception, started: float) -> Exception:
        """What a failure of the call means: a stop (the call was ended on purpose), or an AssistantFailed."""
        if progress.stopped:
            self._observe("stopped", started)
            return Stopped()
        self._observe("timeout" if isinstance(failure, AssistantTimeout) else "error", started)
        return self.assistant_failed(pending, failure)

    def _observe(self, outcome: str, started: float, reply: Reply | None = None) -> None:
        observe_assistant(self.backend, outcome, time.perf_counter() - started)
        if reply is not None and reply.usage is not None:
            # By the model the server reported, else the one asked for (ASSISTANT_MODEL).
            observe_tokens(self.backend, reply.model or getattr(self.assistant, "model", None), reply.usage)

    def assistant_failed(self, pending, failure: Exception) -> AssistantFailed:
        """The client's 502 or 504, and the operator's log line: what went wrong (an AssistantError's
        message is composed by the backend, never the upstream's text) and, for a backend that says
        where it calls (`endpoint`, host and port only), which server let the turn down."""
        if isinstance(failure, AssistantTimeout):
            status, code, message = 504, "assistant_timeout", "the assistant did not answer in time"
        elif isinstance(failure, AssistantError):
            status, code, message = 502, "assistant_failed", f"the assistant failed: {failure}"
        else:
            log.error("assistant raised an unexpected error", exc_info=failure)
            status, code, message = 502, "assistant_failed", "the assistant failed"
        what = f"{type(failure).__name__}: {failure}" if isinstance(failure, AssistantError) else type(failure).__name__
        endpoint = getattr(self.assistant, "endpoint", None)
        log.warning("chat turn unanswered: %s (%s)%s", code, what,
                    f"; assistant backend at {endpoint}" if endpoint else "")
        retry_after_s = getattr(failure, "retry_after_s", None)
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
        return AssistantFailed(status, code, message, pending, headers)
