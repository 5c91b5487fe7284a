"""`make bench`: chat turns against the database ceiling, history growth, slow
and streaming assistants with a thousand turns in flight, slow clients, and
the cost of row-level security.

Sets up its own PostgreSQL cluster, seeds many users and conversations, then
runs the phases below, each with its own gunicorn (from gunicorn.conf.py,
started by the launcher the tests use), and prints one `name=value` per line
at the end, then the CPU seconds each process group spent in each phase.
BENCH_SECONDS (default 20) is the length of every measured phase;
BENCH_SECONDS=3 gives a quick run. BENCH_PHASES picks phases (default: all).

  ceiling      pgbench runs the SQL of one chat turn as the app role, RLS forced
  app          wrk posts chat turns over HTTP (builtin assistant) at several concurrencies
  history      turn latency in conversations of 10 and of 10,000 messages
  rls          pgbench, then the app at a given concurrency, against a copy whose policies admit every row
  baseline     with BENCH_BASELINE=<git revision>: the app at that revision against the working tree
               (builtin assistant; BENCH_BASELINE_ASSISTANT=openai: against a local server answering at once)
  slow *       ASSISTANT=openai against a local server answering after 1.0 s, 200 clients (wrk)
  inflight *   1,000 blocking turns in flight against a server answering after 5 s
  stream *     1,000 streaming turns in flight against a server streaming 20 chunks 0.25 s apart
  slowclients *  /healthz while 300 clients trickle their request bodies byte by byte

The phases marked * depend on the runtime: they run once per runtime of
BENCH_RUNTIMES (default gevent,gthread; see RUNTIMES), one after another, so
both see the same machine. The first runtime's figures carry the plain names,
the others' are prefixed (`gevent.inflight_turns_per_s`).

The CPU of each process group (the gunicorn servers, PostgreSQL, the load
generator, the upstream, this harness) is read from /proc/<pid>/stat (and
getrusage for the load generators, which exit) around each measured load,
never around start-up or warm-up, so CPU per turn can be compared between
phases and runtimes; on a shared machine it moves far less than turns/s.
Results go to bench/results/latest.json, the servers' logs to bench/results/logs/.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent


from chat_blueprint.auth import mint_token  # noqa: E402
from chat_blueprint.devcluster import APP_ROLE, OWNER_ROLE, SUPERUSER, Cluster, free_port  # noqa: E402
from chat_blueprint.devserver import Server, serve  # noqa: E402

SECONDS = float(os.environ.get("BENCH_SECONDS", "20"))
CONCURRENCIES = [int(c) for c in os.environ.get("BENCH_CONCURRENCIES", "1,16,64").split(",")]
USERS = 200
CONVERSATIONS = 2000
SEED_MESSAGES = 10
HISTORY_CONVERSATIONS = 64
LONG_HISTORY = 10_000
SLOW_CLIENTS = 200
SLOW_ASSISTANT_S = 1.0
IN_FLIGHT = 1000
IN_FLIGHT_ASSISTANT_S = 5.0
STREAM_CHUNKS = 20
STREAM_INTERVAL_S = 0.25
TRICKLING_CLIENTS = 300
HEALTHZ_PROBES = 20
RLS_ROUNDS = 3
RLS_CONCURRENCY = 64  # when the app phase did not run to find the best
BASELINE = os.environ.get("BENCH_BASELINE")
BASELINE_ASSISTANT = os.environ.get("BENCH_BASELINE_ASSISTANT", "builtin")
RUNTIMES = {
    "conf": {},  # gunicorn.conf.py as it is
    "gevent": {"GUNICORN_WORKER_CLASS": "gevent"},
    # 4 workers x 256 threads: enough threads for 1,000 turns in flight.
    "gthread": {"GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "256"},
    "gthread64": {"GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "64"},  # the runtime before gevent
}
RUNTIME_NAMES = os.environ.get("BENCH_RUNTIMES", "gevent,gthread").split(",")
# The baseline pins its runtime on gunicorn's command line, which any revision's
# gunicorn.conf.py obeys: gthread, the runtime of revisions before gevent (whose
# master imported psycopg before a gevent worker could patch it).
SAME_RUNTIME = {"WEB_CONCURRENCY": "4", "DATABASE_POOL_SIZE": "2",
                "GUNICORN_CMD_ARGS": "--worker-class gthread --threads 64"}
SECRET = "bench-secret-" + uuid.uuid4().hex * 2
RESULTS = ROOT / "bench" / "results"
NORLS_DATABASE = "chat_norls"
ISOLATED_TABLES = ("conversation", "message", "task", "idempotency_key")
TICKS = os.sysconf("SC_CLK_TCK")


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
        "model": "'builtin'",
        "finish_reason": "'stop'",
        "usage": "NULL::jsonb",
    }

    def statement(sql: str) -> str:
        for name, value in values.items():
            sql = sql.replace(f"%({name})s", value)
        if unknown := re.findall(r"%\((\w+)\)s", sql):
            raise RuntimeError(f"pgbench_script: no value for the turn's parameters {unknown}")
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


@dataclass
class Bench:
    """What every phase is given: the seeded cluster, a scratch directory, the
    conversations to post to, and the conversations of the history phase."""

    cluster: Cluster
    work: Path
    targets: list[tuple[str, str]]
    histories: dict

    @property
    def app_url(self) -> str:
        return self.cluster.url(APP_ROLE)

    @property
    def superuser_url(self) -> str:
        return self.cluster.url(SUPERUSER, "chat")


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


def load_targets(targets: list[tuple[str, str]]) -> list[list[str]]:
    tokens = {user: mint_token(SECRET, user, ttl_s=86_400) for user in {user for user, _ in targets}}
    return [[user, tokens[user], conversation_id] for user, conversation_id in targets]


def turns_spec(server: Server, targets, clients: int, seconds: float, stream: bool = False) -> dict:
    port = int(server.url.rsplit(":", 1)[1])
    return {"mode": "turns", "host": "127.0.0.1", "port": port, "targets": load_targets(targets),
            "clients": clients, "seconds": seconds, "stream": stream}


def process_stats(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def tree_cpu_s(root: int) -> float:
    """CPU seconds of `root` and its live descendants, with what they reaped
    (utime + stime + cutime + cstime of each), so a process that exits is still counted."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = process_stats(int(stat.parent.name))
        if fields:
            parents.setdefault(int(fields[1]), []).append((int(stat.parent.name), fields))
    ticks, pending = 0, [root]
    fields = process_stats(root)
    if fields is None:
        return 0.0
    ticks += sum(int(f) for f in fields[11:15])
    while pending:
        for child, child_fields in parents.get(pending.pop(), []):
            ticks += sum(int(f) for f in child_fields[11:15])
            pending.append(child)
    return ticks / TICKS


