"""The Basic Level todo list: persistence of a user's tasks.

Every query names the user as well as relying on row-level security: the
filter serves the `(user_id, created_at)` index, and the policy is the guarantee.
"""
from __future__ import annotations

from sqlalchemy import Row, delete, func, select, tuple_, update
from sqlalchemy.orm import Session

from ..db.models import Task
from ..errors import ApiError
from . import pagination


class TaskNotFound(ApiError):
    def __init__(self):
        super().__init__(404, "task_not_found", "no such task")


def list_tasks(session: Session, user_id: str, status: str = "all", limit: int = 1000,
               cursor: str | None = None) -> tuple[list[Row], str | None]:
    """A page of the user's tasks, newest first, keyset-paginated on
    (created_at, id) along the `(user_id, created_at, id)` index, and the
    cursor of the next page (None on the last). Rows, not ORM objects: a
    page holds up to 1,000 tasks, and loading them as objects cost about
    as much CPU again as the rest of the request."""
    query = select(*Task.__table__.columns).where(Task.user_id == user_id)
    if status != "all":
        query = query.where(Task.completed.is_(status == "completed"))
    if cursor is not None:
        created_at, task_id = pagination.decode_task(cursor)
        query = query.where(tuple_(Task.created_at, Task.id) < tuple_(created_at, task_id))
    query = query.order_by(Task.created_at.desc(), Task.id.desc()).limit(limit + 1)
    rows = session.execute(query).all()
    session.commit()
    return pagination.keyset_page(rows, limit, lambda last: pagination.encode_task(last.created_at, last.id))


def add_task(session: Session, user_id: str, title: str, description: str | None) -> Task:
    task = Task(user_id=user_id, title=title, description=description or "")
    session.add(task)
    session.flush()
    session.refresh(task)
    session.commit()
    return task


def get_task(session: Session, user_id: str, task_id: int) -> Task:
    task = session.scalar(select(Task).where(Task.id == task_id, Task.user_id == user_id))
    session.commit()
    if task is None:
        raise TaskNotFound()
    return task


def update_task(session: Session, user_id: str, task_id: int, changes: dict) -> Task:
    values = {name: value if value is not None else "" for name, value in changes.items()}
    return _update_one(session, user_id, task_id, **values, updated_at=func.now())


def toggle_complete(session: Session, user_id: str, task_id: int) -> Task:
    return _update_one(session, user_id, task_id, completed=~Task.completed, updated_at=func.now())


def delete_task(session: Session, user_id: str, task_id: int) -> None:
    deleted = session.scalar(delete(Task).where(Task.id == task_id, Task.user_id == user_id).returning(Task.id))
    session.commit()
    if deleted is None:
        raise TaskNotFound()


def _update_one(session: Session, user_id: str, task_id: int, **values) -> Task:
    statement = (
        update(Task)
        .where(Task.id == task_id, Task.user_id == user_id)
        .values(**values)
        .returning(Task)
        .execution_options(synchronize_session=False)
    )
    task = session.scalar(statement)
    session.commit()
    if task is None:
        raise TaskNotFound()
    return task
