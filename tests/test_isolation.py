"""Roles that could turn isolation off are refused, at start-up, in /readyz and
while serving: the table owner, a member of the owner's role, a role altered to
BYPASSRLS after the server started, and a role that can become, through any
chain of memberships, a superuser, a BYPASSRLS role (Neon's `neon_superuser`),
a table owner, `pg_read_all_data` or `pg_write_all_data`. Real roles, real
GRANT and ALTER ROLE, real gunicorn."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import pytest
import requests
from psycopg import sql
from support import ROOT, app_env, built_app, gunicorn, make_user
from test_gunicorn import refusal

from chat_blueprint.db.isolation import IsolationNotInForce, isolation_problems
from devtools.cluster import APP_ROLE, OWNER_ROLE, SUPERUSER


@contextmanager
def login_role(cluster, superuser_url, name: str, *, member_of: str, inherit: bool = True):
    """A fresh login role that is a member of `member_of`; dropped afterwards."""
    password = f"{name}-password"
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN {} PASSWORD {}").format(
            sql.Identifier(name), sql.SQL("INHERIT" if inherit else "NOINHERIT"), sql.Literal(password)))
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(member_of), sql.Identifier(name)))
    try:
        yield f"postgresql://{name}:{password}@127.0.0.1:{cluster.port}/chat"
    finally:
        as_superuser(superuser_url, sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def as_superuser(superuser_url, statement) -> None:
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        conn.execute(statement)


def test_refuses_to_serve_as_the_table_owner(owner_url):
    code, output = refusal(owner_url)
    assert code != 0
    assert "refusing to serve" in output and f"database role '{OWNER_ROLE}' owns tables" in output


@pytest.mark.parametrize("inherit", [True, False], ids=["inherit", "noinherit"])
def test_refuses_to_serve_as_a_member_of_the_owners_role(cluster, superuser_url, inherit):
    """The finding: such a role ran ALTER TABLE task NO FORCE ROW LEVEL SECURITY
    and read every user's tasks. Without INHERIT it can still SET ROLE."""
    with login_role(cluster, superuser_url, "chat_owner_member", member_of=OWNER_ROLE, inherit=inherit) as url:
        code, output = refusal(url)
    assert code != 0
    assert (f"database role 'chat_owner_member' is a member of role '{OWNER_ROLE}' (chat_owner_member -> {OWNER_ROLE}),"
            " which owns tables conversation, message, task") in output


def test_readyz_and_the_api_report_an_owner_role(owner_url):
    user = make_user()
    with built_app(owner_url) as app:
        client = app.test_client()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and f"'{OWNER_ROLE}' owns tables" in ready.get_json()["error"]["message"]
        answer = client.get(f"/api/{user.id}/tasks", headers=user.headers)
        assert answer.status_code == 503 and answer.get_json()["error"]["code"] == "isolation_not_in_force"


def wait_for_status(url, user, status: int, timeout_s: float = 20.0) -> requests.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = requests.get(url, headers=user.headers, timeout=10)
        if response.status_code == status or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_a_role_altered_while_serving_is_refused_within_the_interval(cluster, superuser_url):
    """The finding: after ALTER ROLE ... BYPASSRLS the API kept answering 200."""
    user = make_user()
    with login_role(cluster, superuser_url, "chat_probe", member_of=APP_ROLE) as url, \
            gunicorn(url, workers=2, threads=4, ISOLATION_CHECK_INTERVAL_S="1") as server:
        tasks = f"{server.url}/api/{user.id}/tasks"
        assert requests.get(tasks, headers=user.headers, timeout=10).status_code == 200
        for grant, revoke, reason in (("ALTER ROLE chat_probe BYPASSRLS", "ALTER ROLE chat_probe NOBYPASSRLS",
                                       "has BYPASSRLS"),
                                      (f"GRANT {OWNER_ROLE} TO chat_probe", f"REVOKE {OWNER_ROLE} FROM chat_probe",
                                       f"member of role '{OWNER_ROLE}'")):
            as_superuser(superuser_url, grant)
            started = time.monotonic()
            refused = wait_for_status(tasks, user, 503)
            assert refused.status_code == 503, (grant, refused.text)
            assert time.monotonic() - started < 10
            assert refused.json()["error"]["code"] == "isolation_not_in_force"
            assert reason in refused.json()["error"]["message"] and "Retry-After" in refused.headers
            time.sleep(1.2)  # one interval later, no worker still serves on its old verdict
            for _ in range(6):
                assert requests.get(tasks, headers=user.headers, timeout=10).status_code == 503
            assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 503
            as_superuser(superuser_url, revoke)
            assert wait_for_status(tasks, user, 200).status_code == 200, grant


