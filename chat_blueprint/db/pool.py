"""A dead database connection is dropped alone; the rest of the pool is checked
once; and waiters for a connection are served in turn (FairGate, below).

When one pooled connection turns out dead (its backend killed, the database
restarted), the others may be dead too, or perfectly healthy. Disposing of
the engine (or SQLAlchemy's default, invalidating every pooled connection)
drops the healthy ones with the dead. Instead, `found_dead(engine)` notes the
time: the dead connection is invalidated alone by whoever found it, and each
connection older than that is pinged once (`select 1`) when it is next
checked out, and replaced there, before any request uses it, if it is dead.
So a database restart costs one failed request per worker, as disposing did,
and a single killed backend costs one and drops nothing else.

`watch(engine)` installs both halves: the check at checkout, and, for the
ORM's queries, SQLAlchemy's disconnect handling told to invalidate only the
connection it found dead. Raw psycopg use (`tenancy.transaction`,
`tenancy.snapshot`) calls `found_dead` itself.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import deque

import psycopg
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine

_dead_found_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_watched: weakref.WeakSet = weakref.WeakSet()
_replaced: weakref.WeakSet = weakref.WeakSet()  # checkouts whose connection was replaced once already
CHECKED_AT = "chat_blueprint.checked_at"


def found_dead(engine: Engine) -> None:
    """A connection of `engine` was found dead: check every older one before its next use."""
    _dead_found_at[engine] = time.time()


def watch(engine: Engine) -> None:
    if engine in _watched:
        return
    _watched.add(engine)
    engine_ref = weakref.ref(engine)

    def stamp_new_connection(dbapi_connection, record) -> None:
        record.info[CHECKED_AT] = time.time()  # a connection just made is known to work

    def check_older_connections(dbapi_connection, record, proxy) -> None:
        engine = engine_ref()
        since = _dead_found_at.get(engine) if engine is not None else None
        if since is None or record.info.get(CHECKED_AT, 0.0) >= since or proxy in _replaced:
            return
        try:
            dbapi_connection.execute("select 1")
            dbapi_connection.rollback()
        except psycopg.Error:
            # SQLAlchemy replaces it and runs this again on the new connection,
            # which is let through (at most one replacement per checkout, so a
            # database still down is the request's 503, not a pool error).
            _replaced.add(proxy)
            raise sa_exc.DisconnectionError("a pooled connection older than a dead one is dead too") from None
        record.info[CHECKED_AT] = time.time()

    def invalidate_only_the_dead(context) -> None:
        if context.is_disconnect:
            context.invalidate_pool_on_disconnect = False
            found_dead(context.engine)

    event.listen(engine, "connect", stamp_new_connection)
    event.listen(engine, "checkout", check_older_connections)
    event.listen(engine, "handle_error", invalidate_only_the_dead)


class FairGate:
    """At most `size` holders at once, the others let in in the order they came.

    SQLAlchemy's pool hands a returned connection to whoever asks first, and
    under load that is often the request that just returned it, asking again
    for its next transaction, not one already waiting: a waiter was passed
    over again and again (a chat turn's server-side p99 was 30x its p50 at 16
    clients). A holder that leaves hands its place straight to the oldest
    waiter instead, so nobody can take it back first. Waits are bounded by
    `acquire`'s timeout; a waiter interrupted meanwhile (a stop, a timeout
    raised into it) gives back a place it was granted in the same instant.
    """

    def __init__(self, size: int):
        self._free = size
        self._waiters: deque[threading.Event] = deque()
        self._lock = threading.Lock()

    def acquire(self, timeout_s: float) -> bool:
        """True once a place is held; False when `timeout_s` passed first."""
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return True
            granted = threading.Event()
            self._waiters.append(granted)
        try:
            granted.wait(timeout_s)
        except BaseException:
            if self._leave(granted):
                self.release()
            raise
        return self._leave(granted)

    def _leave(self, granted: threading.Event) -> bool:
        """Out of the queue; whether the place was granted (then it is held)."""
        with self._lock:
            if granted.is_set():
                return True
            self._waiters.remove(granted)
            return False

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._free += 1


_gates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_gates_lock = threading.Lock()


def gate(engine: Engine) -> FairGate:
    """The engine's gate, one place per pooled connection."""
    with _gates_lock:
        found = _gates.get(engine)
        if found is None:
            found = _gates[engine] = FairGate(engine.pool.size())
        return found
