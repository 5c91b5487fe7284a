"""The OpenAPI 3 document, generated from the marshmallow schemas."""
from __future__ import annotations

from functools import lru_cache

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from . import schemas

ERROR_STATUSES = {
    "400": "the body is not valid JSON, or not a JSON object",
    "401": "missing or invalid bearer token",
    "403": "the token belongs to another user",
    "404": "no such resource for this user",
    "405": "method not allowed",
    "409": "the first request with this Idempotency-Key is still running",
    "413": "body over 1 MiB",
    "415": "the body is not application/json",
    "422": "a field fails validation",
    "503": "the database is unavailable; see Retry-After",
}
USER_ID = {"name": "user_id", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
TASK_ID = {"name": "task_id", "in": "path", "required": True,
           "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}}
CONVERSATION_ID = {"name": "conversation_id", "in": "path", "required": True,
                   "schema": {"type": "string", "format": "uuid"}}
IDEMPOTENCY_KEY = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "schema": {"type": "string", "minLength": 1, "maxLength": 255}}


def _errors(*statuses: str) -> dict:
    return {status: {"description": ERROR_STATUSES.get(status, "error"), "content": _json("Error")} for status in statuses}


def _json(schema) -> dict:
    return {"application/json": {"schema": schema}}


def _ok(status: str, description: str, schema=None) -> dict:
    answer = {"description": description}
    if schema is not None:
        answer["content"] = _json(schema)
    return {status: answer}


def _operation(summary, ok, *, body=None, query=None, errors=("401", "403", "404", "503"), parameters=()):
    operation = {"summary": summary, "security": [{"bearer": []}], "responses": {**ok, **_errors(*errors)}}
    if parameters:
        operation["parameters"] = list(parameters)
    if query is not None:
        operation["parameters"] = operation.get("parameters", []) + [{"in": "query", "schema": query}]
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(body)}
    return operation


BODY_ERRORS = ("400", "401", "403", "404", "413", "415", "422", "503")


def _task_paths(spec: APISpec) -> None:
    spec.path(
        path="/api/{user_id}/tasks",
        parameters=[USER_ID],
        operations={
            "get": _operation("List tasks, newest first", _ok("200", "tasks", {"type": "array", "items": "Task"}),
                              query=schemas.TaskListQuerySchema, errors=("401", "403", "422", "503")),
            "post": _operation("Add a task", _ok("201", "the new task", "Task"), body=schemas.TaskCreateSchema,
                               errors=BODY_ERRORS),
        },
    )
    spec.path(
        path="/api/{user_id}/tasks/{task_id}",
        parameters=[USER_ID, TASK_ID],
        operations={
            "get": _operation("View a task", _ok("200", "the task", "Task")),
            "put": _operation("Update a task's title and/or description", _ok("200", "the task", "Task"),
                              body=schemas.TaskUpdateSchema, errors=BODY_ERRORS),
            "delete": _operation("Delete a task", _ok("204", "deleted")),
        },
    )
    spec.path(
        path="/api/{user_id}/tasks/{task_id}/complete",
        parameters=[USER_ID, TASK_ID],
        operations={"patch": _operation("Toggle a task's completion", _ok("200", "the task", "Task"))},
    )


def _service_paths(spec: APISpec) -> None:
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    spec.path(path="/healthz", operations={"get": {"summary": "Liveness", "responses": _ok("200", "up", status)}})
    spec.path(path="/readyz", operations={"get": {
        "summary": "Readiness: the database answers and isolation is in force",
        "responses": {**_ok("200", "ready", status), **_errors("503")},
    }})
    spec.path(path="/api/openapi.json", operations={"get": {
        "summary": "This document", "responses": _ok("200", "OpenAPI 3 document", {"type": "object"}),
    }})


def _chat_paths(spec: APISpec) -> None:
    chat_errors = {**_errors(*BODY_ERRORS, "409"),
                   "502": {"description": "the assistant failed; error.conversation_id names the conversation",
                           "content": _json("Error")},
                   "504": {"description": "the assistant timed out; error.conversation_id names the conversation",
                           "content": _json("Error")}}
    chat = _operation("One chat turn: store the message, ask the assistant with the stored history, store its reply",
                      _ok("200", "the assistant's reply", "ChatResponse"), body=schemas.ChatRequestSchema,
                      errors=(), parameters=[IDEMPOTENCY_KEY])
    chat["responses"].update(chat_errors)
    spec.path(path="/api/{user_id}/chat", parameters=[USER_ID], operations={"post": chat})
    spec.path(
        path="/api/{user_id}/conversations",
        parameters=[USER_ID],
        operations={"get": _operation("List conversations, most recently updated first",
                                      _ok("200", "a page of conversations", "ConversationPage"),
                                      query=schemas.PageQuerySchema, errors=("401", "403", "422", "503"))},
    )
    spec.path(
        path="/api/{user_id}/conversations/{conversation_id}",
        parameters=[USER_ID, CONVERSATION_ID],
        operations={
            "get": _operation("Read a conversation", _ok("200", "the conversation", "Conversation")),
            "patch": _operation("Rename a conversation", _ok("200", "the conversation", "Conversation"),
                                body=schemas.ConversationPatchSchema, errors=BODY_ERRORS),
            "delete": _operation("Delete a conversation and its messages", _ok("204", "deleted")),
        },
    )
    spec.path(
        path="/api/{user_id}/conversations/{conversation_id}/messages",
        parameters=[USER_ID, CONVERSATION_ID],
        operations={"get": _operation("Page through a conversation's messages",
                                      _ok("200", "a page of messages", "MessagePage"),
                                      query=schemas.MessagePageQuerySchema, errors=("401", "403", "404", "422", "503"))},
    )


PATH_BUILDERS = [_task_paths, _chat_paths, _service_paths]


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    spec = APISpec(
        title="Todo chat assistant API",
        version="0.1.0",
        openapi_version="3.0.3",
        plugins=[MarshmallowPlugin()],
        info={"description": "Chat, conversation history and tasks, isolated per user by PostgreSQL row-level security."},
    )
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"})
    spec.components.schema("Error", schema=schemas.ErrorSchema)
    spec.components.schema("Task", schema=schemas.TaskSchema)
    for component in ("Conversation", "Message", "ChatResponse", "ConversationPage", "MessagePage"):
        spec.components.schema(component, schema=getattr(schemas, f"{component}Schema"))
    for build in PATH_BUILDERS:
        build(spec)
    return spec.to_dict()
