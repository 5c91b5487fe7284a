"""Error paths of a chat turn that ended in 500s, against real gunicorn with
ASSISTANT=openai on a scripted Chat Completions server (tests/fake_llm.py),
and the turn's transaction helper on a real pool."""
from __future__ import annotations

import threading
import time

import psycopg
import pytest
import requests
from fake_llm import slow, status, text, tool_calls
from support import built_app, connect, gunicorn, make_user

from chat_blueprint.db import tenancy
from chat_blueprint.db.extensions import db


@pytest.fixture(scope="module")
def server(app_url, llm):
    with gunicorn(app_url, threads=8, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url,
                  ASSISTANT_MODEL="test-model", ASSISTANT_TIMEOUT_S="20", DATABASE_LOCK_TIMEOUT_S="30",
                  DATABASE_STATEMENT_TIMEOUT_S="30") as server:
        yield server


@pytest.fixture
def fresh(llm):
    llm.reset()
    return make_user()


def chat(server, user, message, conversation_id=None, key=None) -> requests.Response:
    body = {"message": message, **({"conversation_id": conversation_id} if conversation_id else {})}
    headers = {**user.headers, **({"Idempotency-Key": key} if key else {})}
    return requests.post(f"{server.url}/api/{user.id}/chat", json=body, headers=headers, timeout=60)


def key_row(app_url, user, key):
    with connect(app_url, user.id) as conn:
        return conn.execute("select status, conversation_id, user_message_id from idempotency_key where key = %s",
                            (key,)).fetchone()


def stored_messages(app_url, user):
    with connect(app_url, user.id) as conn:
        return conn.execute("select id, role, content, tool_calls, reply_to from message"
                            " where superseded_at is null order by id").fetchall()


UNSTORABLE_TEXT = "nul \x00 here, lone \ud800 there"


def test_unstorable_characters_in_the_reply_are_replaced(server, llm, fresh, app_url):
    """The finding: a NUL or a lone surrogate from the model raised on insert (500)."""
    llm.script(text(UNSTORABLE_TEXT))
    answer = chat(server, fresh, "say something odd", key="odd-text")
    assert answer.status_code == 200, answer.text
    assert answer.json()["response"] == "nul \ufffd here, lone \ufffd there"
    (_, _, question, _, _), (_, role, content, _, reply_to) = stored_messages(app_url, fresh)
    assert (role, content) == ("assistant", answer.json()["response"])
    assert key_row(app_url, fresh, "odd-text")[0] == "done"
    assert chat(server, fresh, "say something odd", key="odd-text").json() == answer.json()


def test_unstorable_characters_in_tool_call_arguments_are_replaced(server, llm, fresh, app_url):
    llm.script(tool_calls([{"id": "call\x00", "name": "add_task",
                            "arguments": {"title": "milk\x00", "\ud800": ["\udfff", {"k\x00": 1}]}}]))
    answer = chat(server, fresh, "add milk", key="odd-tools")
    assert answer.status_code == 200, answer.text
    expected = [{"id": "call\ufffd", "name": "add_task",
                 "arguments": {"title": "milk\ufffd", "\ufffd": ["\ufffd", {"k\ufffd": 1}]}}]
    assert answer.json()["tool_calls"] == expected
    assert stored_messages(app_url, fresh)[-1][3] == expected
    assert key_row(app_url, fresh, "odd-tools")[0] == "done"


def test_a_slow_first_request_whose_key_a_retry_took_over_answers_the_stored_reply(server, llm, fresh, app_url):
    """The finding: the slow first request, finishing after its retry, hit the
    unique index on reply_to (500)."""
    llm.script(slow(4, text("the slow answer")), text("the retry's answer"))
    first = {}
    thread = threading.Thread(target=lambda: first.update(answer=chat(server, fresh, "take your time", key="slow")))
    thread.start()
    deadline = time.monotonic() + 20
    while not (key_row(app_url, fresh, "slow") or (None, None, None))[2]:
        assert time.monotonic() < deadline, "the first request stored no message"
        time.sleep(0.05)
    with connect(app_url, fresh.id) as conn:  # the first request counts as dead from now on
        conn.execute("update idempotency_key set updated_at = now() - interval '1 hour' where key = 'slow'")
        conn.commit()
    retry = chat(server, fresh, "take your time", key="slow")
    assert retry.status_code == 200 and retry.json()["response"] == "the retry's answer"
    thread.join(30)
    assert first["answer"].status_code == 200, first["answer"].text
    assert first["answer"].json() == retry.json()
    replies = [row for row in stored_messages(app_url, fresh) if row[1] == "assistant"]
    assert [row[2] for row in replies] == ["the retry's answer"]


