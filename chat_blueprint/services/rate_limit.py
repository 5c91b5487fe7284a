"""Per-user rate limits, kept in PostgreSQL so every instance shares them:
chat turns (CHAT_RATE_LIMIT, table chat_rate_limit) and writes
(WRITE_RATE_LIMIT, table write_rate_limit: every POST, PUT, PATCH and DELETE
under /api/{user_id}).

GCRA (the generic cell rate algorithm): one row per user and limit holds the
theoretical arrival time `tat`. A request is admitted when moving `tat` one
emission interval later keeps it within one period of now; the row lock
serialises a user's concurrent requests on every instance. Each step runs
inside the caller's transaction, so a refused request stores nothing, and a
rolled-back one is not counted.

A write's step costs no round trip of its own: the API marks the request's
write as due (`expect_write`), and the request's first transaction takes it,
queued with the user's binding (ORM transactions, through `tenancy`) or inside
the statement that stores a chat turn's message (turn_sql.py). A write that
opened no transaction (refused before: 400, 415, 422) is counted at its end by
`take_write_if_due`, in a transaction of its own.
"""
from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta

from ..db import tenancy
from ..errors import ApiError

# No row returned: limited.
TAKE = """
INSERT INTO {table} AS state (user_id, tat)
VALUES (%(user_id)s, now() + %(interval)s)
ON CONFLICT (user_id) DO UPDATE
SET tat = greatest(state.tat, now()) + %(interval)s
WHERE greatest(state.tat, now()) + %(interval)s <= now() + %(period)s
RETURNING tat
"""

RETRY_AFTER = """
SELECT greatest(1, ceil(extract(epoch FROM greatest(tat, now()) + %(interval)s - now() - %(period)s)))::int
FROM {table} WHERE user_id = %(user_id)s
"""


class RateLimited(ApiError):
    def __init__(self, retry_after_s: int, what: str = "chat turns"):
        super().__init__(429, "rate_limited", f"too many {what}; retry later",
                         headers={"Retry-After": str(retry_after_s)}, retry_after=retry_after_s)


@dataclass(frozen=True)
class RateLimit:
    """At most `count` requests per `period_s` seconds per user, in bursts of up to `count`."""

    count: int
    period_s: int

    @property
    def params(self) -> dict:
        return {"interval": timedelta(seconds=self.period_s / self.count), "period": timedelta(seconds=self.period_s)}


@dataclass(frozen=True)
class Bucket:
    """Which limit a request counts against: its table and its name in a 429."""

    table: str
    what: str

    @property
    def take_sql(self) -> str:
        return TAKE.format(table=self.table)

    @property
    def retry_after_sql(self) -> str:
        return RETRY_AFTER.format(table=self.table)


CHAT = Bucket("chat_rate_limit", "chat turns")
WRITES = Bucket("write_rate_limit", "writes")


@dataclass
class PendingTake:
    """One GCRA step queued in a pipeline; `check()` reads its verdict."""

    bucket: Bucket
    taken: object
    retry_after: object

    def check(self) -> None:
        """Raise RateLimited if the step was refused."""
        if self.taken.fetchone() is None:
            raise RateLimited(self.retry_after.fetchone()[0], self.bucket.what)


def queue_take(connection, user_id: str, limit: RateLimit, bucket: Bucket = CHAT) -> PendingTake:
    """Queue one step against `limit` (and the Retry-After it would need) in
    `connection`'s transaction, without waiting for the answer: in pipeline
    mode both go out with whatever is sent next."""
    params = {"user_id": user_id, **limit.params}
    taken, retry_after = connection.cursor(), connection.cursor()
    taken.execute(bucket.take_sql, params)
    retry_after.execute(bucket.retry_after_sql, params)
    return PendingTake(bucket, taken, retry_after)


# A step lost in a crash costs nothing (the user gets one more write), so its
# commit need not wait for the WAL flush.
NO_FLUSH_WAIT = "SELECT set_config('synchronous_commit', 'off', true)"


def take_write(engine, user_id: str, limit: RateLimit) -> None:
    """Count one write against `limit` in a transaction of its own (one round
    trip: the user binding, the step and the commit go out together, and the
    commit does not wait for the disk), or raise RateLimited."""
    with tenancy.transaction(engine, user_id) as connection:
        connection.cursor().execute(NO_FLUSH_WAIT)
        pending = queue_take(connection, user_id, limit, WRITES)
        connection.commit()
        pending.check()


@dataclass
class DueWrite:
    """The write the current request has yet to count against WRITE_RATE_LIMIT."""

    user_id: str
    limit: RateLimit
    taken: bool = False


_due_write: ContextVar[DueWrite | None] = ContextVar("due_write", default=None)


def expect_write(user_id: str, limit: RateLimit):
    """Mark this request's write as due; returns the token `forget_write` takes."""
    return _due_write.set(DueWrite(user_id, limit))


def forget_write(token) -> None:
    _due_write.reset(token)


def take_due_write() -> DueWrite | None:
    """The request's due write, now marked taken: the caller queues its step in
    the transaction it is about to send (and clears `taken` if that rolls back)."""
    due = _due_write.get()
    if due is None or due.taken:
        return None
    due.taken = True
    return due


def queue_due_write(connection):
    """Queue the due write's step in `connection`'s first transaction, with the
    user's binding (tenancy calls this); return the check of its verdict."""
    due = take_due_write()
    if due is None:
        return None
    return queue_take(connection, due.user_id, due.limit, WRITES).check


def take_write_if_due(engine) -> None:
    """Count a write that opened no transaction (or whose transaction rolled back)."""
    due = take_due_write()
    if due is not None:
        take_write(engine, due.user_id, due.limit)
