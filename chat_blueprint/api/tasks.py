"""Task routes (the Basic Level todo API). Thin: parse, call, serialise."""
from __future__ import annotations

from flask import g, jsonify, url_for

from ..db.extensions import db
from ..schemas import TaskCreateSchema, TaskListQuerySchema, TaskSchema, TaskUpdateSchema, task_fields
from ..services import tasks
from .bodies import json_body, query_args
from .guards import user_blueprint

bp = user_blueprint("tasks", __name__)

task_schema = TaskSchema()


@bp.get("/tasks")
def list_tasks():
    """The user's tasks, newest first, optionally only pending or completed
    ones, `limit` at a time; a `Link: <...>; rel="next"` header names the next
    page while more follow (the body stays a plain JSON array). The link is a
    relative reference (`</api/...>`), resolved by the client against the URL
    it asked: one built from the `Host` header would name whatever host a
    client or a proxy put there."""
    args = query_args(TaskListQuerySchema())
    page, next_cursor = tasks.list_tasks(db.session, g.user_id, args["status"], args["limit"],
                                                args["cursor"])
    response = jsonify([task_fields(task) for task in page])
    if next_cursor is not None:
        next_url = url_for("tasks.list_tasks", user_id=g.path_user_id, status=args["status"], limit=args["limit"],
                           cursor=next_cursor)
        response.headers["Link"] = f'<{next_url}>; rel="next"'
    return response


@bp.post("/tasks")
def add_task():
    body = json_body(TaskCreateSchema())
    task = tasks.add_task(db.session, g.user_id, body["title"], body.get("description"))
    return task_schema.dump(task), 201


@bp.get("/tasks/<bigint:task_id>")
def get_task(task_id: int):
    return task_schema.dump(tasks.get_task(db.session, g.user_id, task_id))


@bp.put("/tasks/<bigint:task_id>")
def update_task(task_id: int):
    """Change the title, the description, or both."""
    changes = json_body(TaskUpdateSchema())
    return task_schema.dump(tasks.update_task(db.session, g.user_id, task_id, changes))


@bp.delete("/tasks/<bigint:task_id>")
def delete_task(task_id: int):
    tasks.delete_task(db.session, g.user_id, task_id)
    return "", 204


@bp.patch("/tasks/<bigint:task_id>/complete")
def toggle_complete(task_id: int):
    """Flip `completed`: pending becomes completed, completed becomes pending."""
    return task_schema.dump(tasks.toggle_complete(db.session, g.user_id, task_id))
