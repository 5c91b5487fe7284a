"""A chat turn delivered as the AI SDK UI message stream protocol, v1.

Server-sent events, one `data: <JSON object>` line and a blank line each,
in the order the `ai` package's `useChat` / `readUIMessageStream` expect:

    start (messageId, messageMetadata: conversation_id, user_message_id)
    start-step, text-start, text-delta..., text-end,
    tool-input-available (one per tool call), finish-step,
    finish (finishReason, messageMetadata: ... assistant_message_id, model, usage)
    [DONE]

`finish` goes out only once the reply is stored; a failure after `start` is
an `error` event then `[DONE]`. While nothing happens, `: keep-alive`
comments keep proxies from closing the connection.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Iterable, Iterator

from flask import Response

from ..services.pending import PendingTurn, Replay
from ..services.resume import Ended, Following, Piece
from ..services.turn_relay import Answered, Delta, Failed, TurnStream

HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "x-vercel-ai-ui-message-stream": "v1",
}
MIMETYPE = "text/event-stream"
KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
TEXT_ID = "text-1"

# OpenAI's finish reasons as the AI SDK names them; anything else (or none) is "other".
FINISH_REASONS = {"stop": "stop", "length": "length", "tool_calls": "tool-calls", "function_call": "tool-calls",
                  "content_filter": "content-filter"}


def event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class UIMessage:
    """The events of one assistant message, from its ids."""

    def __init__(self, message_id: str, conversation_id: str, user_message_id: int):
        self.message_id = message_id
        self.metadata = {"conversation_id": conversation_id, "user_message_id": user_message_id}

    def start(self) -> bytes:
        return b"".join([
            event({"type": "start", "messageId": self.message_id, "messageMetadata": self.metadata}),
            event({"type": "start-step"}),
            event({"type": "text-start", "id": TEXT_ID}),
        ])

    @staticmethod
    def delta(text: str) -> bytes:
        return event({"type": "text-delta", "id": TEXT_ID, "delta": text})

    def finish(self, answer: dict, deltas_sent: bool) -> bytes:
        """The end of the message, from the stored answer (blocking mode's JSON):
        `abort` for a reply that was stopped."""
        if answer["status"] == "stopped":
            return self.abort()
        parts = [] if deltas_sent else [self.delta(answer["response"])]
        parts.append(event({"type": "text-end", "id": TEXT_ID}))
        for call in answer["tool_calls"]:
            parts.append(event({"type": "tool-input-available", "toolCallId": call["id"], "toolName": call["name"],
                                "input": call["arguments"]}))
        parts.append(event({"type": "finish-step"}))
        parts.append(event({
            "type": "finish",
            "finishReason": FINISH_REASONS.get(answer["finish_reason"], "other"),
            "messageMetadata": {**self.metadata, "assistant_message_id": answer["assistant_message_id"],
                                "model": answer["model"], "usage": answer["usage"]},
        }))
        parts.append(DONE)
        return b"".join(parts)

    @staticmethod
    def error(text: str) -> bytes:
        return event({"type": "error", "errorText": text}) + DONE

    @staticmethod
    def abort() -> bytes:
        return event({"type": "abort", "reason": "stopped"}) + DONE


def replay_events(replay: Replay) -> Iterator[bytes]:
    """A finished turn replayed as a stream: its whole reply as one delta."""
    answer = replay.response
    message = UIMessage(replay.ui_id or f"msg-{uuid.uuid4().hex}", answer["conversation_id"],
                        answer["user_message_id"])
    yield message.start()
    if answer["status"] == "stopped" and answer["response"]:
        yield message.delta(answer["response"])
    yield message.finish(answer, deltas_sent=False)


def turn_events(turn: TurnStream) -> Iterator[bytes]:
    """Relay a running turn. Closing this generator (the client went away) does
    not stop the turn; it waits for the turn to be stored."""
    pending: PendingTurn = turn.pending
    message = UIMessage(pending.reply_ui_id, str(pending.conversation_id), pending.user_message_id)
    try:
        yield message.start()
        deltas_sent = False
        for item in turn:
            if item is None:
                yield KEEPALIVE
            elif isinstance(item, Delta):
                deltas_sent = True
                yield message.delta(item.text)
            elif isinstance(item, Answered):
                yield message.finish(item.answer, deltas_sent)
            elif isinstance(item, Failed):
                yield message.error(item.error.message)
    finally:
        turn.close()


def resumed_events(following: Following, keepalive_s: float) -> Iterator[bytes]:
    """Another request's reply, from its start: the text stored so far, then
    each piece as it is stored, then its end (`finish`, `abort` or `error`)."""
    message = UIMessage(following.ui_id, str(following.conversation_id), following.user_message_id)
    yield message.start()
    quiet_since = time.monotonic()
    for item in following:
        if isinstance(item, Piece):
            quiet_since = time.monotonic()
            yield message.delta(item.text)
        elif isinstance(item, Ended):
            yield message.finish(item.answer, deltas_sent=True) if item.answer else message.error(item.error)
        elif time.monotonic() - quiet_since >= keepalive_s:
            quiet_since = time.monotonic()
            yield KEEPALIVE


def response(events: Iterable[bytes]) -> Response:
    return Response(events, content_type=MIMETYPE, headers=HEADERS, direct_passthrough=True)
