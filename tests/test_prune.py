"""Retention: `flask --app wsgi prune` as the roles of the production path, on
a cluster of its own (so the counts it prints are exactly this test's rows)."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psycopg
import pytest
from psycopg import errors, sql
from support import ROOT, built_app, connect, throwaway_cluster

from devtools.cluster import APP_ROLE, OWNER_ROLE, SUPERUSER
from devtools.ports import free_port

TTL_S = 3600
MAINTENANCE_ROLE = "chat_maintenance"
MAINTENANCE_PASSWORD = "maintenance-password-for-tests"


@pytest.fixture(scope="module")
def own_cluster():
    with throwaway_cluster("chat-test-pg-prune-") as cluster:
        yield cluster


def prune(database_url: str, *args: str) -> subprocess.CompletedProcess:
    """The command as an operator runs it: no BETTER_AUTH_SECRET in its environment."""
    env = {name: value for name, value in os.environ.items() if name != "BETTER_AUTH_SECRET"}
    env.update(DATABASE_URL=database_url, IDEMPOTENCY_TTL_S=str(TTL_S))
    return subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "prune", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def prune_in_process(database_url: str, *args: str, **env):
    """The same command through Flask's CLI runner (exit code, and stdout and stderr together)."""
    with built_app(database_url, **{"IDEMPOTENCY_TTL_S": TTL_S, **env}) as app:
        result = app.test_cli_runner().invoke(args=["prune", *args])
    return result.exit_code, result.output


def add_key(app_url: str, user_id: str, key: str, age_s: float, status: str = "done", moved_s: float = 0) -> None:
    """A key created `age_s` seconds ago, last moved (updated_at) `moved_s` seconds ago."""
    with connect(app_url, user_id) as conn:
        conn.execute("insert into idempotency_key (user_id, key, request_hash, status, created_at, updated_at)"
                     " values (%s, %s, 'h', %s, now() - make_interval(secs => %s), now() - make_interval(secs => %s))",
                     (user_id, key, status, age_s, moved_s))


def add_rate_state(app_url: str, user_id: str, tat_from_now_s: float, table: str = "chat_rate_limit") -> None:
    with connect(app_url, user_id) as conn:
        conn.execute(f"insert into {table} (user_id, tat) values (%s, now() + make_interval(secs => %s))",
                     (user_id, tat_from_now_s))


def keys_of(app_url: str, user_id: str) -> list[str]:
    with connect(app_url, user_id) as conn:
        return [row[0] for row in conn.execute("select key from idempotency_key order by key")]


RATE_TABLES = ("chat_rate_limit", "write_rate_limit", "export_rate_limit")


def rate_state_of(app_url: str, user_id: str) -> int:
    """The user's rows of every rate limit (chat turns, writes, exports)."""
    with connect(app_url, user_id) as conn:
        counts = " + ".join(f"(select count(*) from {table})" for table in RATE_TABLES)
        return conn.execute(f"select {counts}").fetchone()[0]


def new_user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


def test_prune_deletes_aged_keys_and_idle_rate_state_and_keeps_the_rest(own_cluster):
    app_url = own_cluster.url(APP_ROLE)
    alice, bob = new_user(), new_user()
    for user in (alice, bob):
        add_key(app_url, user, "old-1", TTL_S + 3600)
        add_key(app_url, user, "old-2", TTL_S + 60)
        add_key(app_url, user, "fresh", TTL_S - 600)
    add_key(app_url, alice, "old-3", 30 * 86400)
    idle, limiting = [new_user() for _ in range(3)], [new_user() for _ in range(2)]
    for user in idle:
        for table in RATE_TABLES:
            add_rate_state(app_url, user, -1, table)
    for user in limiting:
        for table in RATE_TABLES:
            add_rate_state(app_url, user, 30, table)

    result = prune(own_cluster.url(OWNER_ROLE), "--batch-size", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"deleted 5 expired idempotency keys (older than IDEMPOTENCY_TTL_S={TTL_S} s)",
        "deleted 9 idle rate-limit rows",
        "deleted 0 stops of replies no longer produced",
    ]
    assert keys_of(app_url, alice) == keys_of(app_url, bob) == ["fresh"]
    assert [rate_state_of(app_url, user) for user in idle] == [0, 0, 0]
    assert [rate_state_of(app_url, user) for user in limiting] == [3, 3]

    code, output = prune_in_process(own_cluster.url(OWNER_ROLE))
    assert code == 0, output
    assert output.splitlines() == [
        f"deleted 0 expired idempotency keys (older than IDEMPOTENCY_TTL_S={TTL_S} s)",
        "deleted 0 idle rate-limit rows",
        "deleted 0 stops of replies no longer produced",
    ]


