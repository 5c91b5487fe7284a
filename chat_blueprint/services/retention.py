"""Retention: expired idempotency keys, idle rate-limit rows and the stops of
replies whose producer died, across users,
through the SECURITY DEFINER functions of policies/prune.sql (run as the
owner, or a role it granted EXECUTE; the app role cannot call them)."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Engine

from .turns import STALE_GRACE_S

PRUNE_KEYS = text("SELECT prune_idempotency_keys(:ttl_s, :batch_size)")
PRUNE_RATE_LIMITS = tuple(text(f"SELECT deleted, last_user_id FROM {function}(:after, :batch_size)")
                          for function in ("prune_chat_rate_limits", "prune_write_rate_limits",
                                           "prune_export_rate_limits"))
PRUNE_STOPS = text("SELECT prune_reply_stops(:older_than_s, :batch_size)")


class TtlTooShort(ValueError):
    """A TTL under which a key could be deleted while its request still runs."""


@dataclass(frozen=True)
class Pruned:
    idempotency_keys: int
    rate_limits: int
    reply_stops: int


def shortest_ttl_s(assistant_timeout_s: float) -> float:
    """The shortest key TTL prune accepts: the app's stale bound. A `running`
    key that moved more recently may belong to a turn still answering, and
    deleting it would let a repeat of that request run the turn again."""
    return assistant_timeout_s + STALE_GRACE_S


def prune(engine: Engine, ttl_s: int, batch_size: int, assistant_timeout_s: float) -> Pruned:
    """Delete idempotency keys older than `ttl_s`, rate-limit rows that no
    longer limit anything, and stops older than the app's stale bound (their
    producer has ended or died), `batch_size` rows per transaction, so no lock
    or transaction grows with the tables. A key still `running` stays until it
    has not moved for `ttl_s` either, and a `ttl_s` shorter than the app's stale
    bound is refused (TtlTooShort) before anything is deleted. Needs a role
    that may execute the prune functions (the owner, or one it granted EXECUTE to)."""
    stale_s = shortest_ttl_s(assistant_timeout_s)
    if ttl_s < stale_s:
        raise TtlTooShort(f"IDEMPOTENCY_TTL_S={ttl_s} is shorter than ASSISTANT_TIMEOUT_S + {STALE_GRACE_S} s "
                          f"({stale_s:g} s): a key that young may belong to a turn "
                          "still running; give prune the app's values")
    rate_limits = 0
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        keys = _in_batches(connection, PRUNE_KEYS, {"ttl_s": ttl_s, "batch_size": batch_size}, batch_size)
        for prune_rate_limits in PRUNE_RATE_LIMITS:
            after = ""
            while after is not None:
                deleted, after = connection.execute(prune_rate_limits, {"after": after, "batch_size": batch_size}).one()
                rate_limits += deleted
        stops = _in_batches(connection, PRUNE_STOPS, {"older_than_s": stale_s, "batch_size": batch_size}, batch_size)
    return Pruned(keys, rate_limits, stops)


def _in_batches(connection, statement, params: dict, batch_size: int) -> int:
    """Call a prune function that deletes one batch until a batch comes back short; the rows deleted."""
    total = 0
    while True:
        deleted = connection.scalar(statement, params)
        total += deleted
        if deleted < batch_size:
            return total
