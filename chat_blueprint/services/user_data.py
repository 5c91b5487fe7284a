"""The user's data: which tables hold it, what the export leaves out, and its
erasure (no Flask here; the export itself is services/export.py).

`erase_user` deletes every row of one user in every table that has a
`user_id` column, under row-level security, in batches: each batch is a
short transaction of its own under DATABASE_STATEMENT_TIMEOUT_S, so a user
with millions of messages is erased as surely as one with ten. The tables are
read from the schema at each call, so a table added later is erased without a
change here. A failure part way (a timeout, the database gone) leaves fewer
rows than before, never an inconsistent user: a repeat goes on from there.
"""
from __future__ import annotations

from dataclasses import dataclass
from graphlib import TopologicalSorter

from psycopg import sql
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from ..db import tenancy
from ..errors import ApiError

ERASE_BATCH_ROWS = 5_000
# Passes over every table: the last must find nothing left. A second pass finds
# only rows written while the first ran (a turn in flight); more, a user still writing.
ERASE_PASSES = 3

EXPORTED_TABLES = ("task", "conversation", "message")
NOT_EXPORTED = {
    "idempotency_key": "request fingerprints and copies of answers whose messages the export holds; "
                       "they expire after IDEMPOTENCY_TTL_S",
    "chat_rate_limit": "one timestamp of rate-limit state, nothing the user wrote",
    "write_rate_limit": "one timestamp of rate-limit state, nothing the user wrote",
    "export_rate_limit": "one timestamp of rate-limit state, nothing the user wrote",
    "reply_stop": "the random id of a reply a stop was asked for while it was produced; the export holds the "
                  "reply, `stopped`",
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
# delete, whether its columns are all NOT NULL, whether it carries user_id
# to the parent's user_id, and its columns, pair by pair.
FOREIGN_KEYS = """
SELECT child.relname, parent.relname, fk.confdeltype = 'c',
       bool_and(child_column.attnotnull),
       bool_or(child_column.attname = 'user_id' AND parent_column.attname = 'user_id'),
       array_agg(child_column.attname::text ORDER BY k.n), array_agg(parent_column.attname::text ORDER BY k.n)
FROM pg_constraint fk
JOIN pg_namespace n ON n.oid = fk.connamespace AND n.nspname = current_schema()
JOIN pg_class child ON child.oid = fk.conrelid
JOIN pg_class parent ON parent.oid = fk.confrelid
CROSS JOIN LATERAL unnest(fk.conkey, fk.confkey) WITH ORDINALITY AS k(child_attnum, parent_attnum, n)
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
class Cascade:
    """A NOT NULL, ON DELETE CASCADE foreign key that carries `user_id` from
    `child` to `parent`: the child's rows of one parent row are the rows whose
    `child_columns` equal the parent's `parent_columns`."""

    child: str
    parent: str
    child_columns: tuple[str, ...]
    parent_columns: tuple[str, ...]


@dataclass(frozen=True)
class ErasePlan:
    """The order in which to delete a user's rows, read from the schema.

    `order` holds every table with a `user_id`, each one before the tables its
    foreign keys point to (so a key without ON DELETE CASCADE never blocks a
    delete). A table in `cascaded` needs no pass of its own: it is tied to its
    parent by a Cascade, and its rows are deleted parent by parent, through
    that key, just before their parents (message: it has no `user_id` index,
    its key is (conversation_id, id)), so no statement cascades to millions.
    """

    order: tuple[str, ...]
    cascades: tuple[Cascade, ...]

    @property
    def cascaded(self) -> frozenset[str]:
        return frozenset(cascade.child for cascade in self.cascades)

    @property
    def statements(self) -> tuple[str, ...]:
        """The tables erased by `user_id`, children first."""
        return tuple(name for name in self.order if name not in self.cascaded)

    def cascades_into(self, parent: str) -> tuple[Cascade, ...]:
        return tuple(cascade for cascade in self.cascades if cascade.parent == parent)


def erase_plan(connection: Connection) -> ErasePlan:
    tables = set(user_tables(connection))
    referenced_by = {name: set() for name in tables}
    cascades = []
    for child, parent, cascading, not_null, by_user, child_columns, parent_columns in connection.execute(
            text(FOREIGN_KEYS)):
        if child == parent or child not in tables or parent not in tables:
            continue
        referenced_by[parent].add(child)
        if cascading and not_null and by_user:
            cascades.append(Cascade(child, parent, tuple(child_columns), tuple(parent_columns)))
    order = tuple(TopologicalSorter(referenced_by).static_order())
    return ErasePlan(order, tuple(sorted(cascades, key=lambda cascade: (cascade.parent, cascade.child))))


class ErasureIncomplete(ApiError):
    def __init__(self):
        super().__init__(503, "erasure_incomplete", "rows of this user were still being written while they were "
                         "erased; retry once its requests have ended", headers={"Retry-After": "5"})


# Up to `limit` of the user's rows of a table, by physical address: any table,
# whatever its key, through its `user_id` index.
DELETE_ROWS = """
DELETE FROM {table} WHERE user_id = %(user_id)s
AND ctid = ANY(ARRAY(SELECT ctid FROM {table} WHERE user_id = %(user_id)s LIMIT %(limit)s))
"""
PARENT_ROWS = "SELECT ctid::text FROM {table} WHERE user_id = %(user_id)s LIMIT %(limit)s"
DELETE_PARENTS = "DELETE FROM {table} WHERE user_id = %(user_id)s AND ctid = ANY(%(parents)s::tid[])"
# Up to `limit` child rows of the chosen parent rows, through the child's key,
# parent by parent (a lateral), so a parent with millions of rows and a
# thousand parents of one row each both take one statement a batch.
DELETE_CHILDREN = """
DELETE FROM {child} WHERE user_id = %(user_id)s AND ctid = ANY(ARRAY(
    SELECT c.ctid FROM {parent} p
    CROSS JOIN LATERAL (SELECT c.ctid FROM {child} c WHERE {join} LIMIT %(limit)s) c
    WHERE p.ctid = ANY(%(parents)s::tid[]) AND p.user_id = %(user_id)s
    LIMIT %(limit)s))
"""


def erase_user(engine: Engine, user_id: str, batch_rows: int | None = None) -> None:
    """Delete every row of `user_id` in every table with a `user_id`, at most
    `batch_rows` (ERASE_BATCH_ROWS) rows a statement, each statement a
    transaction of its own bound to that user (the policies stand behind every
    one). Returns once a whole pass found nothing left; erasing twice is harmless."""
    batch_rows = batch_rows or ERASE_BATCH_ROWS
    with engine.connect() as connection:
        plan = erase_plan(connection)
    for _ in range(ERASE_PASSES):
        erased = sum(_erase_table(engine, user_id, plan, name, batch_rows) for name in plan.statements)
        if erased == 0:
            return
    raise ErasureIncomplete()


def _erase_table(engine: Engine, user_id: str, plan: ErasePlan, name: str, batch_rows: int) -> int:
    """Every row of the user in table `name`, and before each batch of them
    their rows in its cascaded children; how many rows in all."""
    table = sql.Identifier(name)
    params = {"user_id": user_id, "limit": batch_rows}
    cascades = plan.cascades_into(name)
    if not cascades:
        return _in_batches(engine, user_id, sql.SQL(DELETE_ROWS).format(table=table), params)
    erased = 0
    while True:
        parents = {**params, "parents": [row[0] for row in _run(engine, user_id, sql.SQL(PARENT_ROWS).format(
            table=table), params).rows]}
        erased += sum(_in_batches(engine, user_id, _delete_children(cascade), parents) for cascade in cascades)
        erased += _run(engine, user_id, sql.SQL(DELETE_PARENTS).format(table=table), parents).rowcount
        if len(parents["parents"]) < batch_rows:
            return erased


def _delete_children(cascade: Cascade) -> sql.Composed:
    join = sql.SQL(" AND ").join(
        sql.SQL("c.{} = p.{}").format(sql.Identifier(child_column), sql.Identifier(parent_column))
        for child_column, parent_column in zip(cascade.child_columns, cascade.parent_columns))
    return sql.SQL(DELETE_CHILDREN).format(child=sql.Identifier(cascade.child),
                                           parent=sql.Identifier(cascade.parent), join=join)


def _in_batches(engine: Engine, user_id: str, statement: sql.Composed, params: dict) -> int:
    """Run `statement`, which deletes up to `params["limit"]` rows, until it
    deletes fewer (none of its rows are left then); how many in all."""
    erased = 0
    while True:
        deleted = _run(engine, user_id, statement, params).rowcount
        erased += deleted
        if deleted < params["limit"]:
            return erased


@dataclass(frozen=True)
class _Done:
    rowcount: int
    rows: list


# A bitmap scan cannot stop at a LIMIT: each batch of a conversation's messages
# would read the whole conversation's index. An index scan stops at the batch.
NO_BITMAP_SCANS = "SELECT set_config('enable_bitmapscan', 'off', true)"


def _run(engine: Engine, user_id: str, statement: sql.Composed, params: dict) -> _Done:
    """One statement in a transaction of its own as `user_id` (one round trip)."""
    with tenancy.transaction(engine, user_id) as connection:
        connection.cursor().execute(NO_BITMAP_SCANS)
        cursor = connection.cursor()
        cursor.execute(statement, params)
        connection.commit()
        return _Done(cursor.rowcount, cursor.fetchall() if cursor.description else [])
