"""Marshmallow schemas: the only place request and response shapes live.

The OpenAPI document (`openapi.py`) is generated from these classes.
"""
from __future__ import annotations

from datetime import datetime, timezone

from marshmallow import EXCLUDE, Schema, ValidationError, fields, missing, validate, validates_schema
from marshmallow.utils import get_value

from .db.models import FEEDBACK_COMMENT_MAX_CHARS, RATINGS

REPLY_STATUSES = ("streaming", "complete", "stopped", "interrupted")

TASK_STATUSES = ("all", "pending", "completed")
ORDERS = ("asc", "desc")
TITLE_PREVIEW_CHARS = 80
TASK_PAGE_MAX = 1000
SEARCH_MAX_CHARS = 200

# What `str.strip()` removes (every such character is below U+3001), and the
# JSON Schema patterns that say in the OpenAPI document what `Text` accepts.
_BLANK = "".join(c for c in map(chr, range(0x3001)) if c.isspace())
_NOT_NUL = "[^\\u0000]"
_NOT_NUL_OR_BLANK = "[^\\u0000" + "".join(f"\\u{ord(c):04x}" for c in _BLANK) + "]"
NO_NUL_PATTERN = f"^{_NOT_NUL}*$"
NOT_BLANK_PATTERN = f"^{_NOT_NUL}*{_NOT_NUL_OR_BLANK}{_NOT_NUL}*$"


class Text(fields.String):
    """A string PostgreSQL can store: no NUL, no lone surrogate; optionally not blank."""

    def __init__(self, *args, allow_blank=True, **kwargs):
        pattern = NO_NUL_PATTERN if allow_blank else NOT_BLANK_PATTERN
        kwargs["metadata"] = {"pattern": pattern, **kwargs.get("metadata", {})}
        super().__init__(*args, **kwargs)
        self.allow_blank = allow_blank

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in value:
            raise ValidationError("Must not contain NUL characters.")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("Must be valid Unicode text (no lone surrogates).") from None
        if not self.allow_blank and not value.strip():
            raise ValidationError("Must not be blank.")
        return value


def utc_iso(value: datetime) -> str:
    """ISO 8601 in UTC with a `Z`, whatever the session time zone was."""
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class UtcDateTime(fields.DateTime):
    """ISO 8601 in UTC with a `Z` (utc_iso)."""

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else utc_iso(value)


class StrictSchema(Schema):
    """Bodies reject unknown fields (422)."""


class QuerySchema(Schema):
    """Query strings ignore parameters they do not know."""

    class Meta:
        unknown = EXCLUDE


class ErrorDetailSchema(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)
    field_errors = fields.Dict(data_key="fields", metadata={"description": "per-field messages of a validation error"})
    fields_omitted = fields.Integer(metadata={
        "description": "on 422: how many more failing fields are not listed in `fields` (it is kept under 32 KiB)"})
    conversation_id = fields.UUID(
        metadata={"description": "on 502/504 from /chat: the conversation holding the stored message"})
    user_message_id = fields.Integer(metadata={"description": "on 502/504 from /chat: the stored user message"})
    retry_after = fields.Integer(metadata={"description": "on 429 from /chat: seconds until a turn is allowed again"})


class ErrorSchema(Schema):
    error = fields.Nested(ErrorDetailSchema, required=True)


# Tasks


class TaskSchema(Schema):
    id = fields.Integer(required=True)
    user_id = fields.String(required=True)
    title = fields.String(required=True)
    description = fields.String(required=True)
    completed = fields.Boolean(required=True)
    created_at = UtcDateTime(required=True)
    updated_at = UtcDateTime(required=True)


def task_fields(task) -> dict:
    """A task as TaskSchema dumps it, without marshmallow's work per field: a
    page of 1,000 tasks took 10 ms of CPU through `TaskSchema(many=True).dump`
    and takes 2 ms so. tests/test_tasks.py holds the two equal."""
    return {"id": task.id, "user_id": task.user_id, "title": task.title, "description": task.description,
            "completed": task.completed, "created_at": utc_iso(task.created_at), "updated_at": utc_iso(task.updated_at)}


class TaskCreateSchema(StrictSchema):
    title = Text(required=True, allow_blank=False, validate=validate.Length(min=1, max=200))
    description = Text(load_default="", allow_none=True, validate=validate.Length(max=1000))


class TaskUpdateSchema(StrictSchema):
    openapi_extra = {"minProperties": 1}  # `at_least_one`, as the OpenAPI document states it

    title = Text(allow_blank=False, validate=validate.Length(min=1, max=200))
    description = Text(allow_none=True, validate=validate.Length(max=1000))

    @validates_schema
    def at_least_one(self, data, **kwargs):
        if not data:
            raise ValidationError("Give title, description, or both.", "_schema")


# Chat and conversations


