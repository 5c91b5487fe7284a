"""What the phases start and drive: the seeded database, pgbench and wrk with
their scripts, gunicorn through the launcher the tests use, the slow upstream
(bench/slow_upstream.py) and the load generator (bench/load.py), each of the
last two a script run in a process of its own."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg

from bench.settings import (
    BASELINE_DATABASE,
    CONVERSATIONS,
    HISTORY_CONVERSATIONS,
    LONG_HISTORY,
    NORLS_DATABASE,
    ROOT,
    SECONDS,
    SECRET,
    SEED_MESSAGES,
    STREAM_CHUNKS,
    STREAM_INTERVAL_S,
    USERS,
    log,
)
from chat_blueprint.auth import mint_token
from chat_blueprint.db.models import ISOLATED_TABLES
from chat_blueprint.services import turn_sql
from devtools.cluster import APP_ROLE, DATABASE, OWNER_ROLE, SUPERUSER, Cluster, migrate
from devtools.ports import free_port
from devtools.server import Server, serve


def conversation_uuid(label: str) -> str:
    return str(uuid.UUID(hashlib.md5(label.encode()).hexdigest()))


def user_of(n: int) -> str:
    return f"bench-{n % USERS}"


def all_targets() -> list[tuple[str, str]]:
    """(user, conversation id) of every seeded conversation."""
    return [(user_of(n), conversation_uuid(f"conv-{n}")) for n in range(1, CONVERSATIONS + 1)]


SEED_SQL = """
INSERT INTO conversation (id, user_id, title, message_count, turn_count)
SELECT md5('conv-' || n)::uuid, 'bench-' || (n % {users}), 'bench conversation', {messages}, {turns}
FROM generate_series(1, {conversations}) AS n;

INSERT INTO message (conversation_id, user_id, role, content, turn)
SELECT md5('conv-' || n)::uuid, 'bench-' || (n % {users}), 'user', 'seeded question ' || t, t
FROM generate_series(1, {conversations}) AS n, generate_series(1, {turns}) AS t;

INSERT INTO message (conversation_id, user_id, role, content, reply_to)
SELECT conversation_id, user_id, 'assistant', 'seeded answer ' || turn, id
FROM message WHERE role = 'user';
"""

HISTORY_SQL = """
INSERT INTO conversation (id, user_id, title, message_count, turn_count)
VALUES (%(id)s, %(user)s, 'history', %(messages)s, %(turns)s);

INSERT INTO message (conversation_id, user_id, role, content, turn)
SELECT %(id)s, %(user)s, 'user', 'question ' || t, t FROM generate_series(1, %(turns)s) AS t;

INSERT INTO message (conversation_id, user_id, role, content, reply_to)
SELECT conversation_id, user_id, 'assistant', 'answer ' || turn, id
FROM message WHERE conversation_id = %(id)s AND role = 'user';
"""


def seed(url: str) -> dict:
    """Many users and conversations, plus conversations of 10 and 10,000 messages."""
    turns = SEED_MESSAGES // 2
    histories = {"short": [], "long": []}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED_SQL.format(users=USERS, conversations=CONVERSATIONS, messages=SEED_MESSAGES, turns=turns))
        for kind, messages in (("short", 10), ("long", LONG_HISTORY)):
            for i in range(HISTORY_CONVERSATIONS):
                conversation_id = conversation_uuid(f"history-{kind}-{i}")
                user = f"bench-{i}"
                for statement in filter(str.strip, HISTORY_SQL.split(";")):
                    conn.execute(statement, {"id": conversation_id, "user": user, "messages": messages,
                                             "turns": messages // 2})
                histories[kind].append((user, conversation_id))
        conn.execute("VACUUM ANALYZE")
    return histories


def disable_policies(owner_url: str) -> None:
    """The bench-only copy: same schema, RLS still enabled and forced (so the app
    agrees to serve), but every policy admits every row: the predicate's cost is gone."""
    with psycopg.connect(owner_url, autocommit=True) as conn:
        for table in ISOLATED_TABLES:
            conn.execute(f"ALTER POLICY {table}_isolation ON {table} USING (true) WITH CHECK (true)")


