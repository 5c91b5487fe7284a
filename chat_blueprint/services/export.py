"""The export of a user's data: every row of one user as one JSON document
(the shape of `schemas.ExportSchema`), no Flask here.

An export never holds a database connection at its client's pace:

1. `ExportGate.admit`: a slot of this process (at most EXPORT_CONCURRENCY
   exports on disk at once, one per user), else 503 / 429;
2. `take_export`: one GCRA step against EXPORT_RATE_LIMIT, shared by every
   instance (the table export_rate_limit), else 429;
3. `spool`: under the gate's `reading` lock (one export reads from the
   database at a time per process), one read-only snapshot is written to an
   anonymous temporary file at database speed, a batch at a time (so memory
   stays flat), up to EXPORT_MAX_BYTES (else 507); then the transaction ends
   and the connection goes back to the pool;
4. `SpooledExport`: the file, sent at whatever pace the client reads, with its
   Content-Length; `close()` deletes it and frees the slot.

A slow client costs a file descriptor, disk and a slot, never a connection or
a snapshot that holds back vacuum. What it costs instead: the time to first
byte is the time to read the whole export (docs/operations.md).
"""
from __future__ import annotations

import json
import tempfile
import threading
import weakref
from contextlib import closing
from dataclasses import dataclass
from typing import IO, Callable, Iterator

from psycopg.rows import dict_row
from sqlalchemy.engine import Engine

from ..db import tenancy
from ..db.models import CURRENT_STATUS_SQL
from ..errors import ApiError
from ..schemas import ConversationSchema, ExportSchema, MessageSchema, TaskSchema
from . import rate_limit

EXPORT_BATCH_ROWS = 500
EXPORT_CHUNK_CHARS = 64 * 1024
SEND_CHUNK_BYTES = 64 * 1024
BUSY_RETRY_AFTER_S = 30
# The last guard: a spool whose transaction sits idle this long (it never should:
# it only writes a batch to a local file between two fetches) is ended by the server.
IDLE_IN_TRANSACTION_MS = 10_000

EXPORTS = rate_limit.Bucket("export_rate_limit", "exports")


class ExportTooLarge(ApiError):
    def __init__(self, max_bytes: int):
        super().__init__(507, "export_too_large", f"the export is larger than this server's limit of {max_bytes} "
                         "bytes (EXPORT_MAX_BYTES); the operator can raise it")


class ExportsBusy(ApiError):
    def __init__(self):
        super().__init__(503, "exports_busy", "too many exports are being sent by this server; retry later",
                         headers={"Retry-After": str(BUSY_RETRY_AFTER_S)})


class ExportInProgress(ApiError):
    def __init__(self):
        super().__init__(429, "export_in_progress", "an export of this user is still being sent; retry once it ends",
                         headers={"Retry-After": str(BUSY_RETRY_AFTER_S)}, retry_after=BUSY_RETRY_AFTER_S)


class ExportGate:
    """The exports of one process: at most `max_exports` on disk at once, one
    per user, and one at a time reading from the database (`reading`), so that
    exports never take more than one of a worker's pooled connections."""

    def __init__(self, max_exports: int):
        self.max_exports = max_exports
        self.reading = threading.Lock()
        self._users: set[str] = set()
        self._lock = threading.Lock()

    def admit(self, user_id: str) -> Callable[[], None]:
        """Take a slot for `user_id`; returns the function that frees it."""
        with self._lock:
            if user_id in self._users:
                raise ExportInProgress()
            if len(self._users) >= self.max_exports:
                raise ExportsBusy()
            self._users.add(user_id)
        return lambda: self._release(user_id)

    def _release(self, user_id: str) -> None:
        with self._lock:
            self._users.discard(user_id)


@dataclass(frozen=True)
class ExportLimits:
    rate: rate_limit.RateLimit | None
    max_bytes: int
    batch_rows: int = EXPORT_BATCH_ROWS


def take_export(engine: Engine, user_id: str, limit: rate_limit.RateLimit) -> None:
    """Count one export against `limit` in a transaction of its own (one round trip), or raise RateLimited."""
    with tenancy.transaction(engine, user_id) as connection:
        pending = rate_limit.queue_take(connection, user_id, limit, EXPORTS)
        connection.commit()
        pending.check()


def open_export(engine: Engine, gate: ExportGate, user_id: str, limits: ExportLimits) -> SpooledExport:
    """Admit, count and spool the export of `user_id`; every refusal (429,
    503, 507) and every database failure comes here, before a status is sent."""
    release = gate.admit(user_id)
    try:
        if limits.rate is not None:
            take_export(engine, user_id, limits.rate)
        with gate.reading:
            spooled, size = spool(engine, user_id, limits.max_bytes, limits.batch_rows)
    except BaseException:
        release()
        raise
    return SpooledExport(spooled, size, release)