def test_each_call_deletes_one_bounded_batch(own_cluster):
    app_url = own_cluster.url(APP_ROLE)
    user = new_user()
    for n in range(5):
        add_key(app_url, user, f"old-{n}", TTL_S * 2)
    idle = sorted(new_user() for _ in range(3))
    for other in idle:
        add_rate_state(app_url, other, -1)
    with psycopg.connect(own_cluster.url(OWNER_ROLE), autocommit=True) as conn:
        batches = [conn.execute("select prune_idempotency_keys(%s, 2)", (TTL_S,)).fetchone()[0] for _ in range(4)]
        calls, after = [], ""
        while after is not None:
            calls.append(conn.execute("select * from prune_chat_rate_limits(%s, 2)", (after,)).fetchone())
            after = calls[-1][1]
    assert batches == [2, 2, 1, 0]
    assert all(deleted <= 2 for deleted, _ in calls) and sum(deleted for deleted, _ in calls) == 3
    assert [last for _, last in calls[:-1]] == sorted(last for _, last in calls[:-1]) and calls[-1] == (0, None)
    assert [rate_state_of(app_url, other) for other in idle] == [0, 0, 0]
    assert keys_of(app_url, user) == []


def test_the_app_role_cannot_prune_and_still_sees_nothing_without_a_user(own_cluster):
    app_url = own_cluster.url(APP_ROLE)
    user = new_user()
    add_key(app_url, user, "old", TTL_S * 2)
    add_rate_state(app_url, user, -60)

    code, output = prune_in_process(app_url)
    assert code == 1
    assert "may not prune" in output and "owner" in output and "Traceback" not in output
    for call in ("select prune_idempotency_keys(0, 1000)", "select * from prune_chat_rate_limits('', 1000)",
                 "select * from prune_write_rate_limits('', 1000)", "select * from prune_export_rate_limits('', 1000)",
                 "select prune_reply_stops(60, 1000)"):
        with connect(app_url) as conn, pytest.raises(errors.InsufficientPrivilege):
            conn.execute(call)

    with connect(app_url) as conn:
        conn.execute("select set_config('chat.pruning', 'on', false)")
        seen = [conn.execute(f"select count(*) from {table}").fetchone()[0]
                for table in ("idempotency_key", "chat_rate_limit")]
        deleted = [conn.execute(f"delete from {table}").rowcount for table in ("idempotency_key", "chat_rate_limit")]
    assert seen == [0, 0] and deleted == [0, 0]
    assert keys_of(app_url, user) == ["old"] and rate_state_of(app_url, user) == 1
    assert prune_in_process(own_cluster.url(OWNER_ROLE))[0] == 0


def test_the_owner_sees_nothing_outside_the_prune_functions(own_cluster):
    """The prune policies open the two tables to the owner only while a prune
    function runs: forced RLS still binds it everywhere else."""
    app_url = own_cluster.url(APP_ROLE)
    add_key(app_url, new_user(), "fresh", 0)
    add_stop(app_url, new_user(), "young", 0)
    with connect(own_cluster.url(OWNER_ROLE)) as conn:
        assert [conn.execute(f"select count(*) from {table}").fetchone()[0]
                for table in ("idempotency_key", "chat_rate_limit", "conversation", "reply_stop")] == [0, 0, 0, 0]
        conn.execute("select prune_idempotency_keys(%s, 10)", (TTL_S,))
        assert conn.execute("select current_setting('chat.pruning', true)").fetchone()[0] == "off"
        assert conn.execute("select count(*) from idempotency_key").fetchone()[0] == 0


@pytest.fixture
def maintenance_url(own_cluster):
    """A login role with no privilege of its own but EXECUTE on the prune
    functions, granted by the owner: the least-privileged way to run the job."""
    with psycopg.connect(own_cluster.url(SUPERUSER, "postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(MAINTENANCE_ROLE), sql.Literal(MAINTENANCE_PASSWORD)))
    with psycopg.connect(own_cluster.url(OWNER_ROLE), autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION prune_idempotency_keys(double precision, integer),"
                             " prune_chat_rate_limits(text, integer), prune_write_rate_limits(text, integer),"
                             " prune_export_rate_limits(text, integer), prune_reply_stops(double precision, integer)"
                             " TO {}").format(sql.Identifier(MAINTENANCE_ROLE)))
    try:
        yield f"postgresql://{MAINTENANCE_ROLE}:{MAINTENANCE_PASSWORD}@127.0.0.1:{own_cluster.port}/chat"
    finally:
        with psycopg.connect(own_cluster.url(OWNER_ROLE), autocommit=True) as conn:
            conn.execute(sql.SQL("REVOKE ALL ON FUNCTION prune_idempotency_keys(double precision, integer),"
                                 " prune_chat_rate_limits(text, integer), prune_write_rate_limits(text, integer),"
                                 " prune_export_rate_limits(text, integer),"
                                 " prune_reply_stops(double precision, integer) FROM {}").format(
                sql.Identifier(MAINTENANCE_ROLE)))
        with psycopg.connect(own_cluster.url(SUPERUSER, "postgres"), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(MAINTENANCE_ROLE)))


