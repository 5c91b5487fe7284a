"""Test helpers that are not fixtures: users and tokens, raw SQL connections,
throwaway clusters, apps, gunicorn servers, raw HTTP exchanges, shared
assertions. Test modules import them from here; conftest.py holds the fixtures."""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import jinja2.sandbox
import psycopg
import pytest

from chat_blueprint import create_app
from chat_blueprint.auth import mint_token
from chat_blueprint.db.extensions import db
from devtools.cluster import Cluster, migrate
from devtools.ports import free_port
from devtools.server import Server, serve
from devtools.settings import SettingError, check_app_settings

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-for-hs256-signing-that-is-long-enough-for-hs512-too-0123456789"


@contextmanager
def throwaway_cluster(prefix: str = "chat-test-pg-"):
    """A fresh cluster, migrated as the owner with `flask db upgrade`; removed afterwards.

    A setting in the environment that the app refuses (the servers and the
    migration inherit it) ends the whole run at once, in one line naming the
    variable, before any cluster starts: not a traceback in every test."""
    env = {**os.environ, "BETTER_AUTH_SECRET": SECRET}
    try:
        check_app_settings({**env, "DATABASE_URL": "postgresql://127.0.0.1/chat"})
    except SettingError as refusal:
        pytest.exit(f"make test: {refusal}", returncode=1)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    cluster = Cluster(root, free_port())
    try:
        cluster.start()
        cluster.bootstrap()
        migrate(cluster, env)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


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


@contextmanager
def connect(url: str, user_id: str | None = None):
    """A raw psycopg connection (autocommit off) for SQL-level tests."""
    with psycopg.connect(url) as conn:
        if user_id is not None:
            conn.execute("select set_config('app.user_id', %s, true)", (user_id,))
        yield conn


@contextmanager
def gunicorn(database_url: str, *, workers: int = 1, threads: int = 8, wait_ready=True, **env):
    """Real gunicorn with gunicorn.conf.py on a free loopback port (the launcher
    `make run` and the benchmarks use too), logging to a file of its own."""
    log = Path(tempfile.mkstemp(prefix="gunicorn-", suffix=".log")[1])
    environment = {**app_env(database_url, **env), "WEB_CONCURRENCY": str(workers), "GUNICORN_THREADS": str(threads),
                   "GUNICORN_GRACEFUL_TIMEOUT": "10"}
    try:
        with serve(environment, log=log, wait=False) as server:
            if wait_ready:
                wait_until_serving(server)
            yield server
    finally:
        log.unlink(missing_ok=True)


def wait_until_serving(server: Server, timeout_s: float = 90.0) -> None:
    """Until gunicorn answers /healthz. Its master listens before a worker has
    booted, so a probe may wait on a busy machine: that is not a failure."""
    server.wait_until_serving(timeout_s)


def assert_burst_stored(app_url: str, user: User, conversation_id: str, answers: list[dict], burst: int) -> None:
    """After a first turn ("start") and `burst` simultaneous ones ("burst N") on one
    conversation: every message is stored once, turns are numbered 1..burst+1,
    each reply answers a distinct, earlier question of that conversation, and
    each answer names the turn its question got."""
    with connect(app_url, user.id) as conn:
        rows = conn.execute("select id, role, content, reply_to, turn from message where conversation_id = %s"
                            " order by id", (conversation_id,)).fetchall()
        message_count = conn.execute("select message_count from conversation where id = %s",
                                     (conversation_id,)).fetchone()[0]
    questions = {row[0]: row for row in rows if row[1] == "user"}
    replies = [row for row in rows if row[1] == "assistant"]
    assert len(rows) == message_count == 2 * (burst + 1)
    assert sorted(row[2] for row in questions.values()) == sorted(["start"] + [f"burst {n}" for n in range(burst)])
    assert sorted(row[4] for row in questions.values()) == list(range(1, burst + 2))
    answered = [row[3] for row in replies]
    assert len(set(answered)) == len(answered) == burst + 1
    assert all(row[3] in questions and row[3] < row[0] for row in replies)
    by_id = {row[0]: row for row in rows}
    for answer in answers:
        assert by_id[answer["assistant_message_id"]][3] == answer["user_message_id"]
        assert answer["response"].startswith(f"turn {by_id[answer['user_message_id']][4]}:")
    assert sorted(by_id[a["user_message_id"]][4] for a in answers) == list(range(2, burst + 2))


@dataclass
class RawResponse:
    status: int
    headers: dict
    body: bytes

    def json(self):
        import json

        return json.loads(self.body)


def raw_exchange(url: str, parts, timeout_s: float = 30.0) -> RawResponse:
    """Send bytes exactly as given (`parts`, an iterable of request line,
    headers and body pieces, produced lazily if it is a generator) over a
    fresh TCP connection, and read one response.

    The parts go out from another thread while the response is read, so a
    server that answers before the body is all sent (a 413) is heard, and a
    connection it closes early ends only the sending.
    """
    import socket
    import threading
    from urllib.parse import urlsplit

    address = urlsplit(url)
    sock = socket.create_connection((address.hostname, address.port), timeout=timeout_s)

    def send():
        try:
            for part in parts:
                sock.sendall(part)
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        received = b""
        while b"\r\n\r\n" not in received:
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed before a response; got {received!r}")
            received += data
        head, _, body = received.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            data = sock.recv(65536)
            if not data:
                break
            body += data
        return RawResponse(int(status_line.split()[1]), headers, body[:length])
    finally:
        # The sender ends before the socket is closed: a descriptor closed under
        # it could be reused by another thread's connection and written to.
        try:
            sock.shutdown(socket.SHUT_RDWR)  # a send blocked on a server that stopped reading fails at once
        except OSError:
            pass
        sender.join(timeout_s)
        sock.close()


# The rule strict chat templates enforce (the templates of several open models, as
# vLLM and llama.cpp's server render them with Jinja): an optional system message
# first, then user and assistant strictly alternating, starting with the user.
# Written here in the same Jinja those servers run, so a window that passes is one
# they render; the servers answer 400 (vLLM) or 500 (llama.cpp) where it raises.
STRICT_CHAT_TEMPLATE = """
{%- if messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = none -%}{%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {{- '[INST] ' + (system + '\\n\\n' if system and loop.first else '') + message['content'] + ' [/INST]' -}}
  {%- else -%}
    {{- ' ' + message['content'] + '</s>' -}}
  {%- endif -%}
{%- endfor -%}
"""


class ChatTemplateError(Exception):
    pass


def render_strict_chat_template(messages: list[dict]) -> str:
    """`messages` rendered by STRICT_CHAT_TEMPLATE; ChatTemplateError where it refuses them."""
    def raise_exception(message):
        raise ChatTemplateError(message)

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = raise_exception
    return environment.from_string(STRICT_CHAT_TEMPLATE).render(messages=messages)


class StreamEvents:
    """What a test reads of an AI SDK UI message stream, from its parsed events (`self.events`)."""

    events: list[dict]

    @property
    def types(self) -> list[str]:
        return [event["type"] for event in self.events]

    def text(self) -> str:
        return "".join(event["delta"] for event in self.events if event["type"] == "text-delta")
