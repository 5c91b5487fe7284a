"""The user's data: which tables hold it, what the export leaves out, and its
erasure (no Flask here; the export itself is services/export.py).

- `erase_user`: deletes every row of one user in every table that has a
  `user_id` column, in one transaction, under row-level security. The tables
  are read from the schema at each call, so a table added later is erased
  without a change here.
"""
from __future__ import annotations

from dataclasses import dataclass
from graphlib import TopologicalSorter

from sqlalchemy import column, delete, table, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

EXPORTED_TABLES = ("task", "conversation", "message")
NOT_EXPORTED = {
    "idempotency_key": "request fingerprints and copies of answers whose messages the export holds; "
                       "they expire after IDEMPOTENCY_TTL_S",
    "chat_rate_limit": "one timestamp of rate-limit state, nothing the user wrote",
    "write_rate_limit": "one timestamp of rate-limit state, nothing the user wrote",
    "export_rate_limit": "one timestamp of rate-limit state, nothing the user wrote",
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
