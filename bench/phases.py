"""The phases. Each takes what it needs as arguments and returns its figures,
with the CPU of each process group under "cpu"; PHASES lists them in the
order they run."""
from __future__ import annotations

import json
import subprocess
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from bench import reads as reads_data
from bench import search as search_data
from bench.lifecycle import LIFECYCLE_CHUNKS, LIFECYCLE_INTERVAL_S, lifecycle
from bench.measure import ConnectionWatcher, Cpu, Peak, message_writes, rss_mb
from bench.settings import (
    BASELINE,
    BASELINE_ASSISTANT,
    BASELINE_DATABASE,
    BASELINE_PREFIX,
    CONCURRENCIES,
    HEALTHZ_PROBES,
    IN_FLIGHT,
    IN_FLIGHT_ASSISTANT_S,
    NORLS_DATABASE,
    OVERLOAD_CLIENTS,
    RLS_CONCURRENCY,
    RLS_ROUNDS,
    ROOT,
    RUNTIMES,
    SAME_RUNTIME,
    SEARCH_CLIENTS,
    SEARCH_DATABASE,
    SEARCH_NOINDEX_DATABASE,
    SEARCH_USERS,
    SECONDS,
    SLOW_ASSISTANT_S,
    SLOW_CLIENTS,
    STREAM_CHUNKS,
    STREAM_INTERVAL_S,
    TRICKLING_CLIENTS,
    log,
    runtime_of,
)
from bench.tools import (
    CHAT_REQUEST,
    gunicorn,
    load,
    median_run,
    openai_env,
    pgbench,
    pgbench_script,
    slow_upstream,
    turns_spec,
    wrk,
)
from devtools.cluster import APP_ROLE, DATABASE, SUPERUSER, Cluster
from devtools.server import Server


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
        return self.cluster.url(SUPERUSER, DATABASE)


def baseline_tree(work: Path) -> Path:
    """The BENCH_BASELINE revision checked out once in the bench's directory (removed with it)."""
    tree = work / "baseline-tree"
    if not tree.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), BASELINE], check=True,
                       capture_output=True)
    return tree


def baseline_args(bench: Bench) -> dict:
    """How a server runs the BENCH_BASELINE revision's app: from its checkout, on
    the database its own migrations made (BASELINE_DATABASE, seeded alike)."""
    tree = baseline_tree(bench.work)
    return {"root": tree, "PYTHONPATH": str(tree), "DATABASE_URL": bench.cluster.url(APP_ROLE, BASELINE_DATABASE)}


def runtime_args(bench: Bench, runtime: str) -> dict:
    """The environment (and the app's root) of a runtime phase's server."""
    if not runtime.startswith(BASELINE_PREFIX):
        return dict(RUNTIMES[runtime])
    return {**baseline_args(bench), **RUNTIMES[runtime_of(runtime)]}


def warmup(bench: Bench, server: Server, name: str, request: str | None = None) -> None:
    """A few seconds of wrk at 16 clients before anything is measured."""
    wrk(server.url, bench.work, name, bench.targets, 16, seconds=min(SECONDS, 5), request=request)


def alternate(bench: Bench, servers: dict[str, Server], cpus: dict[str, Cpu], connections: int,
              suffix: str = "", request: str | None = None) -> dict[str, list[dict]]:
    """Each server warmed up, then wrk at `connections` clients in RLS_ROUNDS
    rounds of one run of each (A B A B A B), so that the machine's drift hits
    all alike; each run measured with its server's Cpu. `request` is wrk's
    (a chat turn by default)."""
    for name, server in servers.items():
        warmup(bench, server, f"warmup-{name}{suffix}", request)
    runs = {name: [] for name in servers}
    for round_ in range(RLS_ROUNDS):
        for name, server in servers.items():
            with cpus[name].measure(servers=[server]):
                runs[name].append(wrk(server.url, bench.work, f"{name}{suffix}-{round_}", bench.targets,
                                      connections, seconds=SECONDS / 2, request=request))
    return runs


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
        warmup(bench, server, "warmup")
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
        warmup(bench, server, "warmup-history")
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
        runs = alternate(bench, {"with": with_rls, "without": without_rls}, {"with": cpu, "without": cpu},
                         connections, suffix="-rls")
    return {"database": database, **{name: median_run(found) for name, found in runs.items()},
            "connections": connections, "cpu": cpu.report()}


