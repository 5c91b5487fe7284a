"""The OpenAPI 3 document, generated from the marshmallow schemas.

Each operation lists every status it can answer, with the headers that come
with it; the fuzzing tests hold the running app to exactly this document.
"""
from __future__ import annotations

from functools import lru_cache

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import current_app, has_app_context

from .. import chat_schemas, schemas
from ..config import DEFAULT_MESSAGE_MAX_CHARS
from ..db.models import BIGINT_MAX


def _header(description: str) -> dict:
    return {"description": description, "required": True, "schema": {"type": "string"}}


RETRY_AFTER = {"Retry-After": _header("seconds to wait before retrying")}
NEXT_PAGE = {"Link": {"description": 'present while more tasks follow: `<next page URL>; rel="next"`',
                      "required": False, "schema": {"type": "string", "pattern": '^<[^>]+>; rel="next"$'}}}
ERRORS = {
    "400": ("the body is not valid JSON, or not a JSON object, or its chunked framing is malformed", {}),
    "401": ("missing, malformed, badly signed or expired bearer token",
            {"WWW-Authenticate": _header("`Bearer`")}),
    "403": ("the token belongs to another user than the one in the path", {}),
    "404": ("no such resource for this user (another user's resource is indistinguishable from a missing one)", {}),
    "409": ("the first request with this Idempotency-Key is still running", RETRY_AFTER),
    "413": ("the body is over 1 MiB (by Content-Length or chunked; never cut)", {}),
    "415": ("the body is not application/json", {}),
    "422": ("a field fails validation; error.fields says which (at most 32 KiB of them; error.fields_omitted "
            "counts the rest)", {}),
    "429": ("over a per-user rate limit: WRITE_RATE_LIMIT (600/minute by default) on every write, and on chat "
            "turns CHAT_RATE_LIMIT too (off unless set)", RETRY_AFTER),
    "502": ("the assistant failed; the user message is stored, error.conversation_id names its conversation. When "
            "the model server answered 429 or 503 with a Retry-After, it is passed on (at most 60 s)",
            {"Retry-After": {**_header("seconds the model server asked to wait"), "required": False}}),
    "503": ("the database is unavailable, or the token names a signing key while the JWKS cannot be fetched",
            RETRY_AFTER),
    "504": ("the assistant timed out (or the model server answered 408 or 504); the user message is stored, "
            "error.conversation_id names its conversation", {}),
}
# Answered by the HTTP server (gunicorn, see gunicorn.conf.py) before the app
# sees the request, to any route, in the same JSON error shape.
_HTML = {"text/html": {"schema": {"type": "string"}}}
SERVER_LIMITS = {
    "414": {"description": "the request line is over the HTTP server's limit (4094 bytes)",
            "content": {"application/json": {"schema": "Error"}}},
    "431": {"description": "a header line is over the HTTP server's limit (32 KiB), or there are over 100 of them",
            "content": {"application/json": {"schema": "Error"}}},
}

USER_ID = {"name": "user_id", "in": "path", "required": True,
           "description": "the `sub` of the bearer token",
           "schema": {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}}
TASK_ID = {"name": "task_id", "in": "path", "required": True,
           "schema": {"type": "integer", "minimum": 1, "maximum": BIGINT_MAX}}
CONVERSATION_ID = {"name": "conversation_id", "in": "path", "required": True,
                   "schema": {"type": "string", "format": "uuid"}}
MESSAGE_ID = {**TASK_ID, "name": "message_id"}
# An HTTP field value as the app reads it: printable Latin-1, no whitespace at either end.
_KEY_EDGE = "[\\u0021-\\u007e\\u00a1-\\u00ac\\u00ae-\\u00ff]"
_KEY_INNER = "[\\u0020-\\u007e\\u00a1-\\u00ac\\u00ae-\\u00ff]"
IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "a repeat with the same key and body returns the first answer and stores nothing new",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255,
               "pattern": f"^{_KEY_EDGE}({_KEY_INNER}*{_KEY_EDGE})?$"},
}

READ_ERRORS = ("401", "403", "404", "503")
LIST_ERRORS = ("401", "403", "422", "503")
WRITE_ERRORS = (*READ_ERRORS, "429")
BODY_ERRORS = ("400", "401", "403", "404", "413", "415", "422", "429", "503")


def _json(schema) -> dict:
    return {"application/json": {"schema": schema}}


