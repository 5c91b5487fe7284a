"""The Idempotency-Key state machine of chat turns.

A key row, one per (user, key), is `running` while its first request runs,
`done` with the whole answer once the reply is stored, and `failed` when the
assistant (or the database) let the turn down. `claim` runs inside the first
transaction of a turn and says what this request is:

    NEW        first use of the key (or the key expired, or its first request
               died before storing anything): store a new user message
    REPLAY     the first request finished: answer its stored response
    RESUME     the first failed, or died after storing its user message
               (`running` for longer than `stale_after_s`): answer that message
    IN_FLIGHT  the first is still running: 409
    REUSED     the key came with another body: 422 (even while running)

The turn records which message the key stored and, with the reply, the
answer, in the same statements that store them (see turns.py), so a key
never says `done` without its reply being stored.
"""
from __future__ import annotations

import enum
import hashlib
import json
import uuid
from dataclasses import dataclass

from ..errors import ApiError

CLAIM_KEY = """
INSERT INTO idempotency_key (user_id, key, request_hash, status)
VALUES (%(user_id)s, %(key)s, %(request_hash)s, 'running')
ON CONFLICT DO NOTHING
RETURNING key
"""

LOCK_KEY = """
SELECT request_hash, status, conversation_id, user_message_id, response,
       created_at < now() - make_interval(secs => %(ttl_s)s) AS expired,
       updated_at < now() - make_interval(secs => %(stale_after_s)s) AS stale
FROM idempotency_key WHERE user_id = %(user_id)s AND key = %(key)s
FOR UPDATE
"""

RENEW_KEY = """
UPDATE idempotency_key
SET request_hash = %(request_hash)s, status = 'running', conversation_id = NULL, user_message_id = NULL,
    response = NULL, created_at = now(), updated_at = now()
WHERE user_id = %(user_id)s AND key = %(key)s
"""

RESTART_KEY = """
UPDATE idempotency_key SET status = 'running', updated_at = now()
WHERE user_id = %(user_id)s AND key = %(key)s
"""

FAIL_KEY = """
UPDATE idempotency_key SET status = 'failed', updated_at = now()
WHERE user_id = %(user_id)s AND key = %(key)s AND status = 'running'
"""


# How often a claim retries when the key it found vanished before it was locked.
CLAIM_ATTEMPTS = 3


class IdempotencyKeyReused(ApiError):
    def __init__(self):
        super().__init__(422, "idempotency_key_reused",
                         "this Idempotency-Key was used with a different request body")


class IdempotencyKeyInFlight(ApiError):
    def __init__(self):
        super().__init__(409, "idempotency_key_in_flight",
                         "the first request with this Idempotency-Key is still running; retry later",
                         headers={"Retry-After": "1"})


@dataclass(frozen=True)
class IdempotencyClaim:
    """An `Idempotency-Key` with the fingerprint of the request it came with."""

    key: str
    request_hash: str
    stale_after_s: float
    ttl_s: int

    @classmethod
    def of(cls, key: str, message: str | None, conversation_id: uuid.UUID | None, *, stale_after_s: float,
           ttl_s: int, **what):
        """The fingerprint covers what the turn stores, not how it is delivered
        (`stream`); `what` adds what else it does (a rewrite)."""
        body = json.dumps({"message": message, "conversation_id": str(conversation_id) if conversation_id else None,
                           **what}, sort_keys=True)
        return cls(key, hashlib.sha256(body.encode()).hexdigest(), stale_after_s, ttl_s)


class KeyState(enum.Enum):
    NEW = "new"
    REPLAY = "replay"
    RESUME = "resume"
    IN_FLIGHT = "in_flight"
    REUSED = "reused"


@dataclass(frozen=True)
class KeyOutcome:
    state: KeyState
    response: dict | None = None  # REPLAY: the stored answer
    conversation_id: uuid.UUID | None = None  # RESUME: the stored user message
    user_message_id: int | None = None

    def refuse(self) -> None:
        """Raise the client error of IN_FLIGHT and REUSED; nothing for the others."""
        if self.state is KeyState.IN_FLIGHT:
            raise IdempotencyKeyInFlight()
        if self.state is KeyState.REUSED:
            raise IdempotencyKeyReused()


NEW = KeyOutcome(KeyState.NEW)


def claim(connection, user_id: str, key_claim: IdempotencyClaim) -> KeyOutcome:
    """Claim `key_claim.key` for this request inside `connection`'s transaction.

    A fresh key costs one statement; a known key is locked (`FOR UPDATE`), so
    two retries of one key never both resume it.
    """
    params = {"user_id": user_id, "key": key_claim.key, "request_hash": key_claim.request_hash,
              "ttl_s": key_claim.ttl_s, "stale_after_s": key_claim.stale_after_s}
    for _ in range(CLAIM_ATTEMPTS):
        claimed = connection.cursor()
        claimed.execute(CLAIM_KEY, params)
        if claimed.fetchone() is not None:
            return NEW
        locked = connection.cursor()
        locked.execute(LOCK_KEY, params)
        row = locked.fetchone()
        if row is not None:
            break
        # The row the insert ran into was deleted before it could be locked
        # (a purge of expired keys): the key is free again, claim it anew.
    else:
        return KeyOutcome(KeyState.IN_FLIGHT)
    request_hash, status, conversation_id, user_message_id, response, expired, stale = row
    if expired:
        connection.cursor().execute(RENEW_KEY, params)
        return NEW
    if request_hash != key_claim.request_hash:
        return KeyOutcome(KeyState.REUSED)
    if status == "done":
        return KeyOutcome(KeyState.REPLAY, response=response)
    if status == "running" and not stale:
        return KeyOutcome(KeyState.IN_FLIGHT)
    connection.cursor().execute(RESTART_KEY, params)
    if user_message_id is None:
        return NEW
    return KeyOutcome(KeyState.RESUME, conversation_id=conversation_id, user_message_id=user_message_id)


def fail(connection, user_id: str, key: str) -> None:
    """Mark a running key failed, so a retry may answer its stored message at once."""
    connection.cursor().execute(FAIL_KEY, {"user_id": user_id, "key": key})