def baseline(bench: Bench, revision: str) -> dict:
    """The app at `revision` (a git worktree) against the app as it is, on the
    same database and runtime, measured in turns (A B A B A B) at 16 clients;
    with each server's CPU per turn over its own runs."""
    log(f"baseline: {revision} against the working tree, {BASELINE_ASSISTANT} assistant")
    cpu = {"before": Cpu(bench.cluster), "after": Cpu(bench.cluster)}
    with ExitStack() as stack:
        env = dict(SAME_RUNTIME)
        if BASELINE_ASSISTANT == "openai":
            _, base_url = stack.enter_context(slow_upstream(0.0))
            env.update(openai_env(base_url))
        before = stack.enter_context(gunicorn(bench.app_url, bench.work, "baseline", **baseline_args(bench), **env))
        after = stack.enter_context(gunicorn(bench.app_url, bench.work, "current", **env))
        runs = alternate(bench, {"before": before, "after": after}, cpu, 16)
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
            gunicorn(bench.app_url, bench.work, f"slow-{runtime}", **runtime_args(bench, runtime), **openai_env(base_url)) \
            as server:
        warmup(bench, server, f"warmup-slow-{runtime}")
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
    statistics = bench.cluster.url(SUPERUSER, BASELINE_DATABASE if runtime.startswith(BASELINE_PREFIX) else DATABASE)
    written = message_writes(statistics)
    with slow_upstream(**upstream_args) as (upstream, base_url), \
            gunicorn(bench.app_url, bench.work, f"{name}-{runtime}", **runtime_args(bench, runtime), **openai_env(base_url)) \
            as server:
        load(bench.work, f"warmup-{name}", turns_spec(server, targets, 32, 0, stream))
        with ConnectionWatcher(bench.superuser_url) as watcher, Peak(lambda: rss_mb(server), 0.2) as memory, \
                cpu.measure(servers=[server], upstreams=[upstream]):
            run = load(bench.work, f"{name}-{runtime}",
                       turns_spec(server, targets, IN_FLIGHT, max(SECONDS, 10), stream))
    time.sleep(1.0)  # the servers' backends have ended: their statistics are in
    run.update(max_db_connections=watcher.max_open, max_active_db_connections=watcher.max_active,
               max_rss_mb=round(memory.peak, 1), cpu=cpu.report(),
               message_writes_per_turn=round((message_writes(statistics) - written) / max(1, run["ok"]), 2))
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


def overload(bench: Bench, runtime: str) -> dict:
    """OVERLOAD_CLIENTS blocking turns against one instance, three times what it
    must hold, with an assistant answering after IN_FLIGHT_ASSISTANT_S: each is
    answered, or refused (503 server_busy, Retry-After) and posted again after
    that wait. The server's log says how many turns failed after their user
    message was stored ("chat turn unanswered"): the goal is none."""
    cpu = Cpu(bench.cluster)
    with slow_upstream(delay_s=IN_FLIGHT_ASSISTANT_S) as (upstream, base_url), \
            gunicorn(bench.app_url, bench.work, f"overload-{runtime}", **runtime_args(bench, runtime), **openai_env(base_url)) \
            as server:
        load(bench.work, "warmup-overload", turns_spec(server, bench.targets, 32, 0))
        with ConnectionWatcher(bench.superuser_url) as watcher, Peak(lambda: rss_mb(server), 0.2) as memory, \
                cpu.measure(servers=[server], upstreams=[upstream]):
            spec = {**turns_spec(server, bench.targets, OVERLOAD_CLIENTS, max(SECONDS, 10)), "mode": "overload"}
            run = load(bench.work, f"overload-{runtime}", spec)
        unanswered = server.output().count("chat turn unanswered")
    run.update(unanswered_after_begin=unanswered, max_db_connections=watcher.max_open,
               max_rss_mb=round(memory.peak, 1), cpu=cpu.report())
    log(f"overload [{runtime}]: {run['per_s']:.0f} turns/s (p99 {run['p99_ms']} ms), refused {run['refused']} "
        f"(p99 {run['refused_p99_ms']} ms), failed {run['requests'] - run['ok']} {run['failed_codes']}, "
        f"unanswered after begin {unanswered}, /healthz p99 {run['healthz_p99_ms']} ms (max {run['healthz_max_ms']})")
    return run


def lifecycle_phase(bench: Bench) -> dict:
    """Stops and the stored text's lag (bench/lifecycle.py), on the default runtime."""
    cpu = Cpu(bench.cluster)
    with slow_upstream(delay_s=0.0, chunks=LIFECYCLE_CHUNKS, interval_s=LIFECYCLE_INTERVAL_S) as (upstream, base_url), \
            gunicorn(bench.app_url, bench.work, "lifecycle", **openai_env(base_url)) as server, \
            cpu.measure(servers=[server], upstreams=[upstream]):
        found = lifecycle(server.url)
    return {**found, "cpu": cpu.report()}


def slowclients(bench: Bench, runtime: str) -> dict:
    """TRICKLING_CLIENTS connections send a turn's body byte by byte while
    HEALTHZ_PROBES GETs of /healthz, one after another, time the server."""
    cpu = Cpu(bench.cluster)
    with gunicorn(bench.app_url, bench.work, f"slowclients-{runtime}", **runtime_args(bench, runtime)) as server, \
            cpu.measure(servers=[server]):
        spec = {**turns_spec(server, bench.targets[:TRICKLING_CLIENTS], TRICKLING_CLIENTS, 0), "mode": "trickle",
                "trickle_s": max(SECONDS, 8), "probes": HEALTHZ_PROBES}
        run = load(bench.work, f"slowclients-{runtime}", spec)
    log(f"slowclients [{runtime}]: slowest /healthz {run['healthz_max_ms']} ms (p50 {run['healthz_p50_ms']} ms), "
        f"trickled turns {run['trickle_statuses']}")
    return {**run, "cpu": cpu.report()}


