"""What a Chat Completions server answers, checked and turned into a `Reply`:
a whole completion (`reply_from`) or the chunks of a streamed one
(`StreamedReply`). Nothing validates a body before this, so every field is
checked here, and anything unusable is an `AssistantError`.

A hostile server is expected too: numbers it reports that no column can hold
are dropped, and tool calls are bounded in number and in nesting, since every
reader of a stored reply (Python's JSON, psycopg's, the window sent back to
the model) recurses once per level."""
from __future__ import annotations

import json

from . import AssistantError, Reply

# Usage counts are stored as JSON and added to counters: beyond a bigint they are not counts.
BIGINT_MAX = 2**63 - 1
# Tool-call arguments nested deeper than this are refused: real ones nest a few levels.
MAX_ARGUMENT_DEPTH = 64
NESTED_TOO_DEEPLY = "the assistant backend sent tool-call arguments nested too deeply"
# Tool calls in one reply: each costs memory however few bytes it took to send.
MAX_TOOL_CALLS = 128


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
    if len(calls) > MAX_TOOL_CALLS:
        raise AssistantError("the assistant backend sent too many tool calls")
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
        if not _is_count(index):
            raise AssistantError("the assistant backend streamed a malformed tool call")
        if index >= MAX_TOOL_CALLS:
            raise AssistantError("the assistant backend sent too many tool calls")
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
    """`{"prompt_tokens", "completion_tokens", "total_tokens"}` when the backend reported all three as counts
    a bigint holds; anything else (10**400 is an int to Python's JSON) is no usage at all."""
    counts = {name: _field(usage, name) for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
    if usage is None or not all(_is_count(value) and value <= BIGINT_MAX for value in counts.values()):
        return None
    return counts


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _tool_call(call) -> dict:
    """`{"id", "name", "arguments"}` with the arguments parsed from their JSON text."""
    function = _field(call, "function")
    return _parsed_tool_call(_field(call, "id"), _field(function, "name"), _field(function, "arguments"))


def _parsed_tool_call(call_id, name, arguments) -> dict:
    if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, str)):
        raise AssistantError("the assistant backend answered with a malformed tool call")
    try:
        parsed = json.loads(arguments) if arguments.strip() else {}
    except RecursionError:  # deeper than the parser itself goes
        raise AssistantError(NESTED_TOO_DEEPLY) from None
    except ValueError:
        raise AssistantError("the assistant backend sent tool-call arguments that are not JSON") from None
    if _nested_deeper(parsed, MAX_ARGUMENT_DEPTH):
        raise AssistantError(NESTED_TOO_DEEPLY)
    return {"id": call_id, "name": name, "arguments": parsed}


def _nested_deeper(value, limit: int) -> bool:
    """Whether parsed JSON nests arrays and objects more than `limit` levels deep,
    found without recursion (which is what it guards against)."""
    pending = [(value, 1)]
    while pending:
        value, depth = pending.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            pending.extend((item, depth + 1) for item in (value.values() if isinstance(value, dict) else value))
    return False