def test_the_check_runs_once_per_interval_not_per_request():
    from chat_blueprint.db.isolation import IsolationWatch

    checks = []
    watch = IsolationWatch(interval_s=0.5)
    for _ in range(200):
        watch.ensure(lambda: checks.append(1) or [])
    assert len(checks) == 1
    time.sleep(0.6)
    with pytest.raises(IsolationNotInForce):
        watch.ensure(lambda: checks.append(1) or ["database role 'x' has BYPASSRLS"])
    with pytest.raises(IsolationNotInForce):
        watch.ensure(lambda: checks.append(1) or [])
    assert len(checks) == 2


@dataclass(frozen=True)
class Membership:
    """Groups to create (`{a}`, `{b}` stand for fresh role names) and the role
    to grant the serving role: what it can then become, and why that is refused."""
    setup: tuple[str, ...]
    granted: str
    chain: tuple[str, ...]
    reason: str | None


MEMBERSHIPS = {
    "bypassrls-group": Membership(("CREATE ROLE {a} NOLOGIN BYPASSRLS",), "{a}", ("{a}",), "which has BYPASSRLS"),
    "two-levels": Membership(("CREATE ROLE {a} NOLOGIN", "CREATE ROLE {b} NOLOGIN SUPERUSER", "GRANT {b} TO {a}"),
                             "{a}", ("{a}", "{b}"), "which is a superuser"),
    "noinherit": Membership(("CREATE ROLE {a} NOLOGIN NOINHERIT", "CREATE ROLE {b} NOLOGIN BYPASSRLS",
                             "GRANT {b} TO {a}"), "{a}", ("{a}", "{b}"), "which has BYPASSRLS"),
    "read-all-data": Membership((), "pg_read_all_data", ("pg_read_all_data",), "which may read every table"),
    "write-all-data": Membership(("CREATE ROLE {a} NOLOGIN", "GRANT pg_write_all_data TO {a}"), "{a}",
                                 ("{a}", "pg_write_all_data"), "which may write every table"),
    "owner-group": Membership(("CREATE ROLE {a} NOLOGIN", f"GRANT {OWNER_ROLE} TO {{a}}"), "{a}",
                              ("{a}", OWNER_ROLE), "which owns tables conversation, message, task"),
    "createrole-group": Membership(("CREATE ROLE {a} NOLOGIN CREATEROLE",), "{a}", ("{a}",),
                                   "which has CREATEROLE, which before PostgreSQL 16 lets it grant itself any role"),
    "harmless-group": Membership(("CREATE ROLE {a} NOLOGIN", f"GRANT {APP_ROLE} TO {{a}}"), "{a}", ("{a}",), None),
}


