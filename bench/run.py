"""`make bench`: chat turns against the database ceiling, history growth, slow
assistants, and the cost of row-level security.

Sets up its own PostgreSQL cluster and gunicorn (from gunicorn.conf.py), seeds
many users and conversations, then runs the phases below and prints one
`name=value` per line at the end. BENCH_SECONDS (default 20) is the length of
every measured phase; BENCH_SECONDS=3 gives a quick run.

1. ceiling   pgbench runs the SQL of one chat turn as the app role, RLS forced
2. app       wrk posts chat turns over HTTP (builtin assistant) at several concurrencies
3. history   turn latency in conversations of 10 and of 10,000 messages
4. slow      ASSISTANT=openai against a local server answering after 1.0 s, 200 clients
5. rls       phase 2 at its best concurrency against a copy whose policies admit every row

BENCH_BASELINE=<git revision> adds a before/after comparison of the app at that
revision against the working tree, in the same run (`baseline_speedup`).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import requests

ROOT = Path(__file__).resolve().parent.parent


from chat_blueprint.auth import mint_token  # noqa: E402
from chat_blueprint.devcluster import APP_ROLE, OWNER_ROLE, SUPERUSER, Cluster, free_port  # noqa: E402

SECONDS = float(os.environ.get("BENCH_SECONDS", "20"))
CONCURRENCIES = [int(c) for c in os.environ.get("BENCH_CONCURRENCIES", "1,16,64").split(",")]
USERS = 200
CONVERSATIONS = 2000
SEED_MESSAGES = 10
HISTORY_CONVERSATIONS = 64
LONG_HISTORY = 10_000
SLOW_CLIENTS = 200
RLS_ROUNDS = 3
BASELINE = os.environ.get("BENCH_BASELINE")
SAME_RUNTIME = {"WEB_CONCURRENCY": "4", "GUNICORN_THREADS": "64", "DATABASE_POOL_SIZE": "2"}
PHASES = set(os.environ.get("BENCH_PHASES", "ceiling,app,history,rls,slow").split(","))
SLOW_ASSISTANT_S = 1.0
SECRET = "bench-secret-" + uuid.uuid4().hex * 2
RESULTS = ROOT / "bench" / "results"
NORLS_DATABASE = "chat_norls"
ISOLATED_TABLES = ("conversation", "message", "task", "idempotency_key")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def conversation_uuid(label: str) -> str:
    return str(uuid.UUID(hashlib.md5(label.encode()).hexdigest()))


def user_of(n: int) -> str:
    return f"bench-{n % USERS}"


def migrate(url: str) -> None:
    env = {**os.environ, "DATABASE_URL": url, "APP_DB_ROLE": APP_ROLE, "BETTER_AUTH_SECRET": SECRET}
    subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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


def pgbench_script() -> str:
    """The SQL of one chat turn, taken from turns.py, with each bind
    parameter replaced by an expression over pgbench's random conversation
    number: two pipelined transactions, as the app sends them. pgbench cannot
    carry a result into a pipeline, so the reply names its user message with
    currval() of the message id sequence (this connection's last insert)."""
    from chat_blueprint import turns

    values = {
        "conversation_id": "md5('conv-' || :n)::uuid",
        "user_id": "('bench-' || :u)",
        "content": "'bench turn'",
        "title": "'bench'",
        "key": "NULL::text",
        "limit": "50",
        "tool_calls": "'[]'::jsonb",
        "reply_to": "currval(pg_get_serial_sequence('message', 'id'))",
        "response": "'{\"assistant_message_id\": null}'::jsonb",
    }

    def statement(sql: str) -> str:
        for name, value in values.items():
            sql = sql.replace(f"%({name})s", value)
        return " ".join(sql.split())

    bind = "SELECT set_config('app.user_id', 'bench-' || :u, true);"
    store = statement(turns.STORE_IN_CONVERSATION)
    return "\n".join([
        f"\\set n random(1, {CONVERSATIONS})",
        f"\\set u :n % {USERS}",
        "\\startpipeline",
        "BEGIN;", bind, store + ";", statement(turns.LATEST_WINDOW) + ";", "COMMIT;",
        "\\endpipeline",
        "\\startpipeline",
        "BEGIN;", bind, statement(turns.STORE_REPLY) + ";", "COMMIT;",
        "\\endpipeline",
    ]) + "\n"


def pgbench(cluster: Cluster, work: Path, clients: int, database: str = "chat", seconds: float = SECONDS) -> float:
    script = work / "chat_turn.sql"
    script.write_text(pgbench_script())
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
request = function()
  local t = targets[math.random(1, #targets)]
  return wrk.format("POST", "/api/" .. t[1] .. "/chat",
    {{["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. t[2]}},
    '{{"message": "bench turn", "conversation_id": "' .. t[3] .. '"}}')
end
function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format('WRK_JSON {{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, '
    .. '"non_2xx": %d, "socket_errors": %d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    errors.status, errors.connect + errors.read + errors.write + errors.timeout))
end
"""


def lua_targets(targets: list[tuple[str, str]]) -> str:
    tokens = {}
    rows = []
    for user, conversation_id in targets:
        if user not in tokens:
            tokens[user] = mint_token(SECRET, user, ttl_s=86_400)
        rows.append(f'{{"{user}", "{tokens[user]}", "{conversation_id}"}}')
    return "{" + ",\n".join(rows) + "}"


def wrk(url: str, work: Path, name: str, targets, connections: int, seconds: float = SECONDS) -> dict:
    script = work / f"{name}.lua"
    script.write_text(WRK_SCRIPT.format(targets=lua_targets(targets)))
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
    port = free_port()
    environment = {**os.environ, "DATABASE_URL": database_url, "BETTER_AUTH_SECRET": SECRET, "HOST": "127.0.0.1",
                   "PORT": str(port), **{k: str(v) for k, v in env.items()}}
    log_path = work / f"gunicorn-{name}.log"
    with log_path.open("w") as sink:
        process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                   cwd=root, env=environment, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not become ready:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def slow_upstream(delay_s: float):
    """bench/slow_upstream.py in its own process; yields its base URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "slow_upstream.py"), "--port", str(port),
                                "--delay", str(delay_s)])
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
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait()


class ConnectionWatcher:
    """Samples the app role's connections in pg_stat_activity every 100 ms."""

    def __init__(self, superuser_url: str):
        self.url = superuser_url
        self.max_open = 0
        self.max_active = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.wait(0.1):
                opened, active = conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE state <> 'idle') FROM pg_stat_activity"
                    " WHERE usename = %s AND backend_type = 'client backend'", (APP_ROLE,)).fetchone()
                self.max_open = max(self.max_open, opened)
                self.max_active = max(self.max_active, active)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def all_targets():
    return [(user_of(n), conversation_uuid(f"conv-{n}")) for n in range(1, CONVERSATIONS + 1)]


def plot(app_runs: list[dict], ceiling_tps: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrency = [run["connections"] for run in app_runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(concurrency, [run["p50_ms"] for run in app_runs], marker="o", label="p50")
    left.plot(concurrency, [run["p99_ms"] for run in app_runs], marker="o", label="p99")
    left.set_xscale("log", base=2)
    left.set_xlabel("concurrent clients")
    left.set_ylabel("chat turn latency (ms)")
    left.set_title("Latency against concurrency")
    left.legend()
    right.plot(concurrency, [run["per_s"] for run in app_runs], marker="o", label="app (HTTP)")
    right.axhline(ceiling_tps, color="grey", linestyle="--", label="database ceiling (pgbench)")
    right.set_xscale("log", base=2)
    right.set_xlabel("concurrent clients")
    right.set_ylabel("chat turns per second")
    right.set_title("Throughput")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def compare_with_baseline(cluster: Cluster, work: Path, targets, revision: str) -> dict:
    """The app at `revision` (a git worktree) against the app as it is, on the same
    database and runtime settings, measured in turns (A B A B A B) at 16 clients."""
    log(f"baseline: {revision} against the working tree")
    tree = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision], check=True,
                   capture_output=True)
    try:
        with gunicorn(cluster.url(APP_ROLE), work, "baseline", root=tree, PYTHONPATH=str(tree),
                      **SAME_RUNTIME) as before_url, \
                gunicorn(cluster.url(APP_ROLE), work, "current", **SAME_RUNTIME) as after_url:
            runs = {"before": [], "after": []}
            for name, url in (("before", before_url), ("after", after_url)):
                wrk(url, work, f"warmup-{name}", targets, 16, seconds=min(SECONDS, 5))
            for round_ in range(RLS_ROUNDS):
                for name, url in (("before", before_url), ("after", after_url)):
                    runs[name].append(wrk(url, work, f"{name}-{round_}", targets, 16, seconds=SECONDS / 2))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    medians = {name: sorted(found, key=lambda run: run["per_s"])[len(found) // 2] for name, found in runs.items()}
    return {"revision": revision, **medians}


def runs_of(results: dict) -> list[dict]:
    baseline = [results["baseline"][name] for name in ("before", "after")] if "baseline" in results else []
    return [*results.get("app", []), *results.get("history", {}).values(), *results.get("rls", {}).values(), *baseline,
            *([results["slow"]] if "slow" in results else [])]


def summarize(results: dict) -> dict:
    """The figures the issue asks for, from the phases that ran."""
    summary = {}
    if "ceiling" in results:
        summary["ceiling_tps"] = round(max(results["ceiling"].values()), 1)
    if "app" in results:
        best = max(results["app"], key=lambda run: run["per_s"])
        summary["app_turns_per_s"] = round(best["per_s"], 1)
        if "ceiling_tps" in summary:
            summary["ceiling_ratio"] = round(best["per_s"] / summary["ceiling_tps"], 3)
    if "history" in results:
        history = results["history"]
        summary["history_p50_ratio"] = round(history["long"]["p50_ms"] / history["short"]["p50_ms"], 3)
    if "slow" in results:
        summary["slow_turns_per_s"] = round(results["slow"]["per_s"], 1)
        summary["slow_p99_ms"] = round(results["slow"]["p99_ms"], 1)
        summary["slow_max_db_connections"] = results["slow"]["max_db_connections"]
    if "baseline" in results:
        baseline = results["baseline"]
        summary["baseline_speedup"] = round(baseline["after"]["per_s"] / baseline["before"]["per_s"], 3)
    if "rls" in results:
        summary["rls_overhead_ratio"] = round(results["rls"]["with"]["per_s"] / results["rls"]["without"]["per_s"], 3)
    return summary


def main() -> int:
    for tool in ("wrk",):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: install the distribution's {tool} package (make bench does)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    work.chmod(0o755)
    cluster = Cluster(work / "cluster", free_port())
    log(f"cluster in {work}; every phase runs {SECONDS:g}s")
    cluster.start()
    results: dict = {"seconds": SECONDS, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    try:
        cluster.bootstrap()
        with psycopg.connect(cluster.url(SUPERUSER, "postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {NORLS_DATABASE} OWNER {OWNER_ROLE}")
        for database in ("chat", NORLS_DATABASE):
            migrate(cluster.url(OWNER_ROLE, database))
            with psycopg.connect(cluster.url(OWNER_ROLE, database), autocommit=True) as conn:
                # Bench only: pgbench reads currval() of the message ids (see pgbench_script).
                conn.execute(f"GRANT SELECT ON SEQUENCE message_id_seq TO {APP_ROLE}")
        disable_policies(cluster.url(OWNER_ROLE, NORLS_DATABASE))
        log("seeding")
        histories = seed(cluster.url(SUPERUSER, "chat"))
        if "rls" in PHASES:
            seed(cluster.url(SUPERUSER, NORLS_DATABASE))  # the same data: only the policies differ

        if "ceiling" in PHASES:
            log("phase 1: ceiling (pgbench)")
            ceiling = {c: pgbench(cluster, work, c) for c in (16, 64)}
            for clients, tps in ceiling.items():
                log(f"ceiling: c={clients} {tps:.0f} turns/s")
            results["ceiling"] = ceiling
            if "rls" in PHASES:
                # The database's own cost of the policies, without the app's noise.
                rounds = {"with": [], "without": []}
                for _ in range(RLS_ROUNDS):
                    rounds["with"].append(pgbench(cluster, work, 16, seconds=SECONDS / 2))
                    rounds["without"].append(pgbench(cluster, work, 16, NORLS_DATABASE, seconds=SECONDS / 2))
                results["ceiling_rls"] = {name: sorted(found)[len(found) // 2] for name, found in rounds.items()}
                log(f"ceiling with RLS {results['ceiling_rls']['with']:.0f}, "
                    f"without {results['ceiling_rls']['without']:.0f} turns/s (medians)")

        targets = all_targets()
        if PHASES & {"app", "history", "rls"}:
            with gunicorn(cluster.url(APP_ROLE), work, "app") as url:
                wrk(url, work, "warmup", targets, 16, seconds=min(SECONDS, 5))
                if PHASES & {"app", "rls"}:
                    log("phase 2: app (wrk, builtin assistant)")
                    results["app"] = [wrk(url, work, f"app-c{c}", targets, c) for c in CONCURRENCIES]
                if "history" in PHASES:
                    # One client, so no turn waits on another's row lock: the latency is
                    # the turn's own. The same number of conversations of each kind, so
                    # each conversation row is as hot in both; the short ones get a few
                    # dozen turns in the run, far fewer than the long ones' 10,000 messages.
                    log("phase 3: history growth")
                    results["history"] = {kind: wrk(url, work, f"history-{kind}", histories[kind], 1,
                                                    seconds=SECONDS / 2) for kind in ("short", "long")}

        if "rls" in PHASES:
            # Both servers up at once and measured in turns, A B A B A B, so that
            # the machine's drift hits both alike; the ratio is of the medians.
            best = max(results["app"], key=lambda run: run["per_s"])
            log("phase 5: RLS overhead (same load, policies admitting every row)")
            with gunicorn(cluster.url(APP_ROLE), work, "rls-again") as with_url, \
                    gunicorn(cluster.url(APP_ROLE, NORLS_DATABASE), work, "no-rls") as without_url:
                runs = {"with": [], "without": []}
                for name, url in (("with", with_url), ("without", without_url)):
                    wrk(url, work, f"warmup-{name}-rls", targets, 16, seconds=min(SECONDS, 5))
                for round_ in range(RLS_ROUNDS):
                    for name, url in (("with", with_url), ("without", without_url)):
                        runs[name].append(wrk(url, work, f"{name}-rls-{round_}", targets, best["connections"],
                                              seconds=SECONDS / 2))
            results["rls"] = {name: sorted(found, key=lambda run: run["per_s"])[len(found) // 2]
                              for name, found in runs.items()}

        if BASELINE and "app" in PHASES:
            results["baseline"] = compare_with_baseline(cluster, work, targets, BASELINE)

        if "slow" in PHASES:
            log(f"phase 4: slow assistant ({SLOW_ASSISTANT_S:g} s), {SLOW_CLIENTS} clients")
            with slow_upstream(SLOW_ASSISTANT_S) as base_url, \
                    gunicorn(cluster.url(APP_ROLE), work, "slow", ASSISTANT="openai", ASSISTANT_BASE_URL=base_url,
                             ASSISTANT_MODEL="bench") as url, \
                    ConnectionWatcher(cluster.url(SUPERUSER, "chat")) as watcher:
                slow = wrk(url, work, "slow", targets, SLOW_CLIENTS, seconds=max(SECONDS, 5))
            slow["max_db_connections"] = watcher.max_open
            slow["max_active_db_connections"] = watcher.max_active
            log(f"slow: most app-role connections open {watcher.max_open}, busy {watcher.max_active}")
            results["slow"] = slow

        summary = summarize(results)
        results["summary"] = summary
        if "app" in results and "ceiling" in results:
            plot(results["app"], max(results["ceiling"].values()), RESULTS / "latency.png")
        (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
        errors = sum(run["non_2xx"] + run["socket_errors"] for run in runs_of(results))
        print(f"\nbench: {SECONDS:g}s per phase on {results['machine']}; "
              f"failed requests: {errors}; results in bench/results/\n")
        for name, value in summary.items():
            print(f"{name}={value}")
        return 0 if errors == 0 else 1
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