def _errors(statuses) -> dict:
    answers = {}
    for status in statuses:
        description, headers = ERRORS[status]
        answers[status] = {"description": description, "content": _json("Error")}
        if headers:
            answers[status]["headers"] = headers
    return answers


def _links(pointer: str, parameter: str, *operation_ids: str) -> dict:
    """Links from an answer to the operations that take the id it carries at `pointer`."""
    return {operation_id: {"operationId": operation_id,
                           "parameters": {"user_id": "$request.path.user_id", parameter: f"$response.body#{pointer}"}}
            for operation_id in operation_ids}


def _operation(operation_id, summary, status, description, schema=None, *, errors, body=None, query=None,
               parameters=(), links=None, headers=None):
    ok = {"description": description}
    if schema is not None:
        ok["content"] = _json(schema)
    if headers:
        ok["headers"] = headers
    if links:
        ok["links"] = links
    operation = {
        "operationId": operation_id,
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {status: ok, **_errors(sorted(errors)), **SERVER_LIMITS},
    }
    operation["parameters"] = list(parameters)
    if query is not None:
        operation["parameters"].append({"in": "query", "schema": query})
    if not operation["parameters"]:
        del operation["parameters"]
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(body)}
    return operation


def _task_paths(spec: APISpec) -> None:
    spec.path(
        path="/api/{user_id}/tasks",
        parameters=[USER_ID],
        operations={
            "get": _operation("listTasks", "List tasks, newest first, a page at a time", "200",
                              "a page of tasks (up to `limit`)", {"type": "array", "items": "Task"},
                              query=schemas.TaskListQuerySchema, errors=LIST_ERRORS, headers=NEXT_PAGE),
            "post": _operation("addTask", "Add a task", "201", "the new task", "Task", body=schemas.TaskCreateSchema,
                               errors=set(BODY_ERRORS) - {"404"},
                               links=_links("/id", "task_id", "getTask", "updateTask", "toggleTask", "deleteTask")),
        },
    )
    spec.path(
        path="/api/{user_id}/tasks/{task_id}",
        parameters=[USER_ID, TASK_ID],
        operations={
            "get": _operation("getTask", "View a task", "200", "the task", "Task", errors=READ_ERRORS),
            "put": _operation("updateTask", "Update a task's title and/or description", "200", "the task", "Task",
                              body="TaskUpdate", errors=BODY_ERRORS),
            "delete": _operation("deleteTask", "Delete a task", "204", "deleted", errors=WRITE_ERRORS),
        },
    )
    spec.path(
        path="/api/{user_id}/tasks/{task_id}/complete",
        parameters=[USER_ID, TASK_ID],
        operations={"patch": _operation("toggleTask", "Toggle a task's completion", "200", "the task", "Task",
                                        errors=WRITE_ERRORS)},
    )


UI_MESSAGE_STREAM = {
    "schema": {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": "a JSON object, or [DONE] last"},
        "event": {"type": "string"}}, "description": (
        "With `stream: true` (or `Accept: text/event-stream`): the AI SDK UI message stream protocol v1, one "
        "`data: <JSON>` event per line pair: start, start-step, text-start, text-delta..., text-end, "
        "tool-input-available per tool call, finish-step, finish (once the reply is stored), then `data: [DONE]`; "
        "a failure after the start is an `error` event then `data: [DONE]`.")},
}


