"""The user's data: a copy of it and its erasure (no Flask here).

- `Export`: every row of one user as one JSON document (the shape of
  `schemas.ExportSchema`), read in one snapshot and written out as it is read,
  a batch at a time, so its size does not bound the server's memory. The
  generator that writes it runs after the view has returned, so the user is
  handed to it and bound to its transaction by `tenancy.snapshot`, not taken
  from the request.
- `erase_user`: deletes every row of one user in every table that has a
  `user_id` column, in one transaction, under row-level security. The tables
  are read from the schema at each call, so a table added later is erased
  without a change here.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from graphlib import TopologicalSorter
from typing import Iterator

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import column, delete, table, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from ..db import tenancy
from ..db.models import CURRENT_STATUS_SQL
from ..schemas import ConversationSchema, ExportSchema, MessageSchema, TaskSchema

log = logging.getLogger(__name__)

EXPORT_BATCH_ROWS = 500
EXPORT_CHUNK_CHARS = 64 * 1024

EXPORTED_TABLES = ("task", "conversation", "message")
NOT_EXPORTED = {
    "idempotency_key": "request fingerprints and copies of answers whose messages the export holds; "
                       "they expire after IDEMPOTENCY_TTL_S",
    "chat_rate_limit": "one timestamp of rate-limit state, nothing the user wrote",
    "write_rate_limit": "one timestamp of rate-limit state, nothing the user wrote",
}
"""Tables with a `user_id` that the export leaves out, and why. Every such
table is either exported or named here: `unexported_tables` reports the rest
and a test holds it empty, so a new table cannot be forgotten silently."""

# Every ordinary or partitioned table with a user_id column in the schema the
# app's tables live in (the first schema of the search path).
USER_TABLES = """
SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = current_schema()
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'user_id' AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname
"""

# The foreign keys between tables of that schema: whether each cascades on
# delete, whether its columns are all NOT NULL, and whether it carries user_id
# to the parent's user_id.
FOREIGN_KEYS = """
SELECT child.relname, parent.relname, fk.confdeltype = 'c',
       bool_and(child_column.attnotnull),
       bool_or(child_column.attname = 'user_id' AND parent_column.attname = 'user_id')
FROM pg_constraint fk
JOIN pg_namespace n ON n.oid = fk.connamespace AND n.nspname = current_schema()
JOIN pg_class child ON child.oid = fk.conrelid
JOIN pg_class parent ON parent.oid = fk.confrelid
CROSS JOIN LATERAL unnest(fk.conkey, fk.confkey) AS k(child_attnum, parent_attnum)
JOIN pg_attribute child_column ON child_column.attrelid = fk.conrelid AND child_column.attnum = k.child_attnum
JOIN pg_attribute parent_column ON parent_column.attrelid = fk.confrelid AND parent_column.attnum = k.parent_attnum
WHERE fk.contype = 'f'
GROUP BY fk.oid, child.relname, parent.relname, fk.confdeltype
"""


def user_tables(connection: Connection) -> list[str]:
    """Every table of the app's schema that has a `user_id` column."""
    return list(connection.scalars(text(USER_TABLES)))


def unexported_tables(connection: Connection) -> list[str]:
    """Tables with a `user_id` that the export neither holds nor names in NOT_EXPORTED."""
    return [name for name in user_tables(connection) if name not in EXPORTED_TABLES and name not in NOT_EXPORTED]


# Erasure


@dataclass(frozen=True)
class ErasePlan:
    """The order in which to delete a user's rows, read from the schema.

    `order` holds every table with a `user_id`, each one before the tables its
    foreign keys point to (so a key without ON DELETE CASCADE never blocks a
    delete). A table in `cascaded` needs no statement of its own: a NOT NULL
    foreign key that carries `user_id` to its parent's `user_id` deletes its
    rows with their parent's, which saves a scan of a table that has no
    `user_id` index (message: its key is (conversation_id, id)).
    """

    order: tuple[str, ...]
    cascaded: frozenset[str]

    @property
    def statements(self) -> tuple[str, ...]:
        return tuple(name for name in self.order if name not in self.cascaded)


def erase_plan(connection: Connection) -> ErasePlan:
    tables = set(user_tables(connection))
    referenced_by = {name: set() for name in tables}
    cascaded = set()
    for child, parent, cascades, not_null, by_user in connection.execute(text(FOREIGN_KEYS)):
        if child == parent or child not in tables or parent not in tables:
            continue
        referenced_by[parent].add(child)
        if cascades and not_null and by_user:
            cascaded.add(child)
    order = tuple(TopologicalSorter(referenced_by).static_order())
    return ErasePlan(order, frozenset(cascaded))


def erase_user(session: Session, user_id: str) -> None:
    """Delete every row of `user_id` in every table with a `user_id`, in one
    transaction bound to that user (the Session hook binds it), so the
    policies stand behind every statement. Erasing twice is harmless."""
    with session.begin():
        connection = session.connection()
        for name in erase_plan(connection).statements:
            rows = table(name, column("user_id"))
            connection.execute(delete(rows).where(rows.c.user_id == user_id))


# Export

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

export_head_schema = ExportSchema(only=("user_id", "exported_at"))
task_schema = TaskSchema()
conversation_schema = ConversationSchema()
messages_schema = MessageSchema(many=True)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _Buffer:
    """Text waiting to go out, sent in chunks of about EXPORT_CHUNK_CHARS."""

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
    with tenancy.snapshot(engine, user_id) as connection:
        exported_at = connection.execute("SELECT now()").fetchone()[0]
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


class Export:
    """The export of one user, as a WSGI response body.

    Creating it opens the transaction and binds the user, so a database that
    is down or a pool that is exhausted fails here, while the view can still
    answer 503; after the first byte the status line is gone. Iterating it
    writes the document; `close()` (called by the server when the response
    ends or the client goes away) ends the transaction and frees the
    connection.
    """

    def __init__(self, engine: Engine, user_id: str, batch_rows: int = EXPORT_BATCH_ROWS):
        self._chunks = _export_chunks(engine, user_id, batch_rows)
        self._head = next(self._chunks)

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        try:
            yield from self._chunks
        except psycopg.Error as exc:
            log.warning("export interrupted by a database error: %s", type(exc).__name__)
            raise

    def close(self) -> None:
        self._chunks.close()
