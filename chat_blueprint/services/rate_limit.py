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
"""
from __future__ import annotations

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
    commit does not wait for the disk), or raise RateLimited. A write refused
    later (404, 422) stays counted."""
    with tenancy.transaction(engine, user_id) as connection:
        connection.cursor().execute(NO_FLUSH_WAIT)
        pending = queue_take(connection, user_id, limit, WRITES)
        connection.commit()
        pending.check()