class StrictBoolean(fields.Boolean):
    """`true` or `false` only: not 1, "yes" or "true" as a string."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise self.make_error("invalid")
        return value


class ToolCallSchema(Schema):
    id = fields.String(required=True)
    name = fields.String(required=True)
    arguments = fields.Raw(required=True, metadata={"description": "arguments parsed from JSON"})


class UsageSchema(Schema):
    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)


class ModelReportSchema(Schema):
    """What the assistant backend reported with a reply (null on user messages)."""

    model = fields.String(required=True, allow_none=True, metadata={"description": "the model's name"})
    finish_reason = fields.String(required=True, allow_none=True, metadata={
        "description": "why the model stopped: stop, length (cut off: not complete), tool_calls, content_filter"})
    usage = fields.Nested(UsageSchema, required=True, allow_none=True)


class ConversationSchema(Schema):
    id = fields.UUID(required=True)
    title = fields.String(required=True)
    created_at = UtcDateTime(required=True)
    updated_at = UtcDateTime(required=True)
    message_count = fields.Integer(required=True)
    archived = fields.Boolean(required=True, metadata={"description": "left out of the list unless archived=true"})
    pinned = fields.Boolean(required=True, metadata={"description": "listed before the others"})
    snippet = fields.String(metadata={
        "description": "in search results only: up to 200 characters of a matching message, or the title"})


class ConversationPatchSchema(StrictSchema):
    openapi_extra = {"minProperties": 1}  # `at_least_one`, as the OpenAPI document states it

    title = Text(allow_blank=False, validate=validate.Length(min=1, max=200))
    archived = StrictBoolean()
    pinned = StrictBoolean()

    @validates_schema
    def at_least_one(self, data, **kwargs):
        if not data:
            raise ValidationError("Give title, archived or pinned (any of them).", "_schema")


class ConversationPageSchema(Schema):
    data = fields.List(fields.Nested(ConversationSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


class FeedbackSchema(Schema):
    rating = fields.String(required=True, allow_none=True, validate=validate.OneOf(RATINGS))
    comment = fields.String(required=True, allow_none=True)
    updated_at = UtcDateTime(required=True)


class Feedback(fields.Nested):
    """A message's feedback columns as one object, or null when it has none,
    read alike from an ORM row and from a raw SQL row (the export's)."""

    def get_value(self, obj, attr, accessor=None, default=missing):
        updated_at = get_value(obj, "feedback_updated_at")
        if updated_at is None or updated_at is missing:
            return None
        return {"rating": get_value(obj, "feedback_rating"), "comment": get_value(obj, "feedback_comment"),
                "updated_at": updated_at}


class FeedbackRequestSchema(StrictSchema):
    rating = fields.String(required=True, allow_none=True, validate=validate.OneOf(RATINGS),
                           metadata={"description": "null clears the rating (and, without a comment, the feedback)"})
    comment = Text(load_default=None, allow_none=True, validate=validate.Length(max=FEEDBACK_COMMENT_MAX_CHARS),
                   metadata={"description": "replaces the previous comment; absent, null or empty: none"})


class MessageSchema(ModelReportSchema):
    id = fields.Integer(required=True)
    ui_id = fields.String(required=True, metadata={"description": "the id a chat UI keys the message by"})
    role = fields.String(required=True, validate=validate.OneOf(("user", "assistant")))
    status = fields.String(required=True, attribute="current_status", validate=validate.OneOf(REPLY_STATUSES),
                           metadata={"description": "a reply: streaming (content: the text so far), complete, "
                                                    "stopped or interrupted; a user message: complete"})
    content = fields.String(required=True)
    tool_calls = fields.List(fields.Nested(ToolCallSchema), required=True)
    reply_to = fields.Integer(required=True, allow_none=True)
    created_at = UtcDateTime(required=True)
    superseded_at = UtcDateTime(required=True, allow_none=True)
    feedback = Feedback(FeedbackSchema, required=True, allow_none=True,
                        metadata={"description": "the user's rating of an assistant message; null when none"})


class MessagePageSchema(Schema):
    data = fields.List(fields.Nested(MessageSchema), required=True)
    next_cursor = fields.String(required=True, allow_none=True)


def _cursor(description="the next_cursor of the previous page"):
    # A callable default keeps `null` out of the document: a query string cannot carry one.
    return Text(load_default=lambda: None, allow_none=False, validate=validate.Length(max=200),
                metadata={"pattern": "^[A-Za-z0-9_-]+$", "description": description})


class TaskListQuerySchema(QuerySchema):
    status = fields.String(load_default="all", validate=validate.OneOf(TASK_STATUSES))
    limit = fields.Integer(load_default=TASK_PAGE_MAX, validate=validate.Range(min=1, max=TASK_PAGE_MAX))
    cursor = _cursor(description="the cursor of the previous page's `Link: <...>; rel=\"next\"` URL")


class QueryBoolean(fields.Boolean):
    """`true` or `false` in a query string, nothing else."""

    def __init__(self, **kwargs):
        super().__init__(truthy={"true"}, falsy={"false"}, **kwargs)


class ConversationListQuerySchema(QuerySchema):
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))
    cursor = _cursor()
    archived = QueryBoolean(load_default=False, metadata={
        "description": "true: only archived conversations; false (default): only the others"})
    q = Text(load_default=lambda: None, allow_none=False, validate=validate.Length(min=1, max=SEARCH_MAX_CHARS),
             metadata={"description": "only conversations whose title or messages hold every word (whole words, "
                                      "any case; punctuation and operators are not syntax), each with a snippet"})


class MessagePageQuerySchema(QuerySchema):
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=100))
    cursor = _cursor()
    order = fields.String(load_default="asc", validate=validate.OneOf(ORDERS))
    include = fields.String(load_default=None, validate=validate.OneOf(("superseded",)),
                            metadata={"description": "superseded: also the messages a newer one replaced"})
    format = fields.String(load_default=None, validate=validate.OneOf(("ui",)),
                           metadata={"description": "ui: the AI SDK's UIMessages, for useChat({ messages })"})


# The user's data


class ExportedConversationSchema(ConversationSchema):
    messages = fields.List(fields.Nested(MessageSchema), required=True,
                           metadata={"description": "every message of the conversation, oldest first"})


class ExportSchema(Schema):
    """GET /api/{user_id}/export: every row of the user, in one snapshot."""

    user_id = fields.String(required=True)
    exported_at = UtcDateTime(required=True, metadata={"description": "the moment of the snapshot the export reads"})
    tasks = fields.List(fields.Nested(TaskSchema), required=True, metadata={"description": "newest first"})
    conversations = fields.List(fields.Nested(ExportedConversationSchema), required=True,
                                metadata={"description": "most recently updated first"})