def prepare(cluster: Cluster, norls: bool, baseline_tree: Path | None = None) -> dict:
    """Roles, the database (and, with `norls`, the rls phase's copy whose policies
    admit every row; with `baseline_tree`, a database migrated by that checkout's
    own migrations, BASELINE_DATABASE, for its app), migrations, seed data;
    returns the history phase's conversations."""
    cluster.bootstrap()
    databases = [DATABASE, *([NORLS_DATABASE] if norls else []), *([BASELINE_DATABASE] if baseline_tree else [])]
    with psycopg.connect(cluster.url(SUPERUSER, "postgres"), autocommit=True) as conn:
        for database in databases[1:]:
            conn.execute(f"CREATE DATABASE {database} OWNER {OWNER_ROLE}")
    for database in databases:
        root = baseline_tree if database == BASELINE_DATABASE else ROOT
        migrate(cluster, {**os.environ, "BETTER_AUTH_SECRET": SECRET, "PYTHONPATH": str(root)}, database=database,
                quiet=True, root=root)
        with psycopg.connect(cluster.url(OWNER_ROLE, database), autocommit=True) as conn:
            # Bench only: pgbench reads currval() of the message ids (see pgbench_script).
            conn.execute(f"GRANT SELECT ON SEQUENCE message_id_seq TO {APP_ROLE}")
    if norls:
        disable_policies(cluster.url(OWNER_ROLE, NORLS_DATABASE))
    log("seeding")
    histories = {}
    for database in databases:  # the same data in each: only the policies (or the app's revision) differ
        histories = seed(cluster.url(SUPERUSER, database))
    return histories


def pgbench_script(conversations: int = CONVERSATIONS, users: int = USERS, content: str = "bench turn") -> str:
    """The SQL of one chat turn, taken from chat_blueprint/services/turn_sql.py,
    with each bind parameter replaced by an expression over pgbench's random
    conversation number (conversation n is md5('conv-' || n), of user
    'bench-' || n % users): two pipelined transactions, as the app sends them.
    pgbench cannot carry a result into a pipeline, so the reply names its user
    message with currval() of the message id sequence (this connection's last insert)."""
    values = {
        "conversation_id": "md5('conv-' || :n)::uuid",
        "user_id": "('bench-' || :u)",
        "content": "'" + content.replace("'", "''") + "'",
        "title": "'bench'",
        "key": "NULL::text",
        "limit": "50",
        "tool_calls": "'[]'::jsonb",
        # The reply-to-be is the last message this connection inserted.
        "reply_id": "currval(pg_get_serial_sequence('message', 'id'))",
        "user_ui_id": "'msg-' || md5(random()::text)",
        "reply_ui_id": "'msg-' || md5(random()::text)",
        "stale_after": "interval '60 seconds'",
        "response": "'{\"assistant_message_id\": null}'::jsonb",
        "model": "'builtin'",
        "finish_reason": "'stop'",
        "usage": "NULL::jsonb",
        # The write-limit step the app takes in the same statement, at 6,000/minute so that
        # pgbench's 10+ turns/s per user are all admitted, as the app's are
        "interval": "interval '0.01 seconds'",
        "period": "interval '60 seconds'",
    }

    def statement(sql: str) -> str:
        for name, value in values.items():
            sql = sql.replace(f"%({name})s", value)
        if unknown := re.findall(r"%\((\w+)\)s", sql):
            raise RuntimeError(f"pgbench_script: no value for the turn's parameters {unknown}")
        return " ".join(sql.split())

    bind = "SELECT set_config('app.user_id', 'bench-' || :u, true);"
    store = statement(turn_sql.STORE_IN_CONVERSATION)
    return "\n".join([
        f"\\set n random(1, {conversations})",
        f"\\set u :n % {users}",
        "\\startpipeline",
        "BEGIN;", bind, store + ";", statement(turn_sql.LATEST_WINDOW) + ";", "COMMIT;",
        "\\endpipeline",
        "\\startpipeline",
        "BEGIN;", bind, statement(turn_sql.FINISH_REPLY) + ";", "COMMIT;",
        "\\endpipeline",
    ]) + "\n"


def pgbench(cluster: Cluster, work: Path, clients: int, database: str = DATABASE, seconds: float = SECONDS,
            script_text: str | None = None) -> float:
    """Turns per second of `clients` pgbench clients running pgbench_script()
    (or `script_text`) as the app role."""
    script = work / f"chat_turn_{database}.sql"
    script.write_text(script_text or pgbench_script())
    command = [str(cluster.bindir / "pgbench"), "-n", "-M", "prepared", "-f", str(script), "-c", str(clients),
               "-j", str(min(clients, 2)), "-T", str(max(1, round(seconds))), cluster.url(APP_ROLE, database)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"pgbench failed:\n{finished.stdout}\n{finished.stderr}")
    output = finished.stdout
    match = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", output)
    if not match:
        raise RuntimeError("pgbench printed no tps:\n" + output)
    return float(match.group(1))