def test_a_retry_after_the_conversation_was_deleted_ends_the_key_failed(server, llm, fresh, app_url):
    """The finding: the retry set the key back to running, then 404ed, and
    later retries cycled 409/404 until the key expired."""
    llm.script(status(500))
    failed = chat(server, fresh, "doomed", key="gone")
    assert failed.status_code == 502
    conversation_id = failed.json()["error"]["conversation_id"]
    assert requests.delete(f"{server.url}/api/{fresh.id}/conversations/{conversation_id}", headers=fresh.headers,
                           timeout=10).status_code == 204
    for _ in range(3):
        retry = chat(server, fresh, "doomed", key="gone")
        assert retry.status_code == 404 and retry.json()["error"]["code"] == "conversation_not_found"
        assert key_row(app_url, fresh, "gone")[0] == "failed"
    assert len(llm.requests) == 1


def test_a_purge_racing_the_claim_of_an_expired_key_is_a_new_turn(server, llm, fresh, app_url, superuser_url):
    """The finding: a key deleted (by a purge of expired keys) between the
    claim's insert and its lock left fetchone() None: a TypeError (500)."""
    assert chat(server, fresh, "long ago", key="expired").status_code == 200
    with connect(app_url, fresh.id) as conn:
        conn.execute("update idempotency_key set created_at = now() - interval '2 days' where key = 'expired'")
        conn.commit()
    with psycopg.connect(superuser_url) as purge:
        purge.execute("select 1 from idempotency_key where user_id = %s and key = 'expired' for update", (fresh.id,))
        answers = {}
        thread = threading.Thread(target=lambda: answers.update(retry=chat(server, fresh, "now", key="expired")))
        thread.start()
        deadline = time.monotonic() + 20
        while not purge.execute("select count(*) from pg_locks where not granted and locktype = 'transactionid'"
                                ).fetchone()[0]:
            assert time.monotonic() < deadline and thread.is_alive(), answers
            time.sleep(0.05)
        purge.execute("delete from idempotency_key where user_id = %s and key = 'expired'", (fresh.id,))
        purge.commit()
    thread.join(30)
    assert answers["retry"].status_code == 200, answers["retry"].text
    assert answers["retry"].json()["response"].endswith("now")
    assert key_row(app_url, fresh, "expired")[0] == "done"


def warm_pool(engine, size: int) -> list[int]:
    """Open `size` pooled connections at once, return them to the pool, and say their backends' pids."""
    held = [engine.connect() for _ in range(size)]
    pids = [connection.exec_driver_sql("select pg_backend_pid()").scalar() for connection in held]
    for connection in held:
        connection.rollback()
        connection.close()
    return pids


def run_transactions(engine, user_id: str, count: int) -> tuple[int, set[int]]:
    """`count` turn-style transactions: how many failed, and the backends of the others."""
    failures, used = 0, set()
    for _ in range(count):
        try:
            with tenancy.transaction(engine, user_id) as connection:
                used.add(connection.execute("select pg_backend_pid()").fetchone()[0])
        except psycopg.OperationalError:
            failures += 1
    return failures, used


def test_one_broken_connection_leaves_the_rest_of_the_pool(app_url, superuser_url):
    """The finding: a dead connection made the turn's transaction helper
    dispose of the whole pool, dropping every healthy connection."""
    user = make_user()
    with built_app(app_url, DATABASE_POOL_SIZE=3) as app, app.app_context():
        pids = warm_pool(db.engine, 3)
        with psycopg.connect(superuser_url, autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(%s)", (pids[0],))
            failures, used = run_transactions(db.engine, user.id, 6)
            alive = {row[0] for row in admin.execute("select pid from pg_stat_activity where pid = any(%s)",
                                                     (pids[1:],))}
    assert failures == 1
    assert alive == set(pids[1:]), "healthy pooled connections were closed"
    assert set(pids[1:]) <= used and pids[0] not in used


def test_after_every_backend_died_one_transaction_fails_not_each(app_url, superuser_url):
    """With the pool no longer disposed of, the others found dead must not
    each cost a request: each is checked before its next use and replaced."""
    user = make_user()
    with built_app(app_url, DATABASE_POOL_SIZE=3) as app, app.app_context():
        pids = warm_pool(db.engine, 3)
        with psycopg.connect(superuser_url, autocommit=True) as admin:
            admin.execute("select pg_terminate_backend(pid) from unnest(%s::int[]) pid", (pids,))
        failures, used = run_transactions(db.engine, user.id, 6)
    assert failures == 1
    assert used and not used & set(pids)
