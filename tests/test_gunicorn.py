"""End to end over real HTTP with real gunicorn and gunicorn.conf.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from urllib.parse import urljoin

import requests
from support import ROOT, connect, gunicorn, make_user

from devtools.ports import free_port


def test_task_round_trip_over_http(app_url):
    user = make_user()
    with gunicorn(app_url, workers=2) as server:
        base = f"{server.url}/api/{user.id}/tasks"
        created = requests.post(base, json={"title": "over http"}, headers=user.headers, timeout=10)
        assert created.status_code == 201, created.text
        task = created.json()
        assert requests.get(base, headers=user.headers, timeout=10).json() == [task]
        toggled = requests.patch(f"{base}/{task['id']}/complete", headers=user.headers, timeout=10)
        assert toggled.json()["completed"] is True, (toggled.status_code, toggled.text, task)
        assert requests.delete(f"{base}/{task['id']}", headers=user.headers, timeout=10).status_code == 204
        assert requests.get(base, headers=user.headers, timeout=10).json() == []
        assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
        assert eventually_logged(server, f'"path": "/api/{user.id}/tasks", "status": 201')
        assert user.token not in server.output()


def test_a_user_with_thousands_of_tasks_gets_pages_of_a_thousand(app_url, shared_server):
    """The finding: 20,000 tasks made `GET /tasks` answer 27 MB at once."""
    user = make_user()
    with connect(app_url, user.id) as conn:
        conn.execute("insert into task (user_id, title) select %s, 'task ' || n"
                     " from generate_series(1, 2500) n", (user.id,))
        conn.commit()
    url, pages, seen = f"{shared_server.url}/api/{user.id}/tasks", [], set()
    while url:
        response = requests.get(url, headers=user.headers, timeout=30)
        assert response.status_code == 200
        seen.update(task["id"] for task in response.json())
        pages.append(len(response.json()))
        link = response.links.get("next", {}).get("url")
        assert link is None or link.startswith(f"/api/{user.id}/tasks?")  # relative, resolved as a client does
        url = link and urljoin(response.url, link)
    assert pages == [1000, 1000, 500] and len(seen) == 2500


def eventually_logged(server, line: str, timeout_s: float = 10.0) -> bool:
    """The access log is written by another process: give it time to land."""
    deadline = time.monotonic() + timeout_s
    while line not in server.output():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def refusal(database_url: str, **env) -> tuple[int, str]:
    with gunicorn(database_url, wait_ready=False, **env) as server:
        try:
            code = server.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("gunicorn kept serving:\n" + server.output()) from None
        return code, server.output()


def test_refuses_to_serve_as_a_superuser(superuser_url):
    code, output = refusal(superuser_url.rsplit("/", 1)[0] + "/chat")
    assert code != 0
    assert "refusing to serve" in output and "superuser" in output


def test_refuses_to_serve_as_a_bypassrls_role(cluster, superuser_url):
    import psycopg

    with psycopg.connect(superuser_url, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS chat_bypass")
        conn.execute("CREATE ROLE chat_bypass LOGIN BYPASSRLS PASSWORD 'bypass-password'")
        conn.execute("GRANT CONNECT ON DATABASE chat TO chat_bypass")
    try:
        code, output = refusal(f"postgresql://chat_bypass:bypass-password@127.0.0.1:{cluster.port}/chat")
        assert code != 0
        assert "refusing to serve" in output and "BYPASSRLS" in output
    finally:
        with psycopg.connect(superuser_url, autocommit=True) as conn:
            conn.execute("DROP OWNED BY chat_bypass")
            conn.execute("DROP ROLE chat_bypass")


def test_refuses_to_serve_without_a_secret(app_url):
    code, output = refusal(app_url, BETTER_AUTH_SECRET="")
    assert code != 0 and "BETTER_AUTH_SECRET" in output


def test_database_down_at_start_is_not_a_refusal():
    user = make_user()
    with gunicorn(f"postgresql://nobody:pw@127.0.0.1:{free_port()}/chat") as server:
        response = requests.get(f"{server.url}/api/{user.id}/tasks",
                                headers={**user.headers, "X-Request-ID": "db-down-1"}, timeout=15)
        assert response.status_code == 503 and "Retry-After" in response.headers
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
        assert eventually_logged(server, '"request_id": "db-down-1", "method"')
        time.sleep(0.3)
        logged = [line for line in server.output().splitlines() if '"request_id": "db-down-1"' in line]
        assert len(logged) == 2, logged  # the warning and the access line, once each
        assert '"level": "WARNING"' in logged[0] and '"status": 503' in logged[1]


def test_wsgi_imports_without_tables_or_secret():
    """`flask db upgrade` imports wsgi before any table exists and without a secret."""
    result = subprocess.run([sys.executable, "-c", "import wsgi; print(wsgi.app.name)"], cwd=ROOT, capture_output=True,
                            text=True, env={"DATABASE_URL": "postgresql://u@127.0.0.1:1/none", "PATH": ""})
    assert result.returncode == 0, result.stderr


def test_a_ctrl_c_stops_the_gevent_workers_without_a_traceback(app_url):
    """The finding: each Ctrl-C printed a gevent `SystemExit` traceback per worker, which read like a
    crash. A terminal's Ctrl-C signals every process of its group, the master and each worker; the
    traceback came from the worker's second quit (the master's SIGQUIT after the terminal's SIGINT)
    and showed in about five stops out of six: three stops make a miss unlikely."""
    for _ in range(3):
        with gunicorn(app_url, workers=1, GUNICORN_WORKER_CLASS="gevent") as server:
            for pid in reversed(server.pids()):  # the worker first, then the master
                os.kill(pid, signal.SIGINT)
            assert server.process.wait(timeout=30) == 0
            output = server.output()
        assert "Shutting down: Master" in output
        assert "Traceback" not in output and "SystemExit" not in output, output


def test_a_worker_freezes_what_it_loaded_before_serving():
    """post_worker_init (gunicorn.conf.py) runs once the worker has loaded the
    app: everything alive then leaves the cyclic collector's generations, so a
    full collection no longer walks the app and its imports (docs/benchmarks.md)."""
    probe = ("import gc, runpy; conf = runpy.run_path('gunicorn.conf.py'); import wsgi; "
             "before = gc.get_freeze_count(); conf['post_worker_init'](None); "
             "print(before, gc.get_freeze_count(), len(gc.get_objects(generation=2)))")
    env = {**os.environ, "BETTER_AUTH_SECRET": "s" * 40, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    before, frozen, left = map(int, done.stdout.split())
    assert before == 0 and frozen > 50_000 and left < 1_000, done.stdout
