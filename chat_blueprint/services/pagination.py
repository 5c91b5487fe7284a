"""Keyset pages and their cursors: the one place cursors are written and read.

A cursor is the unpadded base64url of a compact JSON array holding the sort
key of the last row of a page. It is opaque to clients, and a client can send
anything back: each decoder accepts exactly what its encoder writes (the right
number of values, of the right types, in range) and answers anything else with
`InvalidCursor`, a 422, never another exception. Cursors are not signed: a
forged one can only move a user's own page, since every query it feeds is
filtered by the user and by row-level security.

- conversations, pinned first, then most recently updated first:
  `[pinned, updated_at, id]` (a boolean, ISO 8601 with an offset, a UUID
  string). A cursor written before pinning existed, `[updated_at, id]`, is
  still read, as a position among the unpinned: it was written when none was;
- messages, in id order either way: `[id]`;
- tasks, newest first: `[created_at, id]` (ISO 8601 with an offset, integer).
"""
from __future__ import annotations

import base64
import binascii
import json
import uuid
from datetime import datetime, timezone
from typing import Callable, Sequence, TypeVar

from ..db.models import BIGINT_MAX
from ..errors import ApiError, invalid_fields

Row = TypeVar("Row")


class InvalidCursor(ApiError):
    """A cursor this API did not write: the usual 422, naming `cursor`."""

    def __init__(self):
        error = invalid_fields({"cursor": ["Not a cursor returned by this API."]})
        super().__init__(error.status, error.code, error.message, **error.extra)


def keyset_page(rows: Sequence[Row], limit: int, cursor_of: Callable[[Row], str]) -> tuple[list[Row], str | None]:
    """The page of `rows` (fetched with `limit + 1` so the extra row says more
    follow) and the cursor of the next page, from its last row (None on the last)."""
    page = list(rows[:limit])
    return page, (cursor_of(page[-1]) if len(rows) > limit else None)


def _encode(*values) -> str:
    return base64.urlsafe_b64encode(json.dumps(values, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode(cursor: str, *arities: int) -> list:
    """The JSON array of values a cursor holds, as many as one of `arities`."""
    if not isinstance(cursor, str):
        raise InvalidCursor()
    try:
        values = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, TypeError, binascii.Error, RecursionError):
        raise InvalidCursor() from None
    if not isinstance(values, list) or len(values) not in arities:
        raise InvalidCursor()
    return values


def _row_id(value) -> int:
    """A bigint id (a JSON integer, not a boolean, within bigint's range)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= BIGINT_MAX:
        raise InvalidCursor()
    return value


def _timestamp(value) -> datetime:
    """An ISO 8601 time with an offset, as a UTC datetime."""
    if not isinstance(value, str):
        raise InvalidCursor()
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None or moment.utcoffset() is None:
            raise InvalidCursor()
        return moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise InvalidCursor() from None


def _uuid(value) -> uuid.UUID:
    if not isinstance(value, str):
        raise InvalidCursor()
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidCursor() from None


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


def _flag(value) -> bool:
    if not isinstance(value, bool):
        raise InvalidCursor()
    return value


def encode_conversation(pinned: bool, updated_at: datetime, conversation_id: uuid.UUID) -> str:
    return _encode(pinned, _utc_text(updated_at), str(conversation_id))


def decode_conversation(cursor: str) -> tuple[bool, datetime, uuid.UUID]:
    values = _decode(cursor, 3, 2)
    pinned = _flag(values.pop(0)) if len(values) == 3 else False
    updated_at, conversation_id = values
    return pinned, _timestamp(updated_at), _uuid(conversation_id)


def encode_message(message_id: int) -> str:
    return _encode(message_id)


def decode_message(cursor: str) -> int:
    (message_id,) = _decode(cursor, 1)
    return _row_id(message_id)


def encode_task(created_at: datetime, task_id: int) -> str:
    return _encode(_utc_text(created_at), task_id)


def decode_task(cursor: str) -> tuple[datetime, int]:
    created_at, task_id = _decode(cursor, 2)
    return _timestamp(created_at), _row_id(task_id)
