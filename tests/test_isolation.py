"""Roles that could turn isolation off are refused, at start-up and while
serving: the table owner, a member of the owner's role, and a role altered
to BYPASSRLS after the server started. Real roles, real ALTER ROLE, real
gunicorn."""
from __future__ import annotations

import time
from contextlib import contextmanager

import psycopg
import pytest
import requests
from psycopg import sql
from support import built_app, gunicorn, make_user
from test_gunicorn import refusal

from devtools.cluster import APP_ROLE, OWNER_ROLE
from chat_blueprint.db.isolation import IsolationNotInForce


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
    assert f"is a member of role '{OWNER_ROLE}', which owns tables" in output


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