def _chat_paths(spec: APISpec, message_max_chars: int) -> None:
    chat = _operation(
        "chat", "One chat turn: store the message, ask the assistant with the stored history, store its reply",
        "200", "the assistant's reply (JSON, or a stream of it as it is generated)", "ChatResponse",
        body=chat_schemas.ChatRequestSchema(max_chars=message_max_chars), parameters=[IDEMPOTENCY_KEY],
        errors=(*BODY_ERRORS, "409", "502", "504"),
        links={**_links("/conversation_id", "conversation_id", "getConversation", "listMessages",
                        "renameConversation", "deleteConversation"),
               "giveFeedback": {"operationId": "giveFeedback", "parameters": {
                   "user_id": "$request.path.user_id", "conversation_id": "$response.body#/conversation_id",
                   "message_id": "$response.body#/assistant_message_id"}}},
    )
    chat["requestBody"]["content"]["application/json"]["schema"] = {"oneOf": [
        {"$ref": "#/components/schemas/ChatRequest"}, {"$ref": "#/components/schemas/ChatEdit"},
        {"$ref": "#/components/schemas/ChatRegenerate"}]}
    chat["description"] = (
        "Also takes the body the AI SDK's DefaultChatTransport sends when nothing customises it (UIChatRequest: "
        "`{id, messages, trigger, messageId?}`, other fields ignored; always streamed): `id` is the conversation's "
        "id (an id this user has no conversation under starts one), the last of `messages` is the new user "
        "message (its `id` becomes the message's `ui_id`; sent again, the turn is replayed), `messageId` with "
        "`submit-message` edits the user message with that `ui_id`, and `regenerate-message` answers again the "
        "user message its reply (by `ui_id`, else the last) answered.")
    chat["responses"]["200"]["content"]["text/event-stream"] = UI_MESSAGE_STREAM
    chat["responses"]["200"]["headers"] = {"x-vercel-ai-ui-message-stream": {
        "description": "`v1` on a streamed answer", "required": False, "schema": {"type": "string"}}}
    spec.path(path="/api/{user_id}/chat", parameters=[USER_ID], operations={"post": chat})
    spec.path(
        path="/api/{user_id}/conversations",
        parameters=[USER_ID],
        operations={"get": _operation(
            "listConversations", "List conversations (pinned first, then most recently updated first), or search them",
            "200", "a page of conversations; with `q`, of those holding every word, each with a snippet",
            "ConversationPage", query=schemas.ConversationListQuerySchema, errors=LIST_ERRORS)},
    )
    spec.path(
        path="/api/{user_id}/conversations/{conversation_id}",
        parameters=[USER_ID, CONVERSATION_ID],
        operations={
            "get": _operation("getConversation", "Read a conversation", "200", "the conversation", "Conversation",
                              errors=READ_ERRORS),
            "patch": _operation("renameConversation", "Rename, archive or pin a conversation (updated_at stays)",
                                "200", "the conversation", "Conversation", body="ConversationPatch",
                                errors=BODY_ERRORS),
            "delete": _operation("deleteConversation", "Delete a conversation and its messages", "204", "deleted",
                                 errors=WRITE_ERRORS),
        },
    )
    messages = _operation("listMessages", "Page through a conversation's messages", "200",
                          "a page of messages (with `format=ui`, as the AI SDK's UIMessages)", "MessagePage",
                          query=schemas.MessagePageQuerySchema, errors=(*READ_ERRORS, "422"))
    messages["responses"]["200"]["content"]["application/json"]["schema"] = {"oneOf": [
        {"$ref": "#/components/schemas/MessagePage"}, {"$ref": "#/components/schemas/UIMessagePage"}]}
    resume = _operation("resumeStream", "Follow the conversation's reply being produced, from its start",
                        "200", "the reply's stream, as the turn that produces it sends it", errors=READ_ERRORS)
    resume["responses"]["200"]["content"] = {"text/event-stream": UI_MESSAGE_STREAM}
    resume["responses"]["204"] = {"description": "no reply of the conversation is being produced (also when the "
                                                  "user has no such conversation)"}
    spec.path(path="/api/{user_id}/chat/{conversation_id}/stream", parameters=[USER_ID, CONVERSATION_ID],
              operations={"get": resume})
    spec.path(
        path="/api/{user_id}/conversations/{conversation_id}/stop",
        parameters=[USER_ID, CONVERSATION_ID],
        operations={"post": _operation(
            "stopReply", "Stop the reply the conversation is producing, on whichever instance", "200",
            "whether a reply was stopped; it keeps the text produced so far, status `stopped`", "Stop",
            errors=WRITE_ERRORS)},
    )
    spec.path(
        path="/api/{user_id}/conversations/{conversation_id}/messages",
        parameters=[USER_ID, CONVERSATION_ID],
        operations={"get": messages},
    )
    spec.path(
        path="/api/{user_id}/conversations/{conversation_id}/messages/{message_id}/feedback",
        parameters=[USER_ID, CONVERSATION_ID, MESSAGE_ID],
        operations={"put": _operation(
            "giveFeedback", "Rate an assistant message up or down (null clears), with an optional comment", "200",
            "the message, with its feedback (422 `not_an_assistant_message` on a user message)", "Message",
            body=schemas.FeedbackRequestSchema, errors=BODY_ERRORS)},
    )


EXPORT_ERRORS = {
    "429": ("over EXPORT_RATE_LIMIT (6/hour per user by default; `rate_limited`), or an export of this user is "
            "still being sent by this server (`export_in_progress`)", RETRY_AFTER),
    "503": ("the database is unavailable, or this server is sending EXPORT_CONCURRENCY exports already "
            "(`exports_busy`)", RETRY_AFTER),
    "507": ("the document is larger than EXPORT_MAX_BYTES (`export_too_large`): nothing is sent", {}),
}