def postmaster_pid(cluster: Cluster) -> int:
    return int((cluster.datadir / "postmaster.pid").read_text().split()[0])


class Cpu:
    """The CPU seconds of each process group over the loads measured with it.

    The load generators (wrk, pgbench, bench/load.py) are children that exit
    within the window: getrusage of our children counts them. Servers and the
    upstream are read from /proc before and after.
    """

    GROUPS = ("server", "postgres", "load", "upstream", "harness")

    def __init__(self, cluster: Cluster):
        self.postmaster = postmaster_pid(cluster)
        self.seconds = Counter({group: 0.0 for group in self.GROUPS})
        self.wall_s = 0.0

    def _read(self, servers, upstreams) -> dict:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "server": sum(tree_cpu_s(server.process.pid) for server in servers),
            "postgres": tree_cpu_s(self.postmaster),
            "load": children.ru_utime + children.ru_stime,
            "upstream": sum(tree_cpu_s(process.pid) for process in upstreams),
            "harness": own.ru_utime + own.ru_stime,
        }

    @contextmanager
    def measure(self, servers=(), upstreams=()):
        before, started = self._read(servers, upstreams), time.monotonic()
        yield
        after = self._read(servers, upstreams)
        self.wall_s += time.monotonic() - started
        for group in self.GROUPS:
            self.seconds[group] += after[group] - before[group]

    def report(self) -> dict:
        return {**{group: round(self.seconds[group], 2) for group in self.GROUPS}, "wall": round(self.wall_s, 2)}