@contextmanager
def groups(superuser_url, membership: Membership):
    """Creates the membership's groups under fresh names; yields it with the
    names filled in, and drops them afterwards (the cluster is shared)."""
    suffix = uuid.uuid4().hex[:8]
    names = {"a": f"iso_group_a_{suffix}", "b": f"iso_group_b_{suffix}"}
    try:
        for statement in membership.setup:
            as_superuser(superuser_url, statement.format(**names))
        yield Membership((), membership.granted.format(**names), tuple(role.format(**names) for role in membership.chain),
                         membership.reason)
    finally:
        for name in reversed(names.values()):
            as_superuser(superuser_url, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@contextmanager
def serving_role(cluster, superuser_url):
    """A fresh login role with the app role's privileges (a member of it), as
    whom the app serves; granting it something leaves the shared app role alone."""
    name = f"iso_probe_{uuid.uuid4().hex[:8]}"
    with login_role(cluster, superuser_url, name, member_of=APP_ROLE) as url:
        yield name, url


def grant(superuser_url, granted: str, role: str, *, revoke: bool = False) -> None:
    statement = "REVOKE {} FROM {}" if revoke else "GRANT {} TO {}"
    as_superuser(superuser_url, sql.SQL(statement).format(sql.Identifier(granted), sql.Identifier(role)))


def expected_refusal(role: str, membership: Membership) -> str:
    """The sentence that names the chain from `role` and the reason."""
    chain = (role, *membership.chain)
    return f"database role '{role}' is a member of role '{chain[-1]}' ({' -> '.join(chain)}), {membership.reason}"


def startup_check(url: str) -> subprocess.CompletedProcess:
    """The start-up check as the gunicorn master runs it (gunicorn.conf.py)."""
    return subprocess.run([sys.executable, "-m", "chat_blueprint.runtime.startup"], capture_output=True, text=True,
                          env={**os.environ, **app_env(url)}, timeout=60, cwd=ROOT)


@pytest.mark.parametrize("case", MEMBERSHIPS, ids=list(MEMBERSHIPS))
def test_a_role_that_can_become_a_dangerous_one_is_refused_at_start_up_and_in_readyz(cluster, superuser_url, case):
    """The finding: a role in a group with BYPASSRLS (Neon's console roles, in
    `neon_superuser`), or in `pg_read_all_data`, served and /readyz said ready."""
    with serving_role(cluster, superuser_url) as (role, url), groups(superuser_url, MEMBERSHIPS[case]) as membership:
        grant(superuser_url, membership.granted, role)
        checked = startup_check(url)
        with built_app(url) as app:
            ready = app.test_client().get("/readyz")
    if membership.reason is None:
        assert checked.returncode == 0 and checked.stderr == "", checked.stderr
        assert ready.status_code == 200, ready.get_json()
        return
    refusal_line = checked.stderr.strip()
    assert checked.returncode == 1 and "\n" not in refusal_line, checked.stderr
    assert refusal_line.startswith("refusing to serve: ") and expected_refusal(role, membership) in refusal_line
    assert ready.status_code == 503 and ready.get_json()["error"]["code"] == "isolation_not_in_force"
    assert expected_refusal(role, membership) in ready.get_json()["error"]["message"]


def test_a_role_made_in_neons_console_is_refused_as_docs_operations_shows(cluster, superuser_url):
    """Neon's shape: the Console's roles are members of `neon_superuser` (BYPASSRLS,
    CREATEROLE, CREATEDB), itself a member of pg_read_all_data, pg_write_all_data
    and pg_monitor. The line is the one docs/operations.md quotes (role names aside)."""
    neon = f"neon_superuser_{uuid.uuid4().hex[:8]}"
    # Without CREATEROLE here: Neon runs PostgreSQL 16 and later, where the check does not count it (a
    # role may grant only what it administers), and this cluster is 15, where it would add a sentence.
    as_superuser(superuser_url, sql.SQL("CREATE ROLE {} NOLOGIN BYPASSRLS CREATEDB").format(
        sql.Identifier(neon)))
    try:
        for predefined in ("pg_read_all_data", "pg_write_all_data", "pg_monitor"):
            grant(superuser_url, predefined, neon)
        with serving_role(cluster, superuser_url) as (role, url):
            grant(superuser_url, neon, role)
            checked = startup_check(url)
    finally:
        as_superuser(superuser_url, sql.SQL("DROP ROLE {}").format(sql.Identifier(neon)))
    assert checked.returncode == 1
    assert checked.stderr.strip() == (
        f"refusing to serve: database role '{role}' is a member of role '{neon}' ({role} -> {neon}), which has"
        f" BYPASSRLS; database role '{role}' is a member of role 'pg_read_all_data' ({role} -> {neon} ->"
        f" pg_read_all_data), which may read every table; database role '{role}' is a member of role"
        f" 'pg_write_all_data' ({role} -> {neon} -> pg_write_all_data), which may write every table")


def test_gunicorn_refuses_a_member_of_a_superuser_group_two_levels_up(cluster, superuser_url):
    with serving_role(cluster, superuser_url) as (role, url), \
            groups(superuser_url, MEMBERSHIPS["two-levels"]) as membership:
        grant(superuser_url, membership.granted, role)
        code, output = refusal(url)
    assert code != 0
    assert f"refusing to serve: {expected_refusal(role, membership)}" in output


def test_without_inherit_the_group_is_still_one_set_role_away(cluster, superuser_url):
    """Why NOINHERIT does not make a membership harmless: the control for the
    `noinherit` case above."""
    with serving_role(cluster, superuser_url) as (role, url), \
            groups(superuser_url, MEMBERSHIPS["noinherit"]) as membership:
        grant(superuser_url, membership.granted, role)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(membership.chain[-1])))
            assert conn.execute("select rolbypassrls from pg_roles where rolname = current_user").fetchone() == (True,)


