"""What a Chat Completions server answers, checked and turned into a `Reply`:
a whole completion (`reply_from`) or the chunks of a streamed one
(`StreamedReply`). Nothing validates a body before this, so every field is
checked here, and anything unusable is an `AssistantError`."""
from __future__ import annotations

import json

from . import AssistantError, Reply


def reply_from(completion) -> Reply:
    """The first choice of a completion (parsed JSON) as a `Reply`; anything unusable
    is an `AssistantError`.

    Nothing validates the body before this, so its shape is checked here. A
    reply with tool calls and no text is valid; one with neither is not,
    since there is nothing to show or store (and a retry may do better).
    """
    choices = _field(completion, "choices")
    if not isinstance(choices, list) or not choices:
        raise AssistantError("the assistant backend answered without a choice")
    message = _field(choices[0], "message")
    content = _field(message, "content")
    if content is None:
        content = _field(message, "refusal")
    if not isinstance(message, dict) or not isinstance(content, (str, type(None))):
        raise AssistantError("the assistant backend answered with a malformed message")
    calls = _field(message, "tool_calls") or []
    if not isinstance(calls, list):
        raise AssistantError("the assistant backend answered with a malformed tool call")
    calls = [_tool_call(call) for call in calls]
    if not content and not calls:
        raise AssistantError("the assistant backend answered with an empty reply")
    return Reply(text=content or "", tool_calls=calls, model=_model(completion),
                 finish_reason=_finish_reason(_field(choices[0], "finish_reason")),
                 usage=_usage(_field(completion, "usage")))


def _field(value, name):
    """`value[name]` of a parsed JSON object; None when absent or not an object."""
    return value.get(name) if isinstance(value, dict) else None


class StreamedReply:
    """The pieces of a streamed completion, assembled into a Reply."""

    def __init__(self):
        self.text: list[str] = []
        self.calls: dict[int, dict] = {}
        self.model = None
        self.finish_reason = None
        self.usage = None

    def add(self, chunk) -> str:
        """Take one chunk; return its text delta ('' if none)."""
        self.model = _model(chunk) or self.model
        self.usage = _usage(_field(chunk, "usage")) or self.usage
        choices = _field(chunk, "choices") or []
        if not isinstance(choices, list):
            raise AssistantError("the assistant backend streamed a malformed chunk")
        delta_text = ""
        for choice in choices:
            if (_field(choice, "index") or 0) != 0:
                continue
            delta = _field(choice, "delta")
            piece = _field(delta, "content") or _field(delta, "refusal")
            if piece is not None:
                if not isinstance(piece, str):
                    raise AssistantError("the assistant backend streamed a malformed delta")
                delta_text += piece
            for fragment in _field(delta, "tool_calls") or []:
                self._add_tool_call(fragment)
            self.finish_reason = _finish_reason(_field(choice, "finish_reason")) or self.finish_reason
        if delta_text:
            self.text.append(delta_text)
        return delta_text

    def _add_tool_call(self, fragment) -> None:
        index = _field(fragment, "index")
        if not isinstance(index, int):
            raise AssistantError("the assistant backend streamed a malformed tool call")
        call = self.calls.setdefault(index, {"id": None, "name": "", "arguments": ""})
        function = _field(fragment, "function")
        call["id"] = _field(fragment, "id") or call["id"]
        name, arguments = _field(function, "name"), _field(function, "arguments")
        if not isinstance(name or "", str) or not isinstance(arguments or "", str):
            raise AssistantError("the assistant backend streamed a malformed tool call")
        call["name"] += name or ""
        call["arguments"] += arguments or ""

    def reply(self) -> Reply:
        text = "".join(self.text)
        calls = [_parsed_tool_call(call["id"], call["name"] or None, call["arguments"])
                 for _, call in sorted(self.calls.items())]
        if not text and not calls:
            raise AssistantError("the assistant backend answered with an empty reply")
        return Reply(text=text, tool_calls=calls, model=self.model, finish_reason=self.finish_reason,
                     usage=self.usage)


def _model(completion) -> str | None:
    model = _field(completion, "model")
    return model[:200] if isinstance(model, str) and model else None


def _finish_reason(reason) -> str | None:
    return reason[:64] if isinstance(reason, str) and reason else None


def _usage(usage) -> dict | None:
    """`{"prompt_tokens", "completion_tokens", "total_tokens"}` when the backend reported all three as counts."""
    counts = {name: _field(usage, name) for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
    if usage is None or not all(isinstance(value, int) and not isinstance(value, bool) and value >= 0
                                for value in counts.values()):
        return None
    return counts


def _tool_call(call) -> dict:
    """`{"id", "name", "arguments"}` with the arguments parsed from their JSON text."""
    function = _field(call, "function")
    return _parsed_tool_call(_field(call, "id"), _field(function, "name"), _field(function, "arguments"))


def _parsed_tool_call(call_id, name, arguments) -> dict:
    if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, str)):
        raise AssistantError("the assistant backend answered with a malformed tool call")
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        raise AssistantError("the assistant backend sent tool-call arguments that are not JSON") from None
    return {"id": call_id, "name": name, "arguments": parsed}