class Peak(threading.Thread):
    """The highest value of `sample()` seen, sampled every `interval_s` until the block ends."""

    def __init__(self, sample, interval_s: float = 0.1):
        super().__init__(daemon=True)
        self.sample = sample
        self.interval_s = interval_s
        self.peak = 0
        self._finished = threading.Event()

    def run(self):
        while not self._finished.wait(self.interval_s):
            self.peak = max(self.peak, self.sample())

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self._finished.set()
        self.join()


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


def rss_mb(server: Server) -> float:
    """Resident memory of the master and every worker together."""
    kilobytes = 0
    for pid in server.pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        kilobytes += int(match.group(1)) if match else 0
    return kilobytes / 1024


def all_targets():
    return [(user_of(n), conversation_uuid(f"conv-{n}")) for n in range(1, CONVERSATIONS + 1)]


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda run: run["per_s"])[len(runs) // 2]


# The phases. Each takes what it needs as arguments and returns its figures,
# with the CPU of each process group under "cpu".

def ceiling(bench: Bench) -> dict:
    """pgbench runs the app's turn SQL as the app role: what the database alone can do."""
    cpu = Cpu(bench.cluster)
    found = {}
    for clients in (16, 64):
        with cpu.measure():
            found[clients] = pgbench(bench.cluster, bench.work, clients)
        log(f"ceiling: c={clients} {found[clients]:.0f} turns/s")
    return {"tps": found, "cpu": cpu.report()}


def app(bench: Bench, concurrencies: list[int]) -> dict:
    """wrk posts turns with the builtin assistant at each concurrency."""
    cpu = Cpu(bench.cluster)
    with gunicorn(bench.app_url, bench.work, "app") as server:
        wrk(server.url, bench.work, "warmup", bench.targets, 16, seconds=min(SECONDS, 5))
        runs = []
        for clients in concurrencies:
            with cpu.measure(servers=[server]):
                runs.append(wrk(server.url, bench.work, f"app-c{clients}", bench.targets, clients))
    return {"runs": runs, "cpu": cpu.report()}


def history(bench: Bench) -> dict:
    """One client, so no turn waits on another's row lock: the latency is the
    turn's own. The same number of conversations of each kind, so each
    conversation row is as hot in both; the short ones get a few dozen turns
    in the run, far fewer than the long ones' 10,000 messages."""
    cpu = Cpu(bench.cluster)
    with gunicorn(bench.app_url, bench.work, "history") as server:
        wrk(server.url, bench.work, "warmup-history", bench.targets, 16, seconds=min(SECONDS, 5))
        runs = {}
        for kind in ("short", "long"):
            with cpu.measure(servers=[server]):
                runs[kind] = wrk(server.url, bench.work, f"history-{kind}", bench.histories[kind], 1,
                                 seconds=SECONDS / 2)
    return {**runs, "cpu": cpu.report()}


def rls(bench: Bench, connections: int) -> dict:
    """The cost of the policies: the same turn SQL with pgbench, then the app at
    `connections` clients, against an identical copy whose policies admit every
    row. Measured in turns, A B A B A B, so that the machine's drift hits both
    alike; the ratios are of the medians."""
    cpu = Cpu(bench.cluster)
    database = {"with": [], "without": []}
    for _ in range(RLS_ROUNDS):
        with cpu.measure():
            database["with"].append(pgbench(bench.cluster, bench.work, 16, seconds=SECONDS / 2))
            database["without"].append(pgbench(bench.cluster, bench.work, 16, NORLS_DATABASE, seconds=SECONDS / 2))
    database = {name: sorted(found)[len(found) // 2] for name, found in database.items()}
    log(f"rls: database alone {database['with']:.0f} with, {database['without']:.0f} without (turns/s, medians)")
    with gunicorn(bench.app_url, bench.work, "rls-with") as with_rls, \
            gunicorn(bench.cluster.url(APP_ROLE, NORLS_DATABASE), bench.work, "rls-without") as without_rls:
        servers = {"with": with_rls, "without": without_rls}
        for name, server in servers.items():
            wrk(server.url, bench.work, f"warmup-{name}-rls", bench.targets, 16, seconds=min(SECONDS, 5))
        runs = {"with": [], "without": []}
        for round_ in range(RLS_ROUNDS):
            for name, server in servers.items():
                with cpu.measure(servers=[server]):
                    runs[name].append(wrk(server.url, bench.work, f"{name}-rls-{round_}", bench.targets,
                                          connections, seconds=SECONDS / 2))
    return {"database": database, **{name: median_run(found) for name, found in runs.items()},
            "connections": connections, "cpu": cpu.report()}


def baseline(bench: Bench, revision: str) -> dict:
    """The app at `revision` (a git worktree) against the app as it is, on the
    same database and runtime, measured in turns (A B A B A B) at 16 clients;
    with each server's CPU per turn over its own runs."""
    log(f"baseline: {revision} against the working tree, {BASELINE_ASSISTANT} assistant")
    tree = bench.work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision], check=True,
                   capture_output=True)
    cpu = {"before": Cpu(bench.cluster), "after": Cpu(bench.cluster)}
    try:
        with ExitStack() as stack:
            env = dict(SAME_RUNTIME)
            if BASELINE_ASSISTANT == "openai":
                _, base_url = stack.enter_context(slow_upstream(0.0))
                env.update(openai_env(base_url))
            before = stack.enter_context(gunicorn(bench.app_url, bench.work, "baseline", root=tree,
                                                  PYTHONPATH=str(tree), **env))
            after = stack.enter_context(gunicorn(bench.app_url, bench.work, "current", **env))
            servers = {"before": before, "after": after}
            runs = {"before": [], "after": []}
            for name, server in servers.items():
                wrk(server.url, bench.work, f"warmup-{name}", bench.targets, 16, seconds=min(SECONDS, 5))
            for round_ in range(RLS_ROUNDS):
                for name, server in servers.items():
                    with cpu[name].measure(servers=[server]):
                        runs[name].append(wrk(server.url, bench.work, f"{name}-{round_}", bench.targets, 16,
                                              seconds=SECONDS / 2))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    result = {"revision": revision, "cpu": {}}
    for name in ("before", "after"):
        turns = sum(run["requests"] for run in runs[name])
        report = cpu[name].report()
        result[name] = {**median_run(runs[name]), "cpu_ms_per_turn": round(1000 * report["server"] / turns, 3)}
        result["cpu"][name] = report
        log(f"baseline {name}: server CPU {result[name]['cpu_ms_per_turn']:.2f} ms per turn")
    return result


def slow(bench: Bench, runtime: str) -> dict:
    """wrk keeps SLOW_CLIENTS turns in flight against an assistant answering after SLOW_ASSISTANT_S."""
    cpu = Cpu(bench.cluster)
    with slow_upstream(SLOW_ASSISTANT_S) as (upstream, base_url), \
            gunicorn(bench.app_url, bench.work, f"slow-{runtime}", **RUNTIMES[runtime], **openai_env(base_url)) \
            as server:
        wrk(server.url, bench.work, f"warmup-slow-{runtime}", bench.targets, 16, seconds=min(SECONDS, 5))
        with ConnectionWatcher(bench.superuser_url) as watcher, cpu.measure(servers=[server], upstreams=[upstream]):
            run = wrk(server.url, bench.work, f"slow-{runtime}", bench.targets, SLOW_CLIENTS,
                      seconds=max(SECONDS, 5))
    log(f"slow [{runtime}]: most app-role connections open {watcher.max_open}, busy {watcher.max_active}")
    return {**run, "max_db_connections": watcher.max_open, "max_active_db_connections": watcher.max_active,
            "cpu": cpu.report()}


def in_flight(bench: Bench, runtime: str, name: str, stream: bool, upstream_args: dict) -> dict:
    """IN_FLIGHT turns in flight at once (each client posting one after
    another, a connection per turn), each on a conversation of its own so
    none waits on another's row lock; with the most app-role connections and
    the most memory of all gunicorn processes seen meanwhile."""
    cpu = Cpu(bench.cluster)
    targets = bench.targets[:IN_FLIGHT]
    with slow_upstream(**upstream_args) as (upstream, base_url), \
            gunicorn(bench.app_url, bench.work, f"{name}-{runtime}", **RUNTIMES[runtime], **openai_env(base_url)) \
            as server:
        load(bench.work, f"warmup-{name}", turns_spec(server, targets, 32, 0, stream))
        with ConnectionWatcher(bench.superuser_url) as watcher, Peak(lambda: rss_mb(server), 0.2) as memory, \
                cpu.measure(servers=[server], upstreams=[upstream]):
            run = load(bench.work, f"{name}-{runtime}",
                       turns_spec(server, targets, IN_FLIGHT, max(SECONDS, 10), stream))
    run.update(max_db_connections=watcher.max_open, max_active_db_connections=watcher.max_active,
               max_rss_mb=round(memory.peak, 1), cpu=cpu.report())
    log(f"{name} [{runtime}]: {run['per_s']:.0f} turns/s, p50 {run['p50_ms']} ms, p99 {run['p99_ms']} ms"
        + (f", first delta p99 {run['first_delta_p99_ms']} ms" if stream else "")
        + f", {run['max_db_connections']} connections, {run['max_rss_mb']:.0f} MB"
        + ("" if run["ok"] == run["requests"] else f"; failed {run['requests'] - run['ok']}: {run['errors']}"))
    return run


def inflight(bench: Bench, runtime: str) -> dict:
    """Blocking turns against an assistant answering after IN_FLIGHT_ASSISTANT_S."""
    return in_flight(bench, runtime, "inflight", False, {"delay_s": IN_FLIGHT_ASSISTANT_S})


def stream(bench: Bench, runtime: str) -> dict:
    """Streaming turns (`"stream": true`) against an assistant streaming
    STREAM_CHUNKS deltas STREAM_INTERVAL_S apart."""
    return in_flight(bench, runtime, "stream", True, {"chunks": STREAM_CHUNKS, "interval_s": STREAM_INTERVAL_S})


def slowclients(bench: Bench, runtime: str) -> dict:
    """TRICKLING_CLIENTS connections send a turn's body byte by byte while
    HEALTHZ_PROBES GETs of /healthz, one after another, time the server."""
    cpu = Cpu(bench.cluster)
    with gunicorn(bench.app_url, bench.work, f"slowclients-{runtime}", **RUNTIMES[runtime]) as server, \
            cpu.measure(servers=[server]):
        spec = {**turns_spec(server, bench.targets[:TRICKLING_CLIENTS], TRICKLING_CLIENTS, 0), "mode": "trickle",
                "trickle_s": max(SECONDS, 8), "probes": HEALTHZ_PROBES}
        run = load(bench.work, f"slowclients-{runtime}", spec)
    log(f"slowclients [{runtime}]: slowest /healthz {run['healthz_max_ms']} ms (p50 {run['healthz_p50_ms']} ms), "
        f"trickled turns {run['trickle_statuses']}")
    return {**run, "cpu": cpu.report()}


RUNTIME_PHASES = ("slow", "inflight", "stream", "slowclients")
# Every phase in the order they run, with what each is given.
PHASES = {
    "ceiling": lambda bench, done, runtime: ceiling(bench),
    "app": lambda bench, done, runtime: app(bench, CONCURRENCIES),
    "history": lambda bench, done, runtime: history(bench),
    "rls": lambda bench, done, runtime: rls(bench, best_concurrency(done.get("app"))),
    "baseline": lambda bench, done, runtime: baseline(bench, BASELINE),
    "slow": lambda bench, done, runtime: slow(bench, runtime),
    "inflight": lambda bench, done, runtime: inflight(bench, runtime),
    "stream": lambda bench, done, runtime: stream(bench, runtime),
    "slowclients": lambda bench, done, runtime: slowclients(bench, runtime),
}


def best_concurrency(app_result: dict | None) -> int:
    if not app_result:
        return RLS_CONCURRENCY
    return max(app_result["runs"], key=lambda run: run["per_s"])["connections"]


def selected_phases() -> list[str]:
    chosen = os.environ.get("BENCH_PHASES", ",".join(name for name in PHASES if name != "baseline")).split(",")
    unknown = set(chosen) - set(PHASES)
    if unknown:
        raise SystemExit(f"BENCH_PHASES: unknown phases {', '.join(sorted(unknown))} (known: {', '.join(PHASES)})")
    if BASELINE:
        chosen.append("baseline")
    elif "baseline" in chosen:
        raise SystemExit("the baseline phase needs BENCH_BASELINE=<git revision>")
    return [name for name in PHASES if name in chosen]


def key(name: str, runtime: str) -> str:
    """Results of a runtime phase under the first runtime keep the phase's name; the others are prefixed."""
    return name if name not in RUNTIME_PHASES or runtime == RUNTIME_NAMES[0] else f"{runtime}.{name}"


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3)


