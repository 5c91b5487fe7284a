"""The one place that binds `app.user_id` to a database transaction.

`bind(cursor, user_id)` runs `select set_config('app.user_id', <id>, true)`,
in the same statement setting the transaction's `statement_timeout` and
`lock_timeout` (DATABASE_STATEMENT_TIMEOUT_S, DATABASE_LOCK_TIMEOUT_S, kept
per engine by `set_timeouts`), so every app transaction is bounded at no
extra round trip; and it has exactly four callers:

- the Session `after_begin` hook, at the start of *every* transaction a
  Session opens (including the ones SQLAlchemy opens after a commit to
  refresh objects), for the user of the current request,
- `transaction(engine, user_id)`, the public way to run raw psycopg SQL as a
  user (the chat turn's hot path), as its first statement, and
- `snapshot(engine, user_id)`, a read-only transaction for reading a user's
  rows at length (the export), whose user is passed in explicitly: a streamed
  response reads after the request's context variable is gone, and
- `shared_transaction(engine)`, whose statements come in groups, each after
  the binding of its own user (a process storing the progress of the replies
  of several users in one round trip).

The settings are transaction-local, so a pooled connection carries nothing
from one request to the next, and PgBouncer transaction pooling is safe.
A transaction that hits a timeout raises QueryCanceled or LockNotAvailable
and is rolled back; errors.py answers 503 with Retry-After.

A connection found dead is invalidated alone: the pool's other connections
stay, each checked once before its next use (see pool.py).
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import psycopg
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from . import pool

_current_user: ContextVar[str | None] = ContextVar("current_user", default=None)

# Functions that queue statements into a transaction right after the binding,
# in the same round trip (the write limit's step): each takes the psycopg
# connection in pipeline mode and returns a check to run once the results are
# in (raising refuses the transaction), or None.
_with_binding: list = []

BIND_USER_SQL = ("select set_config('app.user_id', %s, true), set_config('statement_timeout', %s, true),"
                 " set_config('lock_timeout', %s, true)")


@dataclass(frozen=True)
class Timeouts:
    """How long one statement may run, and wait for a lock, in a transaction."""

    statement_ms: int = 10_000
    lock_ms: int = 5_000


DEFAULT_TIMEOUTS = Timeouts()
_engine_timeouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def set_timeouts(engine: Engine, statement_s: float, lock_s: float) -> None:
    """The timeouts of every transaction bound on `engine` (else DEFAULT_TIMEOUTS)."""
    _engine_timeouts[engine] = Timeouts(max(1, round(statement_s * 1000)), max(1, round(lock_s * 1000)))


def bind_user(user_id: str):
    """Make `user_id` the tenant of every Session transaction until `unbind_user(token)`."""
    return _current_user.set(user_id)


def unbind_user(token) -> None:
    _current_user.reset(token)


def queue_with_binding(queue) -> None:
    """Have `queue(connection)` run in every transaction right after its binding."""
    if queue not in _with_binding:
        _with_binding.append(queue)


def _bind_and_queue(connection: psycopg.Connection, user_id: str, timeouts: Timeouts) -> list:
    """Bind the user and queue what goes with the binding; the checks to run after the sync."""
    bind(connection.cursor(), user_id, timeouts)
    return [check for queue in _with_binding if (check := queue(connection)) is not None]


def bind(cursor, user_id: str, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
    """Bind `user_id` and `timeouts` to the transaction `cursor` runs in (a psycopg cursor)."""
    cursor.execute(BIND_USER_SQL, (user_id, str(timeouts.statement_ms), str(timeouts.lock_ms)))


def _timeouts_of(engine: Engine) -> Timeouts:
    return _engine_timeouts.get(engine, DEFAULT_TIMEOUTS)


def _dropped_if_dead(engine: Engine, pooled, connection: psycopg.Connection, exc: BaseException) -> bool:
    """If the failure left `connection` dead, invalidate it alone and have the
    pool check the older ones (pool.py); True when it was dead."""
    if not (connection.broken or connection.closed):
        return False
    pooled.invalidate(exc if isinstance(exc, Exception) else None)
    pool.found_dead(engine)
    return True


_waiting: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> {waiter: since}
_waiting_lock = threading.Lock()  # gthread's threads join, leave and read the queues at once


def queue_age_s(engine: Engine) -> float:
    """How long the longest of this process's current waits for a pooled
    connection of `engine` has lasted (0 when nobody waits): the queue in front
    of the pool, as the delay it imposes."""
    with _waiting_lock:
        waiters = _waiting.get(engine)
        since = next(iter(waiters.values())) if waiters else None
    return 0.0 if since is None else time.monotonic() - since


@contextmanager
def _checkout(engine: Engine, patience_s: float | None):
    """A pooled connection, its waiters served in the order they came (pool.FairGate).
    Without patience, the pool's timeout (DATABASE_POOL_TIMEOUT_S) ends the wait for a
    place; with it, the wait goes on until `patience_s` have passed."""
    gate = pool.gate(engine)
    waiter, since = object(), time.monotonic()
    with _waiting_lock:
        waiters = _waiting.get(engine)
        if waiters is None:
            waiters = _waiting[engine] = OrderedDict()
        waiters[waiter] = since
    try:
        while not gate.acquire(engine.pool.timeout()):
            if patience_s is None or time.monotonic() - since >= patience_s:
                raise sa_exc.TimeoutError(f"no pooled connection within {engine.pool.timeout():g} s")
        try:
            connection = _connect(engine, since, patience_s)
        except BaseException:
            gate.release()
            raise
    finally:
        with _waiting_lock:
            del waiters[waiter]
    try:
        with connection:
            yield connection
    finally:
        gate.release()


def _connect(engine: Engine, since: float, patience_s: float | None):
    """engine.connect(): at once when the place came free, unless a Session (which
    takes its connections outside the gate) holds it; then the pool's own wait."""
    while True:
        try:
            return engine.connect()
        except sa_exc.TimeoutError:
            if patience_s is None or time.monotonic() - since >= patience_s:
                raise


