"""The chat turn's shapes: its three native request bodies, the AI SDK's body,
its answer, the stop answer, and messages as the AI SDK's UIMessages. The
OpenAPI document (`api/openapi.py`) is generated from these and `schemas`."""
from __future__ import annotations

from marshmallow import EXCLUDE, Schema, fields, validate

from .config import DEFAULT_MESSAGE_MAX_CHARS
from .schemas import (
    REPLY_STATUSES,
    ModelReportSchema,
    StrictBoolean,
    StrictSchema,
    Text,
    ToolCallSchema,
    UtcDateTime,
)


class ChatRequestSchema(StrictSchema):
    """A new message (native body)."""

    message = Text(required=True, allow_blank=False)
    conversation_id = fields.UUID(load_default=None, allow_none=True)
    stream = StrictBoolean(load_default=False, metadata={
        "description": "answer as an AI SDK UI message stream (text/event-stream) instead of JSON"})
    regenerate = StrictBoolean(load_default=False, validate=validate.Equal(False),
                               metadata={"description": "false (see ChatRegenerate)"})

    def __init__(self, *args, max_chars: int = DEFAULT_MESSAGE_MAX_CHARS, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["message"].validators = [validate.Length(min=1, max=max_chars)]


class ChatEditSchema(ChatRequestSchema):
    """A user message replaced: it and every message after it are superseded."""

    conversation_id = fields.UUID(required=True)
    edit = fields.Integer(required=True, validate=validate.Range(min=1, max=2**63 - 1), metadata={
        "description": "the id of the conversation's current user message that `message` replaces"})


class ChatRegenerateSchema(StrictSchema):
    """The conversation's last user message answered again: its reply and what
    follows are superseded."""

    conversation_id = fields.UUID(required=True)
    regenerate = StrictBoolean(required=True, validate=validate.Equal(True))
    stream = StrictBoolean(load_default=False, metadata={
        "description": "answer as an AI SDK UI message stream (text/event-stream) instead of JSON"})


class UIChatRequestSchema(Schema):
    """The body the AI SDK's DefaultChatTransport sends when nothing customises it."""

    class Meta:
        unknown = EXCLUDE  # fields from the transport's `body` option are ignored

    id = fields.UUID(required=True, metadata={"description": "the chat id: the conversation's id"})
    messages = fields.List(fields.Dict(), required=True, validate=validate.Length(min=1),
                           metadata={"description": "UIMessages; only the last (the new one) is read"})
    trigger = fields.String(required=True, validate=validate.OneOf(("submit-message", "regenerate-message")))
    messageId = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1, max=255),
                              metadata={"description": "submit: the user message edited; regenerate: the reply "
                                                       "answered again"})


class ChatResponseSchema(ModelReportSchema):
    conversation_id = fields.UUID(required=True)
    response = fields.String(required=True)
    tool_calls = fields.List(fields.Nested(ToolCallSchema), required=True)
    user_message_id = fields.Integer(required=True)
    assistant_message_id = fields.Integer(required=True)
    status = fields.String(required=True, validate=validate.OneOf(("complete", "stopped")),
                           metadata={"description": "stopped: the conversation's stop route ended the reply early"})


class StopSchema(Schema):
    """POST .../conversations/{id}/stop."""

    stopped = fields.Boolean(required=True, metadata={"description": "whether a reply was being produced"})
    assistant_message_id = fields.Integer(required=True, allow_none=True,
                                          metadata={"description": "the reply stopped, if one was"})


class UIMessageMetadataSchema(ModelReportSchema):
    conversation_id = fields.UUID(required=True)
    message_id = fields.Integer(required=True, attribute="id")
    status = fields.String(required=True, attribute="current_status", validate=validate.OneOf(REPLY_STATUSES))
    created_at = UtcDateTime(required=True)


class UIMessageSchema(Schema):
    """A message as the AI SDK's `UIMessage`, for `useChat({ messages })`."""

    id = fields.String(required=True, attribute="ui_id")
    role = fields.String(required=True, validate=validate.OneOf(("user", "assistant")))
    parts = fields.Method("ui_parts", required=True, metadata={
        "type": "array", "items": {"type": "object"},
        "description": '{"type": "text", "text"}, then per tool call {"type": "tool-<name>", "toolCallId", '
                       '"state": "input-available", "input"}'})
    metadata = fields.Method("ui_metadata", required=True, metadata={"type": "object"})

    _metadata = UIMessageMetadataSchema()

    @staticmethod
    def ui_parts(message) -> list[dict]:
        return [{"type": "text", "text": message.content}] + [
            {"type": f"tool-{call['name']}", "toolCallId": call["id"], "state": "input-available",
             "input": call["arguments"]} for call in message.tool_calls]

    def ui_metadata(self, message) -> dict:
        return self._metadata.dump(message)


class UIMessagePageSchema(Schema):
    data = fields.List(fields.Nested(UIMessageSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)