def server_cpu_ms_per_turn(run: dict) -> float:
    """The servers' CPU over the run per turn answered: unlike turns/s, hardly
    moved by what else runs on the machine."""
    answered = run["requests"] - failures(run)
    return round(1000 * run["cpu"]["server"] / answered, 2) if answered else float("nan")


def summarize(results: dict) -> dict:
    """The figures the issues ask for, from the phases that ran."""
    summary = {}
    if "ceiling" in results:
        summary["ceiling_tps"] = round(max(results["ceiling"]["tps"].values()), 1)
    if "app" in results:
        best = max(results["app"]["runs"], key=lambda run: run["per_s"])
        summary["app_turns_per_s"] = round(best["per_s"], 1)
        if "ceiling_tps" in summary:
            summary["ceiling_ratio"] = ratio(best["per_s"], summary["ceiling_tps"])
    if "history" in results:
        found = results["history"]
        summary["history_p50_ratio"] = ratio(found["long"]["p50_ms"], found["short"]["p50_ms"])
    if "baseline" in results:
        found = results["baseline"]
        summary["baseline_speedup"] = ratio(found["after"]["per_s"], found["before"]["per_s"])
        summary["baseline_cpu_ms_per_turn_before"] = found["before"]["cpu_ms_per_turn"]
        summary["baseline_cpu_ms_per_turn_after"] = found["after"]["cpu_ms_per_turn"]
    if "rls" in results:
        summary["rls_overhead_ratio"] = ratio(results["rls"]["with"]["per_s"], results["rls"]["without"]["per_s"])
    ideal_per_s = IN_FLIGHT / IN_FLIGHT_ASSISTANT_S
    ideal_stream_per_s = IN_FLIGHT / (STREAM_CHUNKS * STREAM_INTERVAL_S)
    for runtime in RUNTIME_NAMES:
        prefix = "" if runtime == RUNTIME_NAMES[0] else f"{runtime}."
        if (found := results.get(key("slow", runtime))) is not None:
            summary[prefix + "slow_turns_per_s"] = round(found["per_s"], 1)
            summary[prefix + "slow_p99_ms"] = round(found["p99_ms"], 1)
            summary[prefix + "slow_max_db_connections"] = found["max_db_connections"]
            summary[prefix + "slow_server_cpu_ms_per_turn"] = server_cpu_ms_per_turn(found)
        if (found := results.get(key("inflight", runtime))) is not None:
            summary[prefix + "inflight_turns_per_s"] = found["per_s"]
            summary[prefix + "inflight_ideal_ratio"] = ratio(found["per_s"], ideal_per_s)
            summary[prefix + "inflight_p99_ms"] = found["p99_ms"]
            summary[prefix + "inflight_max_db_connections"] = found["max_db_connections"]
            summary[prefix + "inflight_max_rss_mb"] = found["max_rss_mb"]
            summary[prefix + "inflight_server_cpu_ms_per_turn"] = server_cpu_ms_per_turn(found)
        if (found := results.get(key("stream", runtime))) is not None:
            summary[prefix + "stream_turns_per_s"] = found["per_s"]
            summary[prefix + "stream_ideal_ratio"] = ratio(found["per_s"], ideal_stream_per_s)
            summary[prefix + "stream_first_delta_p99_ms"] = found["first_delta_p99_ms"]
            summary[prefix + "stream_max_rss_mb"] = found["max_rss_mb"]
            summary[prefix + "stream_max_db_connections"] = found["max_db_connections"]
            summary[prefix + "stream_server_cpu_ms_per_turn"] = server_cpu_ms_per_turn(found)
        if (found := results.get(key("slowclients", runtime))) is not None:
            summary[prefix + "slowclients_healthz_ms"] = found["healthz_max_ms"]
    return summary


