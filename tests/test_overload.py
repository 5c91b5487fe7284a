"""A turn under load: refused early when the pool's queue is old, never lost
once the assistant has answered, and the waits that make it cheap.

Each test holds the only pooled connection of a one-worker server on purpose:
a turn whose first transaction waits for a row lock taken from outside keeps
its connection (and the pool's queue) busy for as long as the test says.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psycopg
import requests
from fake_llm import slow, text
from support import ROOT, built_app, connect, gunicorn, make_user

from chat_blueprint.assistants import Reply
from chat_blueprint.db import tenancy
from chat_blueprint.db.pool import FairGate
from chat_blueprint.db.extensions import db
from chat_blueprint.services.turns import Turns


def post(server, user, message, conversation_id=None, timeout=60):
    body = {"message": message, **({"conversation_id": conversation_id} if conversation_id else {})}
    return requests.post(f"{server.url}/api/{user.id}/chat", json=body, headers=user.headers, timeout=timeout)


def messages_of(app_url, user) -> int:
    with connect(app_url, user.id) as conn:
        return conn.execute("select count(*) from message").fetchone()[0]


@contextmanager
def conversation_locked(app_url, user, conversation_id):
    """The conversation's row locked by another session until the block ends."""
    with connect(app_url, user.id) as conn:
        conn.execute("select 1 from conversation where id = %s for update", (conversation_id,))
        yield
        conn.rollback()


def test_a_new_turn_is_refused_before_it_stores_anything_while_the_pool_queue_is_old(app_url):
    """DATABASE_POOL_TIMEOUT_S=5: once a request has waited 2.5 s (half of it)
    for the only connection, the next turn is a quick 503 with Retry-After and
    stores nothing; the turns already admitted complete once the connection is free."""
    owner, other = make_user("owner"), make_user("other")
    with gunicorn(app_url, DATABASE_POOL_SIZE=1, DATABASE_POOL_TIMEOUT_S=5, DATABASE_LOCK_TIMEOUT_S=20,
                  DATABASE_STATEMENT_TIMEOUT_S=30) as server, ThreadPoolExecutor(2) as pool:
        conversation_id = post(server, owner, "first").json()["conversation_id"]
        with conversation_locked(app_url, owner, conversation_id):
            holding = pool.submit(post, server, owner, "waits for the lock", conversation_id)
            time.sleep(0.5)
            queued = pool.submit(post, server, other, "waits for the connection")
            time.sleep(3.0)
            started = time.monotonic()
            refused = post(server, other, "refused")
            took = time.monotonic() - started
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "server_busy" and refused.headers["Retry-After"] == "2"
            assert took < 1.0, took
            assert messages_of(app_url, other) == 0
        assert holding.result().status_code == 200 and queued.result().status_code == 200
    assert messages_of(app_url, other) == 2


def test_a_process_answers_at_most_chat_max_turns_per_process_at_once(app_url, llm):
    """Two turns wait on a slow assistant; a third is a quick 503 server_busy
    that stores nothing, and once one ends, turns are admitted again."""
    llm.reset()
    llm.default = slow(3.0, text("in time"))
    users = [make_user(f"crowd{n}") for n in range(3)]
    try:
        with gunicorn(app_url, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url, ASSISTANT_MODEL="fake-model",
                      CHAT_MAX_TURNS_PER_PROCESS=2) as server, ThreadPoolExecutor(2) as pool:
            held = [pool.submit(post, server, user, "slow") for user in users[:2]]
            time.sleep(1.0)
            started = time.monotonic()
            refused = post(server, users[2], "one too many")
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_busy"
            assert refused.headers["Retry-After"] == "2" and time.monotonic() - started < 1.0
            assert messages_of(app_url, users[2]) == 0
            assert [future.result().status_code for future in held] == [200, 200]
            llm.default = text("now")
            assert post(server, users[2], "admitted").status_code == 200
    finally:
        from fake_llm import echo

        llm.default = echo()


def test_a_reply_the_assistant_gave_is_stored_however_long_the_pool_stays_busy(app_url, llm):
    """The pool timeout is 1 s; the only connection stays busy for 3 s while a
    turn's assistant answers: its reply waits for the connection and is stored."""
    owner, patient = make_user("owner"), make_user("patient")
    llm.reset()
    llm.script(text("locked conversation opened"))
    llm.default = slow(1.0, text("worth the wait"))
    try:
        with gunicorn(app_url, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url, ASSISTANT_MODEL="fake-model",
                      ASSISTANT_TIMEOUT_S=10, DATABASE_POOL_SIZE=1, DATABASE_POOL_TIMEOUT_S=1,
                      DATABASE_LOCK_TIMEOUT_S=20, DATABASE_STATEMENT_TIMEOUT_S=30) as server, \
                ThreadPoolExecutor(2) as pool:
            conversation_id = post(server, owner, "first").json()["conversation_id"]
            with conversation_locked(app_url, owner, conversation_id):
                answered = pool.submit(post, server, patient, "a question")
                time.sleep(0.3)
                holding = pool.submit(post, server, owner, "holds the connection", conversation_id)
                time.sleep(3.0)
            assert answered.result().status_code == 200, answered.result().text
            assert answered.result().json()["response"] == "worth the wait"
            assert holding.result().status_code == 200
    finally:
        from fake_llm import echo

        llm.default = echo()
    assert messages_of(app_url, patient) == 2