def token_rows(targets: list[tuple[str, str]]) -> list[list[str]]:
    """[user, token, conversation id] for each (user, conversation id), one token a user."""
    tokens = {user: mint_token(SECRET, user, ttl_s=86_400) for user in {user for user, _ in targets}}
    return [[user, tokens[user], conversation_id] for user, conversation_id in targets]


# A chat turn on a random target (user, token, conversation id).
CHAT_REQUEST = """
request = function()
  local t = targets[math.random(1, #targets)]
  return wrk.format("POST", "/api/" .. t[1] .. "/chat",
    {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. t[2]}},
    '{{"message": {message}, "conversation_id": "' .. t[3] .. '"}}')
end
"""

WRK_SCRIPT = """
local targets = {targets}
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("tid", counter)
end
function init(args)
  math.randomseed(os.time() * 1000 + tid)
end
{request}
function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format('WRK_JSON {{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"non_2xx": %d, "socket_errors": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    errors.status, errors.connect + errors.read + errors.write + errors.timeout))
end
"""


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["per_s"])[len(runs) // 2]


def lua_targets(targets: list[tuple[str, str]]) -> str:
    rows = [f'{{"{user}", "{token}", "{conversation_id}"}}' for user, token, conversation_id in token_rows(targets)]
    return "{" + ",\n".join(rows) + "}"


def wrk(url: str, work: Path, name: str, targets, connections: int, seconds: float = SECONDS,
        request: str | None = None) -> dict:
    """wrk at `connections` clients sending `request` (a Lua function over
    `targets`; by default a chat turn of "bench turn")."""
    script = work / f"{name}.lua"
    request = request or CHAT_REQUEST.format(message=json.dumps("bench turn"))
    script.write_text(WRK_SCRIPT.format(targets=lua_targets(targets), request=request))
    threads = max(1, min(connections, 2))
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
               "--timeout", "30s", "-s", str(script), url]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    line = next((line for line in output.splitlines() if line.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError("wrk printed no summary:\n" + output)
    result = json.loads(line.removeprefix("WRK_JSON "))
    result["per_s"] = result["requests"] / (result["duration_us"] / 1e6)
    result["p50_ms"] = result["p50_us"] / 1000
    result["p99_ms"] = result["p99_us"] / 1000
    result["connections"] = connections
    ok = result["non_2xx"] == 0 and result["socket_errors"] == 0
    log(f"{name}: c={connections} {result['per_s']:.0f}/s p50={result['p50_ms']:.1f}ms p99={result['p99_ms']:.1f}ms"
        + ("" if ok else f" non_2xx={result['non_2xx']} socket_errors={result['socket_errors']}"))
    return result


@contextmanager
def gunicorn(database_url: str, work: Path, name: str, root: Path = ROOT, **env):
    """The launcher the tests use, serving once /readyz answers; logs stay in `work`."""
    environment = {"DATABASE_URL": database_url, "BETTER_AUTH_SECRET": SECRET, **env}
    with serve(environment, root=root, log=work / f"gunicorn-{name}.log", ready_path="/readyz",
               start_timeout_s=120, stop_timeout_s=30) as server:
        yield server


@contextmanager
def slow_upstream(delay_s: float = 1.0, chunks: int = STREAM_CHUNKS, interval_s: float = STREAM_INTERVAL_S):
    """bench/slow_upstream.py in its own process (answering after `delay_s`, or
    streaming `chunks` deltas `interval_s` apart); yields the process and its base URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "slow_upstream.py"), "--port", str(port),
                                "--delay", str(delay_s), "--chunks", str(chunks), "--interval", str(interval_s)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the slow upstream did not start") from None
                time.sleep(0.05)
        yield process, f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait()


def openai_env(base_url: str) -> dict:
    return {"ASSISTANT": "openai", "ASSISTANT_BASE_URL": base_url, "ASSISTANT_MODEL": "bench"}


def load(work: Path, name: str, spec: dict) -> dict:
    """bench/load.py with `spec` in its own process; its JSON answer."""
    path = work / f"load-{name}.json"
    path.write_text(json.dumps(spec))
    finished = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), str(path)], capture_output=True,
                              text=True)
    if finished.returncode != 0:
        raise RuntimeError(f"the load generator failed:\n{finished.stderr}")
    return json.loads(finished.stdout)


def turns_spec(server: Server, targets, clients: int, seconds: float, stream: bool = False) -> dict:
    port = int(server.url.rsplit(":", 1)[1])
    return {"mode": "turns", "host": "127.0.0.1", "port": port, "targets": token_rows(targets),
            "clients": clients, "seconds": seconds, "stream": stream}
