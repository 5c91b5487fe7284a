"""The one place that binds `app.user_id` to a database transaction.

The verified user id lives in a context variable for the length of a request.
`bind_cursor` runs `select set_config('app.user_id', <id>, true)`; it is called

- by a Session `after_begin` hook at the start of *every* transaction a
  Session opens, including the ones SQLAlchemy opens after a commit to
  refresh objects, and
- by the chat turn's pipelined transactions (conversations.py), as their
  first statement.

The setting is transaction-local, so a pooled connection carries nothing
from one request to the next, and PgBouncer transaction pooling is safe.
"""
from __future__ import annotations

from contextvars import ContextVar

from sqlalchemy import event
from sqlalchemy.orm import Session

_current_user: ContextVar[str | None] = ContextVar("current_user", default=None)

BIND_USER_SQL = "select set_config('app.user_id', %s, true)"


def bind_user(user_id: str):
    """Make `user_id` the tenant of every transaction until `unbind_user(token)`."""
    return _current_user.set(user_id)


def unbind_user(token) -> None:
    _current_user.reset(token)


def bind_cursor(cursor, user_id: str) -> None:
    """Bind `user_id` to the transaction `cursor` runs in (a psycopg cursor)."""
    cursor.execute(BIND_USER_SQL, (user_id,))


def _bind_transaction(session, transaction, connection) -> None:
    user_id = _current_user.get()
    if user_id is not None:
        with connection.connection.driver_connection.cursor() as cursor:
            bind_cursor(cursor, user_id)


def install(session_target=Session) -> None:
    """Register the hook once for every Session (Flask-SQLAlchemy's included)."""
    if not event.contains(session_target, "after_begin", _bind_transaction):
        event.listen(session_target, "after_begin", _bind_transaction)
