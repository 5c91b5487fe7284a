"""The per-user chat rate limit, kept in PostgreSQL so every instance shares it.

GCRA (the generic cell rate algorithm): one row per user holds the
theoretical arrival time `tat`. A turn is admitted when moving `tat` one
emission interval later keeps it within one period of now; the row lock
serialises a user's concurrent turns on every instance. Runs inside the
caller's transaction (the first transaction of a turn), so a refused turn
stores nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from .errors import ApiError

# No row returned: limited.
TAKE_TURN = """
INSERT INTO chat_rate_limit AS state (user_id, tat)
VALUES (%(user_id)s, now() + %(interval)s)
ON CONFLICT (user_id) DO UPDATE
SET tat = greatest(state.tat, now()) + %(interval)s
WHERE greatest(state.tat, now()) + %(interval)s <= now() + %(period)s
RETURNING tat
"""

RETRY_AFTER = """
SELECT greatest(1, ceil(extract(epoch FROM greatest(tat, now()) + %(interval)s - now() - %(period)s)))::int
FROM chat_rate_limit WHERE user_id = %(user_id)s
"""


class RateLimited(ApiError):
    def __init__(self, retry_after_s: int):
        super().__init__(429, "rate_limited", "too many chat turns; retry later",
                         headers={"Retry-After": str(retry_after_s)}, retry_after=retry_after_s)


@dataclass(frozen=True)
class RateLimit:
    """At most `turns` chat turns per `period_s` seconds per user, in bursts of up to `turns`."""

    turns: int
    period_s: int

    @property
    def params(self) -> dict:
        return {"interval": timedelta(seconds=self.period_s / self.turns), "period": timedelta(seconds=self.period_s)}


def take_turn(connection, user_id: str, limit: RateLimit) -> None:
    """Count one turn against `limit` in `connection`'s transaction, or raise RateLimited."""
    params = {"user_id": user_id, **limit.params}
    taken = connection.cursor()
    taken.execute(TAKE_TURN, params)
    if taken.fetchone() is None:
        retry_after = connection.cursor()
        retry_after.execute(RETRY_AFTER, params)
        raise RateLimited(retry_after.fetchone()[0])