def test_a_login_role_switched_at_connect_time_is_judged_by_what_it_can_reset_to(cluster, superuser_url):
    """`ALTER ROLE ... SET role` makes current_user the app role, but the login
    role can `RESET ROLE` to itself, and to its groups."""
    with serving_role(cluster, superuser_url) as (role, url), \
            groups(superuser_url, MEMBERSHIPS["bypassrls-group"]) as membership:
        grant(superuser_url, membership.granted, role)
        as_superuser(superuser_url, sql.SQL("ALTER ROLE {} SET role = {}").format(
            sql.Identifier(role), sql.Literal(APP_ROLE)))
        with psycopg.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
            assert conn.execute("select current_user").fetchone() == (APP_ROLE,)
            problems = isolation_problems(cursor)
    assert problems == [expected_refusal(role, membership)]


def test_the_owner_of_the_database_is_a_member_of_pg_database_owner(cluster, superuser_url):
    """A table owned by `pg_database_owner` is the database owner's to alter."""
    database = f"iso_db_{uuid.uuid4().hex[:8]}"
    with serving_role(cluster, superuser_url) as (role, url):
        as_superuser(superuser_url, sql.SQL("CREATE DATABASE {} OWNER {}").format(
            sql.Identifier(database), sql.Identifier(role)))
        try:
            with psycopg.connect(cluster.url(SUPERUSER, database), autocommit=True) as conn:
                conn.execute("CREATE TABLE task (user_id text); ALTER TABLE task OWNER TO pg_database_owner")
            with psycopg.connect(f"{url.rsplit('/', 1)[0]}/{database}") as conn, conn.cursor() as cursor:
                problems = isolation_problems(cursor)
        finally:
            as_superuser(superuser_url, sql.SQL("DROP DATABASE {}").format(sql.Identifier(database)))
    assert (f"database role '{role}' is a member of role 'pg_database_owner' ({role} -> pg_database_owner),"
            " which owns table task (an owner can turn row-level security off)") in problems


def test_a_grant_while_serving_is_refused_within_the_interval(cluster, superuser_url):
    """`GRANT <group> TO` the serving role, for each membership above: API
    requests answer 503 naming the chain within ISOLATION_CHECK_INTERVAL_S (0.5 s
    here), and 200 again once it is revoked; a harmless group changes nothing."""
    user = make_user()
    with serving_role(cluster, superuser_url) as (role, url), \
            gunicorn(url, workers=2, threads=4, ISOLATION_CHECK_INTERVAL_S="0.5") as server:
        tasks = f"{server.url}/api/{user.id}/tasks"
        assert requests.get(tasks, headers=user.headers, timeout=10).status_code == 200
        for case in MEMBERSHIPS:
            with groups(superuser_url, MEMBERSHIPS[case]) as membership:
                grant(superuser_url, membership.granted, role)
                if membership.reason is None:
                    time.sleep(0.8)  # past one interval
                    assert all_served(tasks, user), case
                    continue
                started = time.monotonic()
                refused = wait_for_status(tasks, user, 503)
                assert refused.status_code == 503 and time.monotonic() - started < 10, (case, refused.text)
                assert expected_refusal(role, membership) in refused.json()["error"]["message"]
                grant(superuser_url, membership.granted, role, revoke=True)
                assert wait_for_status(tasks, user, 200).status_code == 200, case
                time.sleep(0.7)  # one interval later, every worker has checked again
                assert all_served(tasks, user), case


def all_served(url, user, requests_count: int = 6) -> bool:
    """Several requests in a row, so that both workers answer: all 200."""
    return all(requests.get(url, headers=user.headers, timeout=10).status_code == 200 for _ in range(requests_count))
