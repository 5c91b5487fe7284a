"""The one place that binds `app.user_id` to a database transaction.

The verified user id lives in a context variable for the length of a request.
A Session `after_begin` hook runs `set_config('app.user_id', <id>, true)` at the
start of *every* transaction the session opens, including the ones SQLAlchemy
opens after a commit to refresh objects. The setting is transaction-local, so a
pooled connection carries nothing from one request to the next.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from sqlalchemy import event, text
from sqlalchemy.orm import Session

_current_user: ContextVar[str | None] = ContextVar("current_user", default=None)

BIND_USER = text("select set_config('app.user_id', :user_id, true)")


def current_user_id() -> str | None:
    return _current_user.get()


def bind_user(user_id: str):
    """Make `user_id` the tenant of every transaction until `unbind_user(token)`."""
    return _current_user.set(user_id)


def unbind_user(token) -> None:
    _current_user.reset(token)


@contextmanager
def user_scope(user_id: str):
    token = bind_user(user_id)
    try:
        yield
    finally:
        unbind_user(token)


def _bind_transaction(session, transaction, connection) -> None:
    user_id = _current_user.get()
    if user_id is not None:
        connection.execute(BIND_USER, {"user_id": user_id})


def install(session_target=Session) -> None:
    """Register the hook once for every Session (Flask-SQLAlchemy's included)."""
    if not event.contains(session_target, "after_begin", _bind_transaction):
        event.listen(session_target, "after_begin", _bind_transaction)