def _user_data_paths(spec: APISpec) -> None:
    export = _operation("exportUserData", "Download every row of the user as one JSON document", "200",
                        "the user's tasks, conversations and their messages, read from one snapshot",
                        "Export", errors=("401", "403"))
    export["responses"]["200"]["headers"] = {
        "Content-Disposition": _header('`attachment; filename="chat-export.json"`'),
        "Content-Length": {**_header("the size of the document in bytes"), "schema": {"type": "integer"}},
    }
    for status, (description, headers) in EXPORT_ERRORS.items():
        export["responses"][status] = {"description": description, "content": _json("Error"),
                                       **({"headers": headers} if headers else {})}
    spec.path(path="/api/{user_id}/export", parameters=[USER_ID], operations={"get": export})
    spec.path(path="/api/{user_id}/data", parameters=[USER_ID], operations={"delete": _operation(
        "eraseUserData", "Erase every row of the user in every table (the hook an account deletion calls)",
        "204", "erased, in batches; also when there was nothing left to erase", errors=("401", "403", "429", "503"))})


def _service_paths(spec: APISpec) -> None:
    status = {"type": "object", "properties": {"status": {"type": "string"}}, "required": ["status"],
              "additionalProperties": False}
    not_ready = {"description": "the database does not answer, or isolation is not in force; error.message says why",
                 "content": _json("Error"), "headers": RETRY_AFTER}
    routes = {
        "/healthz": ("healthz", "Liveness: the process is up",
                     {"200": {"description": "up", "content": _json(status)}}),
        "/readyz": ("readyz", "Readiness: the database answers and isolation is in force",
                    {"200": {"description": "ready", "content": _json(status)}, "503": not_ready}),
        "/metrics": ("metrics", "Prometheus metrics, over every gunicorn worker",
                     {"200": {"description": "the Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}}}),
        "/api/openapi.json": ("openapi", "This document",
                              {"200": {"description": "the OpenAPI 3 document", "content": _json({"type": "object"})}}),
        "/docs": ("docs", "Interactive documentation of this document (Swagger UI, served by the app itself)",
                  {"200": {"description": "the page", "content": _HTML}}),
    }
    for path, (operation_id, summary, responses) in routes.items():
        spec.path(path=path, operations={"get": {
            "operationId": operation_id, "summary": summary, "responses": {**responses, **SERVER_LIMITS},
        }})


def openapi_document() -> dict:
    """The document for this app's settings (MESSAGE_MAX_CHARS bounds `message`)."""
    max_chars = DEFAULT_MESSAGE_MAX_CHARS
    if has_app_context():
        max_chars = current_app.config["SETTINGS"].message_max_chars
    return _document(max_chars)


@lru_cache(maxsize=4)
def _document(message_max_chars: int) -> dict:
    spec = APISpec(
        title="Todo chat assistant API",
        version="0.1.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Chat, conversation history (search, archive, pin, feedback), tasks and the user's "
                             "data (export, erasure), isolated per user by PostgreSQL row-level security."},
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    spec.components.schema("Error", schema=schemas.ErrorSchema)
    spec.components.schema("Task", schema=schemas.TaskSchema)
    spec.components.schema("TaskUpdate", schemas.TaskUpdateSchema.openapi_extra, schema=schemas.TaskUpdateSchema)
    spec.components.schema("ConversationPatch", schemas.ConversationPatchSchema.openapi_extra,
                           schema=schemas.ConversationPatchSchema)
    spec.components.schema("ChatRequest", schema=chat_schemas.ChatRequestSchema(max_chars=message_max_chars))
    spec.components.schema("ChatEdit", schema=chat_schemas.ChatEditSchema(max_chars=message_max_chars))
    for component in ("ChatRegenerate", "UIChatRequest", "Conversation", "Message", "ChatResponse",
                      "ConversationPage", "MessagePage", "UIMessagePage", "Stop", "Export"):
        spec.components.schema(component, schema=getattr(schemas, f"{component}Schema", None)
                               or getattr(chat_schemas, f"{component}Schema"))
    _task_paths(spec)
    _chat_paths(spec, message_max_chars)
    _user_data_paths(spec)
    _service_paths(spec)
    return spec.to_dict()