def spool(engine: Engine, user_id: str, max_bytes: int, batch_rows: int = EXPORT_BATCH_ROWS) -> tuple[IO[bytes], int]:
    """The whole document in an anonymous temporary file (deleted when closed,
    or when the process dies), rewound, and its size. The snapshot's
    transaction ends before this returns, however it ends."""
    spooled = tempfile.TemporaryFile()
    size = 0
    try:
        with closing(_export_chunks(engine, user_id, batch_rows)) as chunks:
            for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise ExportTooLarge(max_bytes)
                spooled.write(chunk)
        spooled.seek(0)
    except BaseException:
        spooled.close()
        raise
    return spooled, size


class SpooledExport:
    """A spooled export as a WSGI response body: the file in chunks, at the
    client's pace. The last chunk handed out, or `close()` (the server ends
    the response, or the client went away), deletes the file and frees the
    gate's slot, once."""

    def __init__(self, spooled: IO[bytes], size: int, release: Callable[[], None]):
        self.size = size
        self._file = spooled
        # Called once: by close(), or when the body is dropped unclosed (a
        # server that never calls close() would otherwise hold the slot forever).
        self._done = weakref.finalize(self, _finish, spooled, release)

    def __iter__(self) -> Iterator[bytes]:
        while not self._file.closed and (chunk := self._file.read(SEND_CHUNK_BYTES)):
            yield chunk
        self.close()

    def close(self) -> None:
        self._done()


def _finish(spooled: IO[bytes], release: Callable[[], None]) -> None:
    spooled.close()
    release()


# The document

TASKS = "SELECT * FROM task WHERE user_id = %(user_id)s ORDER BY created_at DESC, id DESC"
CONVERSATIONS = "SELECT * FROM conversation WHERE user_id = %(user_id)s ORDER BY updated_at DESC, id DESC"
# A keyset over the (conversation_id, id) primary key, one batch at a time.
MESSAGES = f"""
SELECT *, {CURRENT_STATUS_SQL} AS current_status FROM message
WHERE conversation_id = %(conversation_id)s AND user_id = %(user_id)s AND id > %(after)s
ORDER BY id LIMIT %(limit)s
"""
# The rows are read with SELECT *: the schemas choose what goes out, so a column
# that gains a field in MessageSchema (or TaskSchema, ConversationSchema) is exported too.
SNAPSHOT_TIME = "SELECT now(), set_config('idle_in_transaction_session_timeout', %s, true)"

export_head_schema = ExportSchema(only=("user_id", "exported_at"))
task_schema = TaskSchema()
conversation_schema = ConversationSchema()
messages_schema = MessageSchema(many=True)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _Buffer:
    """Text waiting to go out, taken in chunks of about EXPORT_CHUNK_CHARS."""

    def __init__(self):
        self.parts: list[str] = []
        self.size = 0

    def add(self, part: str) -> bool:
        """Append `part`; True when a chunk is ready to be taken."""
        self.parts.append(part)
        self.size += len(part)
        return self.size >= EXPORT_CHUNK_CHARS

    def take(self) -> bytes:
        chunk = "".join(self.parts).encode()
        self.parts, self.size = [], 0
        return chunk


def _export_chunks(engine: Engine, user_id: str, batch_rows: int) -> Iterator[bytes]:
    """The document in chunks, read from one REPEATABLE READ snapshot
    (`exported_at` is its time): tasks through a server-side cursor,
    conversations likewise, each one's messages in keyset batches."""
    with tenancy.snapshot(engine, user_id) as connection:
        exported_at = connection.execute(SNAPSHOT_TIME, (str(IDLE_IN_TRANSACTION_MS),)).fetchone()[0]
        head = _json(export_head_schema.dump({"user_id": user_id, "exported_at": exported_at}))
        yield (head[:-1] + ',"tasks":[').encode()
        out = _Buffer()
        params = {"user_id": user_id}
        with connection.cursor(name="export_tasks", row_factory=dict_row) as tasks:
            tasks.itersize = batch_rows
            tasks.execute(TASKS, params)
            for n, row in enumerate(tasks):
                if out.add(("," if n else "") + _json(task_schema.dump(row))):
                    yield out.take()
        out.add('],"conversations":[')
        with connection.cursor(name="export_conversations", row_factory=dict_row) as conversations:
            conversations.itersize = batch_rows
            conversations.execute(CONVERSATIONS, params)
            for n, conversation in enumerate(conversations):
                head = _json(conversation_schema.dump(conversation))
                out.add(("," if n else "") + head[:-1] + ',"messages":[')
                yield from _messages(connection, user_id, conversation["id"], batch_rows, out)
                out.add("]}")
        out.add("]}")
        yield out.take()


def _messages(connection, user_id: str, conversation_id, batch_rows: int, out: _Buffer) -> Iterator[bytes]:
    """The conversation's messages in id order, one keyset batch at a time."""
    params = {"user_id": user_id, "conversation_id": conversation_id, "after": 0, "limit": batch_rows}
    first = True
    with connection.cursor(row_factory=dict_row) as cursor:
        while True:
            rows = cursor.execute(MESSAGES, params).fetchall()
            for message in messages_schema.dump(rows):
                if out.add(("" if first else ",") + _json(message)):
                    yield out.take()
                first = False
            if len(rows) < batch_rows:
                return
            params["after"] = rows[-1]["id"]