@contextmanager
def transaction(engine: Engine, user_id: str, *, patience_s: float | None = None,
                pipeline: bool = True) -> Iterator[psycopg.Connection]:
    """One transaction as `user_id` on a pooled psycopg connection in pipeline mode.

    The user is bound by the first (queued) statement, so binding costs no
    round trip of its own. Statements queue until a result is fetched or the
    caller commits; calling `commit()` before reading results sends the whole
    transaction in one round trip. A clean exit commits what is still open;
    an exception rolls back. A connection found dead is invalidated (alone).

    `patience_s`: wait that long for a connection rather than the pool's
    timeout (storing a reply that was already paid for). `pipeline=False`
    sends each statement on its own: for parameters of megabytes, which a
    psycopg pipeline can deadlock on (the client blocked writing while the
    server waits for it to read).
    """
    with _committed(engine, patience_s, pipeline) as connection:
        for check in _bind_and_queue(connection, user_id, _timeouts_of(engine)):
            check()
        yield connection


@contextmanager
def _committed(engine: Engine, patience_s: float | None, pipeline: bool = True) -> Iterator[psycopg.Connection]:
    """A pooled psycopg connection whose transaction commits when the block ends
    and rolls back on an exception; a connection found dead is invalidated alone."""
    with _checkout(engine, patience_s) as pooled:
        connection = pooled.connection.driver_connection
        try:
            with connection.pipeline() if pipeline else nullcontext():
                yield connection
                connection.commit()
        except BaseException as exc:
            if not _dropped_if_dead(engine, pooled, connection, exc):
                try:
                    connection.rollback()
                except psycopg.Error:
                    pooled.invalidate()
            raise


class Shared:
    """A transaction whose statements come in groups, each group after the
    binding of its own user (`as_user`)."""

    def __init__(self, connection: psycopg.Connection, timeouts: Timeouts):
        self.connection = connection
        self._timeouts = timeouts

    def as_user(self, user_id: str) -> psycopg.Connection:
        """Bind `user_id` (and the timeouts) for the statements queued after this; the connection."""
        bind(self.connection.cursor(), user_id, self._timeouts)
        return self.connection


@contextmanager
def shared_transaction(engine: Engine) -> Iterator[Shared]:
    """One transaction in pipeline mode for a few statements of each of several
    users (`Shared.as_user`). Row-level security holds statement by statement,
    so a statement can only ever touch rows of the user bound before it. The
    whole goes out in one round trip when the block ends, and commits; an
    exception rolls all of it back."""
    with _committed(engine, None) as connection:
        yield Shared(connection, _timeouts_of(engine))


@contextmanager
def snapshot(engine: Engine, user_id: str) -> Iterator[psycopg.Connection]:
    """One read-only REPEATABLE READ transaction as `user_id` on a pooled
    psycopg connection, not pipelined (server-side cursors work in it): every
    query sees the same snapshot. It is rolled back and the connection goes
    back to the pool however the caller ends, a generator closed early included.
    """
    with engine.connect() as pooled:
        connection = pooled.connection.driver_connection
        try:
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                bind(cursor, user_id, _timeouts_of(engine))
            yield connection
        except BaseException as exc:
            _dropped_if_dead(engine, pooled, connection, exc)
            raise
        finally:
            if not (connection.broken or connection.closed):
                connection.rollback()


def _bind_session_transaction(session, transaction, connection) -> None:
    """Bind the request's user, with what goes along, in one round trip (BEGIN included)."""
    user_id = _current_user.get()
    if user_id is not None:
        driver = connection.connection.driver_connection
        with driver.pipeline():
            checks = _bind_and_queue(driver, user_id, _timeouts_of(connection.engine))
        for check in checks:
            check()


def install(session_target=Session) -> None:
    """Register the hook once for every Session (Flask-SQLAlchemy's included)."""
    if not event.contains(session_target, "after_begin", _bind_session_transaction):
        event.listen(session_target, "after_begin", _bind_session_transaction)
