"""Fixtures: a throwaway real PostgreSQL cluster, migrated as the owner, and
the app connected as the app role with row-level security in force.

No test here runs without PostgreSQL: if the cluster cannot start, every test
that needs it errors loudly.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import requests

from chat_blueprint import create_app
from chat_blueprint.auth import mint_token
from chat_blueprint.devcluster import APP_ROLE, OWNER_ROLE, SUPERUSER, Cluster, free_port, migrate
from chat_blueprint.extensions import db

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-for-hs256-signing-that-is-long-enough-for-hs512-too-0123456789"


@pytest.fixture(scope="session")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="chat-test-pg-"))
    root.chmod(0o755)
    cluster = Cluster(root, free_port())
    cluster.start()
    try:
        cluster.bootstrap()
        migrate(cluster, {**os.environ, "BETTER_AUTH_SECRET": SECRET})
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def app_url(cluster):
    return cluster.url(APP_ROLE)


@pytest.fixture(scope="session")
def owner_url(cluster):
    return cluster.url(OWNER_ROLE)


@pytest.fixture(scope="session")
def superuser_url(cluster):
    return cluster.url(SUPERUSER)


def app_env(database_url: str, **overrides) -> dict:
    env = {"DATABASE_URL": database_url, "BETTER_AUTH_SECRET": SECRET}
    env.update({name: str(value) for name, value in overrides.items() if value is not None})
    return env


@contextmanager
def built_app(database_url: str, **env):
    """An app connected to `database_url`; its engine is disposed afterwards."""
    app = create_app({"ENV": app_env(database_url, **env), "TESTING": True})
    try:
        yield app
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.fixture(scope="session")
def app(app_url):
    with built_app(app_url) as app:
        yield app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@dataclass
class User:
    id: str
    token: str

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


def make_user(prefix: str = "user") -> User:
    user_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
    return User(user_id, mint_token(SECRET, user_id))


@pytest.fixture
def alice() -> User:
    return make_user("alice")


@pytest.fixture
def bob() -> User:
    return make_user("bob")


@contextmanager
def connect(url: str, user_id: str | None = None):
    """A raw psycopg connection (autocommit off) for SQL-level tests."""
    with psycopg.connect(url) as conn:
        if user_id is not None:
            conn.execute("select set_config('app.user_id', %s, true)", (user_id,))
        yield conn


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def gunicorn(database_url: str, *, workers: int = 1, threads: int = 8, wait_ready=True, **env):
    """Real gunicorn with gunicorn.conf.py on a free loopback port."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="gunicorn-", suffix=".log")[1])
    environment = {
        **os.environ,
        **app_env(database_url, **env),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": str(workers),
        "GUNICORN_THREADS": str(threads),
        "GUNICORN_GRACEFUL_TIMEOUT": "10",
    }
    with log.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                   cwd=ROOT, env=environment, stdout=sink, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        if wait_ready:
            _wait_for(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.unlink(missing_ok=True)


def _wait_for(server: Server, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"gunicorn exited with {server.process.returncode}:\n{server.output()}")
        try:
            if requests.get(server.url + "/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gunicorn did not answer within {timeout_s}s:\n{server.output()}")