def test_a_role_granted_execute_can_prune_and_read_nothing(own_cluster, maintenance_url):
    app_url = own_cluster.url(APP_ROLE)
    user = new_user()
    add_key(app_url, user, "old", TTL_S * 2)
    add_key(app_url, user, "fresh", 0)
    code, output = prune_in_process(maintenance_url)
    assert code == 0, output
    assert output.splitlines()[0] == f"deleted 1 expired idempotency keys (older than IDEMPOTENCY_TTL_S={TTL_S} s)"
    assert keys_of(app_url, user) == ["fresh"]
    with psycopg.connect(maintenance_url) as conn, pytest.raises(errors.InsufficientPrivilege):
        conn.execute("select count(*) from idempotency_key")


def test_prune_with_the_database_down_says_so():
    code, output = prune_in_process(f"postgresql://{OWNER_ROLE}:x@127.0.0.1:{free_port()}/chat")
    assert code == 1
    assert "database is unreachable" in output and "Traceback" not in output


def test_prune_rejects_a_bad_batch_size(own_cluster):
    code, output = prune_in_process(own_cluster.url(OWNER_ROLE), "--batch-size", "0")
    assert code == 2 and "--batch-size" in output


def test_a_running_key_stays_until_it_has_not_moved_for_the_ttl(own_cluster):
    """The finding: prune deleted keys still `running` (a retry had taken an
    old key over and was answering), and a repeat of that request ran the
    turn a second time. An old key that moved within the TTL stays; one that
    has not moved for the TTL either is a dead request's, and goes."""
    app_url = own_cluster.url(APP_ROLE)
    user = new_user()
    add_key(app_url, user, "answering", TTL_S * 2, status="running", moved_s=5)
    add_key(app_url, user, "dead", TTL_S * 2, status="running", moved_s=TTL_S + 60)
    add_key(app_url, user, "failed", TTL_S * 2, status="failed", moved_s=5)
    code, output = prune_in_process(own_cluster.url(OWNER_ROLE))
    assert code == 0, output
    assert output.splitlines()[0] == f"deleted 2 expired idempotency keys (older than IDEMPOTENCY_TTL_S={TTL_S} s)"
    assert keys_of(app_url, user) == ["answering"]


@pytest.mark.parametrize("ttl_s, assistant_timeout_s", [(59, None), (600, 600), (1, 1)])
def test_prune_refuses_a_ttl_shorter_than_the_stale_bound(own_cluster, ttl_s, assistant_timeout_s):
    """IDEMPOTENCY_TTL_S below ASSISTANT_TIMEOUT_S + 30 s would expire keys of
    requests that may still be answering: refused in one line, nothing deleted."""
    app_url = own_cluster.url(APP_ROLE)
    user = new_user()
    add_key(app_url, user, "old", TTL_S * 2)
    code, output = prune_in_process(own_cluster.url(OWNER_ROLE), IDEMPOTENCY_TTL_S=ttl_s,
                                    ASSISTANT_TIMEOUT_S=assistant_timeout_s)
    assert code == 1
    [line] = output.strip().splitlines()
    assert f"IDEMPOTENCY_TTL_S={ttl_s}" in line and "ASSISTANT_TIMEOUT_S" in line and "Traceback" not in output
    assert keys_of(app_url, user) == ["old"]
    code, output = prune_in_process(own_cluster.url(OWNER_ROLE), IDEMPOTENCY_TTL_S=(assistant_timeout_s or 30) + 30,
                                    ASSISTANT_TIMEOUT_S=assistant_timeout_s)
    assert code == 0, output
    assert keys_of(app_url, user) == []


def add_stop(app_url: str, user_id: str, ui_id: str, age_s: float) -> None:
    with connect(app_url, user_id) as conn:
        conn.execute("insert into reply_stop (user_id, ui_id, stopped_at) values (%s, %s, now() - make_interval(secs => %s))",
                     (user_id, ui_id, age_s))


def stops_of(app_url: str, user_id: str) -> list[str]:
    with connect(app_url, user_id) as conn:
        return [row[0] for row in conn.execute("select ui_id from reply_stop order by ui_id")]


def test_stops_older_than_the_stale_bound_are_pruned_and_younger_ones_kept(own_cluster):
    """A producer deletes its reply's stop when it ends the reply; one that died
    leaves it. prune deletes a stop older than ASSISTANT_TIMEOUT_S + 30 s (no
    producer outlives that) and keeps a younger one, which a live producer may
    still be about to read."""
    app_url = own_cluster.url(APP_ROLE)
    alice, bob = new_user(), new_user()
    for user in (alice, bob):
        add_stop(app_url, user, "dead-1", 3600)
        add_stop(app_url, user, "dead-2", 30 + 30 + 5)
        add_stop(app_url, user, "young", 30 + 30 - 5)
    code, output = prune_in_process(own_cluster.url(OWNER_ROLE), "--batch-size", "3", ASSISTANT_TIMEOUT_S=30)
    assert code == 0, output
    assert output.splitlines()[2] == "deleted 4 stops of replies no longer produced"
    assert stops_of(app_url, alice) == stops_of(app_url, bob) == ["young"]
