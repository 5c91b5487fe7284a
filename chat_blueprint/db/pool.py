"""A dead database connection is dropped alone; the rest of the pool is checked once.

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

import time
import weakref

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
