"""Statement and lock timeouts on every app transaction: a row lock held by
another session makes a request answer 503 with Retry-After within the
timeout instead of holding a connection for as long as the lock lasts, the
transaction is rolled back, and the next request succeeds. Real gunicorn,
real PostgreSQL, a real lock."""
from __future__ import annotations

import time
from contextlib import contextmanager

import psycopg
import pytest
import requests
from support import built_app, connect, gunicorn, make_user

from chat_blueprint.db import tenancy
from chat_blueprint.db.extensions import db

LOCK_TIMEOUT_S = 1
# Far above the timeouts, so a request that waits for the lock instead of
# timing out is told apart; generous for a busy machine.
SLOW_S = 8


@pytest.fixture(scope="module")
def server(app_url):
    with gunicorn(app_url, threads=4, DATABASE_LOCK_TIMEOUT_S=str(LOCK_TIMEOUT_S),
                  DATABASE_STATEMENT_TIMEOUT_S="30") as server:
        yield server


@pytest.fixture(scope="module")
def statement_limited(app_url):
    with gunicorn(app_url, threads=4, DATABASE_LOCK_TIMEOUT_S="30", DATABASE_STATEMENT_TIMEOUT_S="1") as server:
        yield server


@contextmanager
def row_locked(superuser_url, table: str, row_id):
    """Another session holds `FOR UPDATE` on one row until the block ends."""
    with psycopg.connect(superuser_url) as holder:
        holder.execute(f"select 1 from {table} where id = %s for update", (row_id,))
        try:
            yield
        finally:
            holder.rollback()


def chat(server, user, message, conversation_id=None, key=None, timeout=SLOW_S * 3):
    headers = {**user.headers, **({"Idempotency-Key": key} if key else {})}
    return requests.post(f"{server.url}/api/{user.id}/chat", json={"message": message,
                                                                   "conversation_id": conversation_id},
                         headers=headers, timeout=timeout)


def messages_of(app_url, user, conversation_id) -> int:
    with connect(app_url, user.id) as conn:
        return conn.execute("select count(*) from message where conversation_id = %s",
                            (conversation_id,)).fetchone()[0]


@pytest.mark.parametrize("which", ["lock", "statement"])
def test_a_locked_conversation_makes_a_turn_503_within_the_timeout(request, app_url, superuser_url, which):
    """The finding: a stuck lock on a conversation held a connection and a
    request for as long as it lasted."""
    server = request.getfixturevalue("server" if which == "lock" else "statement_limited")
    user = make_user()
    conversation_id = chat(server, user, "first").json()["conversation_id"]
    with row_locked(superuser_url, "conversation", conversation_id):
        for key in (None, "retry-me"):
            started = time.monotonic()
            refused = chat(server, user, "while locked", conversation_id, key=key)
            waited = time.monotonic() - started
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "database_timeout"
            assert refused.headers["Retry-After"].isdigit()
            assert 0.9 <= waited < SLOW_S, waited
    assert messages_of(app_url, user, conversation_id) == 2
    answer = chat(server, user, "after the lock", conversation_id, key="retry-me")
    assert answer.status_code == 200 and answer.json()["response"].startswith("turn 2:")
    assert messages_of(app_url, user, conversation_id) == 4


def test_a_locked_task_makes_an_update_503_within_the_timeout(server, app_url, superuser_url):
    user = make_user()
    task = requests.post(f"{server.url}/api/{user.id}/tasks", json={"title": "before"}, headers=user.headers,
                         timeout=10).json()
    url = f"{server.url}/api/{user.id}/tasks/{task['id']}"
    with row_locked(superuser_url, "task", task["id"]):
        started = time.monotonic()
        refused = requests.put(url, json={"title": "during"}, headers=user.headers, timeout=SLOW_S * 3)
        assert time.monotonic() - started < SLOW_S
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "database_timeout"
        assert requests.get(url, headers=user.headers, timeout=10).json()["title"] == "before"
    updated = requests.put(url, json={"title": "after"}, headers=user.headers, timeout=10)
    assert updated.status_code == 200 and updated.json()["title"] == "after"


def test_the_timeouts_last_one_transaction(app_url):
    """Set per transaction in the statement that binds the user, so a pooled
    (or PgBouncer-shared) connection keeps none of it afterwards."""
    user = make_user()
    with built_app(app_url, DATABASE_POOL_SIZE=1, DATABASE_STATEMENT_TIMEOUT_S="2.5",
                   DATABASE_LOCK_TIMEOUT_S="0.5") as app, app.app_context():
        with tenancy.transaction(db.engine, user.id) as connection:
            settings = connection.cursor()
            settings.execute("select current_setting('app.user_id'), current_setting('statement_timeout'),"
                             " current_setting('lock_timeout')")
            assert settings.fetchone() == (user.id, "2500ms", "500ms")
        with db.engine.connect() as pooled:
            after = pooled.exec_driver_sql("select current_setting('app.user_id', true),"
                                           " current_setting('statement_timeout'), current_setting('lock_timeout')")
            assert after.fetchone() == ("", "0", "0")


def test_a_shared_transaction_holds_each_statement_to_the_user_bound_before_it(app_url):
    """The minder stores the progress of several users' replies in one
    transaction: each statement sees only the rows of the user bound before it,
    with the timeouts, and nothing outlives the transaction."""
    owner, other = make_user(), make_user()
    with built_app(app_url, DATABASE_POOL_SIZE=1, DATABASE_STATEMENT_TIMEOUT_S="2.5",
                   DATABASE_LOCK_TIMEOUT_S="0.5") as app, app.app_context():
        with tenancy.shared_transaction(db.engine) as shared:
            shared.as_user(owner.id).execute("insert into task (user_id, title) values (%s, 'mine')", (owner.id,))
            as_other = shared.as_user(other.id).execute(
                "select count(*), current_setting('statement_timeout') from task")
            as_other_write = shared.connection.execute(
                "update task set title = 'taken' where user_id = %s returning id", (owner.id,))
            as_owner = shared.as_user(owner.id).execute("select title from task where user_id = %s", (owner.id,))
        assert as_other.fetchone() == (0, "2500ms")
        assert as_other_write.fetchall() == []
        assert as_owner.fetchall() == [("mine",)]
        with tenancy.transaction(db.engine, owner.id) as connection:
            assert connection.execute("select title from task").fetchall() == [("mine",)]  # committed
        with db.engine.connect() as pooled:
            after = pooled.exec_driver_sql("select current_setting('app.user_id', true),"
                                           " current_setting('statement_timeout')")
            assert after.fetchone() == ("", "0")
