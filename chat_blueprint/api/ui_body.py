"""The AI SDK's own request body (`DefaultChatTransport` with nothing
customised): `{id, messages, trigger, messageId?}`, read as the turn it asks for.

Only the last message is read (the history is the database's): its text parts
joined are the new message, its id the message's `ui_id`. Parts that are not
text are left out when they carry nothing the user wrote (step markers, data
and source parts, reasoning); a file is refused (422), since it would be lost
without a word.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..chat_schemas import UIChatRequestSchema
from ..errors import invalid_fields
from ..services.rewrites import Rewrite

UI_ID_MAX_CHARS = 255
REFUSED_PARTS = ("file",)


@dataclass(frozen=True)
class UITurn:
    conversation_id: object
    message: str | None
    user_ui_id: str | None
    rewrite: Rewrite | None


def is_ui_body(data: dict) -> bool:
    """The AI SDK's body has `messages` and `trigger`; ours has neither."""
    return "messages" in data or "trigger" in data


def ui_turn(data: dict, max_chars: int) -> UITurn:
    """The turn an AI SDK body asks for, or a 422 naming what is wrong."""
    body = UIChatRequestSchema().load(data)
    if body["trigger"] == "regenerate-message":
        return UITurn(body["id"], None, None, Rewrite("regenerate", ui_id=body["messageId"]))
    last = body["messages"][-1]
    if last.get("role") != "user":
        raise invalid_fields({"messages": ["The last message must be the user's new message."]})
    ui_id = last.get("id")
    if not isinstance(ui_id, str) or not 1 <= len(ui_id) <= UI_ID_MAX_CHARS or not ui_id.isprintable():
        raise invalid_fields({"messages": [f"The last message's id must be 1 to {UI_ID_MAX_CHARS} printable "
                                           "characters."]})
    text = _text(last.get("parts"), max_chars)
    if body["messageId"] is not None:
        return UITurn(body["id"], text, body["messageId"], Rewrite("edit", ui_id=body["messageId"]))
    return UITurn(body["id"], text, ui_id, None)


def _text(parts, max_chars: int) -> str:
    if not isinstance(parts, list) or not all(isinstance(part, dict) for part in parts):
        raise invalid_fields({"messages": ["The last message's parts must be a list of objects."]})
    refused = sorted({str(part.get("type")) for part in parts if part.get("type") in REFUSED_PARTS})
    if refused:
        raise invalid_fields({"messages": [f"Parts of type {', '.join(refused)} are not stored: send text."]})
    texts = [part.get("text") for part in parts if part.get("type") == "text"]
    if not all(isinstance(text, str) for text in texts):
        raise invalid_fields({"messages": ["A text part's text must be a string."]})
    text = "".join(texts)
    if not text.strip():
        raise invalid_fields({"messages": ["The last message has no text."]})
    if len(text) > max_chars:
        raise invalid_fields({"messages": [f"The message is longer than {max_chars} characters."]})
    if "\x00" in text:
        raise invalid_fields({"messages": ["The message holds a NUL character."]})
    return text