def test_psycopg_waits_cooperatively_on_one_watcher_under_gevent(app_url):
    """Under gevent, runtime/cooperative.py replaces psycopg's wait; two
    greenlets sleeping 0.5 s in the database overlap."""
    script = textwrap.dedent(f"""
        from gevent import monkey; monkey.patch_all()
        import time, gevent, psycopg, psycopg.waiting
        from chat_blueprint.runtime import cooperative
        assert cooperative.install() and psycopg.waiting.wait is cooperative.wait
        def nap():
            with psycopg.connect({app_url!r}) as conn:
                conn.execute("select pg_sleep(0.5)")
                with conn.pipeline():
                    cursor = conn.execute("select 41 + 1")
                    conn.commit()
                assert cursor.fetchone() == (42,)
        with psycopg.connect({app_url!r}) as conn:
            pass
        started = time.monotonic()
        gevent.joinall([gevent.spawn(nap), gevent.spawn(nap)], raise_error=True)
        print(round(time.monotonic() - started, 2))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 0.9, done.stdout
    assert subprocess.run([sys.executable, "-c", "from chat_blueprint.runtime import cooperative; "
                           "assert not cooperative.install()"], cwd=ROOT, timeout=60).returncode == 0


def test_a_reply_of_megabytes_is_stored_without_a_pipeline(app_url, monkeypatch):
    """psycopg's pipeline can deadlock on a parameter of megabytes; the reply's
    transaction sends its statements one by one when the reply is that large."""
    user = make_user()
    pipelines = []
    enter = psycopg.Connection.pipeline

    def counted(connection):
        pipelines.append(threading.current_thread().name)
        return enter(connection)

    with built_app(app_url) as app, app.app_context():
        turns = Turns.from_settings(db.engine, app.extensions["assistant"], app.config["SETTINGS"])
        pending = turns.begin(turns.request(user.id, "tell me everything", None))
        monkeypatch.setattr(psycopg.Connection, "pipeline", counted)
        answer = turns.finish(pending, Reply(text="x" * (12 * 1024 * 1024)))
        assert pipelines == []
        small = turns.begin(turns.request(user.id, "and briefly", pending.conversation_id))
        turns.finish(small, Reply(text="brief"))
        assert len(pipelines) == 2  # the small turn's two transactions
    with connect(app_url, user.id) as conn:
        stored = conn.execute("select length(content) from message where id = %s",
                              (answer["assistant_message_id"],)).fetchone()[0]
    assert stored == 12 * 1024 * 1024


def test_the_pool_queue_is_read_safely_while_threads_join_and_leave_it(app_url):
    """Under gthread, `begin` reads the queue's age while other threads enter
    and leave it: a read must never see the queue change under it (it did, as
    a 500, in a benchmark)."""
    user = make_user()
    failures: list[BaseException] = []
    done = threading.Event()
    switch = sys.getswitchinterval()
    with built_app(app_url, DATABASE_POOL_SIZE=1, DATABASE_POOL_TIMEOUT_S="5") as app, app.app_context():
        engine = db.engine

        def churn():
            while not done.is_set():
                with tenancy.transaction(engine, user.id):
                    pass

        def read():
            while not done.is_set():
                try:
                    tenancy.queue_age_s(engine)
                except BaseException as exc:  # noqa: BLE001 - the test reports it
                    failures.append(exc)
                    return

        sys.setswitchinterval(1e-6)  # threads switch as often as CPython lets them
        try:
            threads = [threading.Thread(target=churn) for _ in range(6)] + [threading.Thread(target=read)]
            for thread in threads:
                thread.start()
            time.sleep(3)
            done.set()
            for thread in threads:
                thread.join(10)
        finally:
            sys.setswitchinterval(switch)
    assert failures == []


def waiting_in_turn(gate: FairGate, count: int) -> tuple[list[int], list[threading.Thread]]:
    """`count` threads that queue at `gate` one after another (each started once
    the previous one waits) and note their number when let in."""
    order: list[int] = []

    def wait(number: int) -> None:
        assert gate.acquire(10)
        order.append(number)

    threads = []
    for number in range(count):
        threads.append(threading.Thread(target=wait, args=(number,)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while len(gate._waiters) < number + 1 and time.monotonic() < deadline:
            time.sleep(0.005)
    return order, threads


def test_waiters_for_a_connection_are_let_in_in_the_order_they_came():
    """The finding: SQLAlchemy's pool gives a returned connection to whoever asks
    first, often the request that just returned it, so a waiter could be passed
    over for a second and more. The gate hands a leaving holder's place to the
    oldest waiter: a holder that asks again at once queues behind them."""
    gate = FairGate(1)
    assert gate.acquire(0)
    order, threads = waiting_in_turn(gate, 3)
    for let_in in ([0], [0, 1], [0, 1, 2]):
        gate.release()  # the holder leaves: the next waiter holds the place
        assert not gate.acquire(0)  # so one asking again at once does not get it
        deadline = time.monotonic() + 5
        while order != let_in and time.monotonic() < deadline:
            time.sleep(0.005)
        assert order == let_in
    for thread in threads:
        thread.join(5)
    gate.release()
    assert gate.acquire(0)  # the place came back once nobody waited


def test_a_wait_that_times_out_leaves_no_one_behind_in_the_queue():
    gate = FairGate(1)
    assert gate.acquire(0)
    started = time.monotonic()
    assert not gate.acquire(0.1) and time.monotonic() - started >= 0.1
    assert list(gate._waiters) == []
    gate.release()
    assert gate.acquire(0)