def search(bench: Bench) -> dict:
    """In a database of its own (bench/search.py): search latency, p50 and p99
    by kind of search at one client, then every kind at SEARCH_CLIENTS
    clients; the plans of the dearest search (the commonest word) and of a rare one; and what
    the text-search indexes cost a chat turn of about 600 characters each
    way: its SQL alone (pgbench) and the app, against a copy without them,
    A B A B, with turns/s and CPU per turn of each."""
    search_data.seed(bench.cluster)
    result = {"sizes_mb": search_data.sizes(bench.cluster), "latency": {}}
    result["plans"] = {word: search_data.plan(bench.cluster, "bench-7", word) for word in ("w1", "w4000")}
    for word, plan in result["plans"].items():
        log(f"search: the plans of a search for {word} (w1 is the commonest word)\n{plan}")
    cpu = Cpu(bench.cluster)
    everything = [target for kind in search_data.QUERY_KINDS for target in search_data.search_targets(kind)]
    with gunicorn(bench.cluster.url(APP_ROLE, SEARCH_DATABASE), bench.work, "search") as server:
        wrk(server.url, bench.work, "warmup-search", everything, 4, min(SECONDS, 5), search_data.SEARCH_REQUEST)
        for kind in search_data.QUERY_KINDS:
            result["latency"][kind] = wrk(server.url, bench.work, f"search-{kind}", search_data.search_targets(kind),
                                          1, SECONDS / 2, search_data.SEARCH_REQUEST)
        with cpu.measure(servers=[server]):
            result["loaded"] = wrk(server.url, bench.work, "search-loaded", everything, SEARCH_CLIENTS, SECONDS,
                                   search_data.SEARCH_REQUEST)
    return {**result, "turn": search_turn_cost(bench), "cpu": cpu.report()}


def search_turn_cost(bench: Bench) -> dict:
    """Chat turns with and without the text-search indexes, A B A B: pgbench
    at 16 clients, then the app at 16 clients; CPU per turn of each side."""
    message = search_data.turn_message()
    script = pgbench_script(search_data.TOTAL_CONVERSATIONS, SEARCH_USERS, message)
    databases = {"with": SEARCH_DATABASE, "without": SEARCH_NOINDEX_DATABASE}
    cpu = {name: Cpu(bench.cluster) for name in databases}
    tps = {name: [] for name in databases}
    for _ in range(RLS_ROUNDS):
        for name, database in databases.items():
            with cpu[name].measure():
                tps[name].append(pgbench(bench.cluster, bench.work, 16, database, SECONDS / 2, script))
    found = {"database": {}, "app": {}}
    for name in databases:
        turns = sum(tps[name]) * max(1, round(SECONDS / 2))
        found["database"][name] = {"tps": sorted(tps[name])[len(tps[name]) // 2],
                                   "postgres_cpu_ms_per_turn": round(1000 * cpu[name].report()["postgres"] / turns, 3)}
    cpu = {name: Cpu(bench.cluster) for name in databases}
    request = CHAT_REQUEST.format(message=json.dumps(message))
    with gunicorn(bench.cluster.url(APP_ROLE, SEARCH_DATABASE), bench.work, "search-with") as with_index, \
            gunicorn(bench.cluster.url(APP_ROLE, SEARCH_NOINDEX_DATABASE), bench.work, "search-without") as without:
        runs = alternate(replace(bench, targets=search_data.turn_targets()), {"with": with_index, "without": without},
                         cpu, 16, suffix="-search", request=request)
    for name in databases:
        turns = sum(run["requests"] for run in runs[name])
        report = cpu[name].report()
        found["app"][name] = {**median_run(runs[name]), **{
            f"{group}_cpu_ms_per_turn": round(1000 * report[group] / turns, 3) for group in ("server", "postgres")}}
    log("search: a turn with the indexes / without: database {:.0f} / {:.0f} turns/s, app {:.0f} / {:.0f} turns/s, "
        "postgres CPU {} / {} ms a turn".format(
            found["database"]["with"]["tps"], found["database"]["without"]["tps"], found["app"]["with"]["per_s"],
            found["app"]["without"]["per_s"], found["app"]["with"]["postgres_cpu_ms_per_turn"],
            found["app"]["without"]["postgres_cpu_ms_per_turn"]))
    return found


def best_concurrency(app_result: dict | None) -> int:
    if not app_result:
        return RLS_CONCURRENCY
    return max(app_result["runs"], key=lambda run: run["per_s"])["connections"]


RUNTIME_PHASES = ("slow", "inflight", "stream", "overload", "slowclients")
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
    "overload": lambda bench, done, runtime: overload(bench, runtime),
    "slowclients": lambda bench, done, runtime: slowclients(bench, runtime),
    "lifecycle": lambda bench, done, runtime: lifecycle_phase(bench),
    "search": lambda bench, done, runtime: search(bench),
    "reads": lambda bench, done, runtime: reads_data.phase(bench),
}