def runs_of(results) -> list[dict]:
    """Every load run in the results (each once), to count failed requests."""
    found, seen, pending = [], set(), [results]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if "requests" in item and "non_2xx" in item and id(item) not in seen:
                seen.add(id(item))
                found.append(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return found


def failures(run: dict) -> int:
    return run["non_2xx"] + run["socket_errors"] + run.get("stream_errors", 0)


def cpu_table(results: dict) -> str:
    rows = [f"{'phase':<22}" + "".join(f"{group:>10}" for group in (*Cpu.GROUPS, "wall")) + f"{'cores':>8}"]
    for name, found in results.items():
        if not isinstance(found, dict) or "cpu" not in found:
            continue
        reports = found["cpu"].items() if "wall" not in found["cpu"] else [("", found["cpu"])]
        for part, report in reports:
            busy = sum(report[group] for group in Cpu.GROUPS) / report["wall"] if report["wall"] else 0
            rows.append(f"{name + ('.' + part if part else ''):<22}"
                        + "".join(f"{report[group]:>10.2f}" for group in (*Cpu.GROUPS, "wall")) + f"{busy:>8.2f}")
    return "\n".join(rows)


def prepare(cluster: Cluster, work: Path, phases: list[str]) -> Bench:
    """Roles, the database (and its no-RLS copy for the rls phase), migrations, seed data."""
    cluster.bootstrap()
    databases = ["chat", *([NORLS_DATABASE] if "rls" in phases else [])]
    if "rls" in phases:
        with psycopg.connect(cluster.url(SUPERUSER, "postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {NORLS_DATABASE} OWNER {OWNER_ROLE}")
    for database in databases:
        migrate(cluster.url(OWNER_ROLE, database))
        with psycopg.connect(cluster.url(OWNER_ROLE, database), autocommit=True) as conn:
            # Bench only: pgbench reads currval() of the message ids (see pgbench_script).
            conn.execute(f"GRANT SELECT ON SEQUENCE message_id_seq TO {APP_ROLE}")
    if "rls" in phases:
        disable_policies(cluster.url(OWNER_ROLE, NORLS_DATABASE))
    log("seeding")
    histories = {}
    for database in databases:  # the same data in both: only the policies differ
        histories = seed(cluster.url(SUPERUSER, database))
    return Bench(cluster, work, all_targets(), histories)


def raise_open_files_limit() -> None:
    """A thousand connections need more descriptors than a default soft limit
    of 1,024: the servers, the upstream and the load generator inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    phases = selected_phases()
    unknown = set(RUNTIME_NAMES) - set(RUNTIMES)
    if unknown:
        raise SystemExit(f"BENCH_RUNTIMES: unknown runtimes {', '.join(sorted(unknown))} (known: {', '.join(RUNTIMES)})")
    if {"app", "history", "rls", "baseline", "slow"} & set(phases) and not shutil.which("wrk"):
        raise SystemExit("wrk not found: install the distribution's wrk package (make bench does)")
    raise_open_files_limit()
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="chat-bench-"))
    work.chmod(0o755)
    cluster = Cluster(work / "cluster", free_port())
    log(f"cluster in {work}; every phase runs {SECONDS:g}s; phases {', '.join(phases)}; "
        f"runtimes {', '.join(RUNTIME_NAMES)}")
    cluster.start()
    results: dict = {"seconds": SECONDS, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                     "runtimes": {name: RUNTIMES[name] for name in RUNTIME_NAMES}}
    try:
        bench = prepare(cluster, work, phases)
        for name in phases:
            for runtime in RUNTIME_NAMES if name in RUNTIME_PHASES else RUNTIME_NAMES[:1]:
                log(f"phase {name}" + (f" [{runtime}]" if name in RUNTIME_PHASES else ""))
                results[key(name, runtime)] = PHASES[name](bench, results, runtime)

        summary = summarize(results)
        results["summary"] = summary
        if "app" in results and "ceiling" in results:
            plot(results["app"]["runs"], max(results["ceiling"]["tps"].values()), RESULTS / "latency.png")
        (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
        errors = sum(failures(run) for run in runs_of(results))
        print(f"\nbench: {SECONDS:g}s per phase on {results['machine']}; runtimes {', '.join(RUNTIME_NAMES)}; "
              f"failed requests: {errors}; results and server logs in bench/results/\n")
        for name, value in summary.items():
            print(f"{name}={value}")
        print(f"\nCPU seconds of each process group during each phase's measured load:\n{cpu_table(results)}")
        return 0 if errors == 0 else 1
    finally:
        cluster.stop()
        logs = RESULTS / "logs"
        shutil.rmtree(logs, ignore_errors=True)
        logs.mkdir(parents=True)
        for path in work.glob("gunicorn-*.log"):
            shutil.copy(path, logs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
