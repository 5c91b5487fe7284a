"""Row-level security, proven in SQL with the app bypassed: raw psycopg
connections as the app role (and the owner), with and without app.user_id."""
from __future__ import annotations

import uuid

import psycopg
import pytest
from support import connect
from psycopg import errors

TABLES = ("conversation", "message", "task", "idempotency_key", "chat_rate_limit", "write_rate_limit")


def seed(url: str, user_id: str) -> dict:
    """One conversation with one message, one task and one key for `user_id`."""
    with connect(url, user_id) as conn:
        conversation_id = conn.execute(
            "insert into conversation (user_id, title) values (%s, 'hello') returning id", (user_id,)).fetchone()[0]
        message_id = conn.execute(
            "insert into message (conversation_id, user_id, role, content, turn) values (%s, %s, 'user', 'hi', 1)"
            " returning id", (conversation_id, user_id)).fetchone()[0]
        task_id = conn.execute("insert into task (user_id, title) values (%s, 'milk') returning id",
                               (user_id,)).fetchone()[0]
        conn.execute("insert into idempotency_key (user_id, key, request_hash, status) values (%s, 'k', 'h', 'done')",
                     (user_id,))
        conn.execute("insert into chat_rate_limit (user_id, tat) values (%s, now())", (user_id,))
        conn.execute("insert into write_rate_limit (user_id, tat) values (%s, now())", (user_id,))
    return {"conversation": conversation_id, "message": message_id, "task": task_id}


@pytest.fixture
def two_users(app_url):
    a, b = f"a-{uuid.uuid4().hex[:8]}", f"b-{uuid.uuid4().hex[:8]}"
    return a, seed(app_url, a), b, seed(app_url, b)


def count_rows(conn, table: str) -> int:
    return conn.execute(f"select count(*) from {table}").fetchone()[0]


def test_app_role_is_not_privileged(app_url):
    with connect(app_url) as conn:
        row = conn.execute("select rolsuper, rolbypassrls from pg_roles where rolname = current_user").fetchone()
        owners = conn.execute(
            "select count(*) from pg_tables where tablename = any(%s) and tableowner = current_user",
            (list(TABLES),)).fetchone()[0]
    assert row == (False, False)
    assert owners == 0


def test_tables_have_rls_enabled_and_forced(app_url):
    with connect(app_url) as conn:
        rows = conn.execute("select relname, relrowsecurity, relforcerowsecurity from pg_class"
                            " where relname = any(%s) and relkind = 'r'", (list(TABLES),)).fetchall()
    assert sorted(rows) == sorted((table, True, True) for table in TABLES)


@pytest.mark.parametrize("table", TABLES)
def test_unset_user_sees_nothing(app_url, two_users, table):
    with connect(app_url) as conn:
        assert count_rows(conn, table) == 0


def test_empty_user_setting_sees_nothing(app_url, two_users):
    with connect(app_url, "") as conn:
        assert [count_rows(conn, table) for table in TABLES] == [0] * len(TABLES)


def test_unset_user_cannot_insert(app_url):
    with connect(app_url) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute("insert into task (user_id, title) values ('anyone', 'x')")


@pytest.mark.parametrize("table", TABLES)
def test_user_sees_only_own_rows(app_url, two_users, table):
    a, _, b, _ = two_users
    with connect(app_url, a) as conn:
        owners = {row[0] for row in conn.execute(f"select user_id from {table}")}
    assert owners == {a}


def test_updates_and_deletes_of_other_users_rows_touch_nothing(app_url, owner_url, two_users):
    a, _, b, b_rows = two_users
    with connect(app_url, a) as conn:
        assert conn.execute("update task set title = 'stolen' where id = %s", (b_rows["task"],)).rowcount == 0
        assert conn.execute("update conversation set title = 'stolen' where id = %s",
                            (b_rows["conversation"],)).rowcount == 0
        assert conn.execute("delete from message where id = %s", (b_rows["message"],)).rowcount == 0
        assert conn.execute("delete from conversation where id = %s", (b_rows["conversation"],)).rowcount == 0
        assert conn.execute("delete from task where user_id = %s", (b,)).rowcount == 0
    with connect(app_url, b) as conn:
        assert conn.execute("select title from task where id = %s", (b_rows["task"],)).fetchone() == ("milk",)
        assert count_rows(conn, "message") == 1
        assert count_rows(conn, "conversation") == 1


def test_inserting_a_row_for_another_user_fails(app_url, two_users):
    a, _, b, _ = two_users
    with connect(app_url, a) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute("insert into task (user_id, title) values (%s, 'planted')", (b,))


def test_re_owning_a_row_fails(app_url, two_users):
    a, a_rows, b, _ = two_users
    with connect(app_url, a) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute("update task set user_id = %s where id = %s", (b, a_rows["task"]))


def test_message_cannot_join_another_users_conversation(app_url, two_users):
    """B writes a row with B's own user_id (passing RLS) into A's conversation:
    the composite foreign key refuses it, although FK checks ignore RLS."""
    a, a_rows, b, _ = two_users
    with connect(app_url, b) as conn, pytest.raises(errors.ForeignKeyViolation):
        conn.execute("insert into message (conversation_id, user_id, role, content, turn)"
                     " values (%s, %s, 'user', 'intrusion', 1)", (a_rows["conversation"], b))


def test_reply_cannot_point_into_another_conversation(app_url, two_users):
    a, a_rows, _, _ = two_users
    with connect(app_url, a) as conn:
        other = conn.execute("insert into conversation (user_id, title) values (%s, 'other') returning id",
                             (a,)).fetchone()[0]
        with pytest.raises(errors.ForeignKeyViolation):
            conn.execute("insert into message (conversation_id, user_id, role, content, reply_to)"
                         " values (%s, %s, 'assistant', 'misplaced', %s)", (other, a, a_rows["message"]))


def test_a_user_message_is_answered_at_most_once(app_url, two_users):
    a, a_rows, _, _ = two_users
    reply = ("insert into message (conversation_id, user_id, role, content, reply_to)"
             " values (%s, %s, 'assistant', 'answer', %s)")
    with connect(app_url, a) as conn:
        conn.execute(reply, (a_rows["conversation"], a, a_rows["message"]))
        with pytest.raises(errors.UniqueViolation):
            conn.execute(reply, (a_rows["conversation"], a, a_rows["message"]))


def test_table_owner_is_bound_too(owner_url, two_users):
    a, _, b, _ = two_users
    with connect(owner_url) as conn:
        assert [count_rows(conn, table) for table in TABLES] == [0] * len(TABLES)
    with connect(owner_url, a) as conn:
        assert {row[0] for row in conn.execute("select user_id from task")} == {a}


def test_setting_is_gone_after_the_transaction(app_url, two_users):
    a = two_users[0]
    with psycopg.connect(app_url) as conn:
        with conn.transaction():
            conn.execute("select set_config('app.user_id', %s, true)", (a,))
            assert count_rows(conn, "task") == 1
        assert conn.execute("select current_setting('app.user_id', true)").fetchone()[0] in ("", None)
        assert count_rows(conn, "task") == 0


def test_deleting_a_conversation_takes_its_messages(app_url, two_users):
    a, a_rows, _, _ = two_users
    with connect(app_url, a) as conn:
        conn.execute("delete from conversation where id = %s", (a_rows["conversation"],))
        assert count_rows(conn, "message") == 0
