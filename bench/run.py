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
               (builtin assistant; BENCH_BASELINE_ASSISTANT=openai: against a local server answering at once);
               with it, a runtime `base:gevent` in BENCH_RUNTIMES runs the phases marked * on that revision too
  slow *       ASSISTANT=openai against a local server answering after 1.0 s, 200 clients (wrk)
  inflight *   1,000 blocking turns in flight against a server answering after 5 s
  stream *     1,000 streaming turns in flight against a server streaming 20 chunks 0.25 s apart
  overload *   3,000 blocking turns against one instance (3x what it holds); refused ones retry after Retry-After
  lifecycle    100 streamed replies stopped from the API: stop latency, and how far the stored text lags
  slowclients *  /healthz while 300 clients trickle their request bodies byte by byte
  search       in a database of its own (200 users x 2,000 conversations x 20 messages; smaller with
               BENCH_SEARCH_USERS and BENCH_SEARCH_CONVERSATIONS): search p50/p99 by kind of search, the plans,
               and a chat turn's cost with and without the text-search indexes (pgbench, then the app)
  reads        one user's loops of the largest page of tasks (1,000 tasks) beside other users' chat turns:
               their p50 alone and beside it, A B A B A B; straight to gunicorn, then through nginx with
               docs/operations.md's site block (its per-user rate)

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

Run as `python -m bench.run` from the repository's root. The settings are in
bench/settings.py, the phases in bench/phases.py, what they start (pgbench,
wrk, gunicorn, the upstream, the load generator) in bench/tools.py and what
they measure with in bench/measure.py; this module picks the phases, runs
them and reports.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from bench.measure import Cpu
from bench.phases import PHASES, RUNTIME_PHASES, Bench, baseline_tree
from bench.settings import (
    BASELINE,
    BASELINE_PREFIX,
    IN_FLIGHT,
    IN_FLIGHT_ASSISTANT_S,
    RESULTS,
    ROOT,
    RUNTIME_NAMES,
    RUNTIMES,
    SECONDS,
    STREAM_CHUNKS,
    STREAM_INTERVAL_S,
    log,
    runtime_of,
)
from bench.tools import all_targets, prepare
from devtools.cluster import Cluster
from devtools.ports import free_port


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


# The in-flight phases: the turns/s a server would reach if each turn took
# exactly the upstream's time, and the figures reported after the ratio to it.
IN_FLIGHT_SUMMARY = {
    "inflight": (IN_FLIGHT / IN_FLIGHT_ASSISTANT_S, ("p99_ms", "max_db_connections", "max_rss_mb")),
    "stream": (IN_FLIGHT / (STREAM_CHUNKS * STREAM_INTERVAL_S),
               ("first_delta_p99_ms", "max_rss_mb", "max_db_connections")),
}


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
    for runtime in RUNTIME_NAMES:
        prefix = "" if runtime == RUNTIME_NAMES[0] else f"{runtime}."
        if (found := results.get(key("slow", runtime))) is not None:
            summary[prefix + "slow_turns_per_s"] = round(found["per_s"], 1)
            summary[prefix + "slow_p99_ms"] = round(found["p99_ms"], 1)
            summary[prefix + "slow_max_db_connections"] = found["max_db_connections"]
            summary[prefix + "slow_server_cpu_ms_per_turn"] = server_cpu_ms_per_turn(found)
        for name, (ideal_per_s, figures) in IN_FLIGHT_SUMMARY.items():
            if (found := results.get(key(name, runtime))) is not None:
                summary[f"{prefix}{name}_turns_per_s"] = found["per_s"]
                summary[f"{prefix}{name}_ideal_ratio"] = ratio(found["per_s"], ideal_per_s)
                for figure in figures:
                    summary[f"{prefix}{name}_{figure}"] = found[figure]
                summary[f"{prefix}{name}_server_cpu_ms_per_turn"] = server_cpu_ms_per_turn(found)
        if (found := results.get(key("overload", runtime))) is not None:
            for figure in ("per_s", "p99_ms", "refused", "refused_p99_ms", "unanswered_after_begin",
                           "healthz_p99_ms", "healthz_max_ms", "max_db_connections", "max_rss_mb"):
                summary[f"{prefix}overload_{figure}"] = found[figure]
            summary[f"{prefix}overload_failed"] = failures(found)
        for name in ("inflight", "stream"):
            if (found := results.get(key(name, runtime))) is not None:
                summary[f"{prefix}{name}_message_writes_per_turn"] = found["message_writes_per_turn"]
        if (found := results.get(key("slowclients", runtime))) is not None:
            summary[prefix + "slowclients_healthz_ms"] = found["healthz_max_ms"]
    if (found := results.get("lifecycle")) is not None:
        for figure in ("stops", "not_aborted", "stop_p50_ms", "stop_p99_ms", "lag_p50_ms", "lag_p99_ms", "lag_max_ms"):
            summary[f"lifecycle_{figure}"] = found[figure]
    if "search" in results:
        summary.update(search_summary(results["search"]))
    for path, found in results.get("reads", {}).get("paths", {}).items():
        summary[f"reads_{path}_others_p50_alone_ms"] = round(found["alone"]["p50_ms"], 1)
        summary[f"reads_{path}_others_p50_beside_ms"] = round(found["beside"]["p50_ms"], 1)
        summary[f"reads_{path}_others_p50_ratio"] = found["p50_ratio"]
        summary[f"reads_{path}_reader_requests_per_s"] = round(found["tasks"]["per_s"], 1)
        summary[f"reads_{path}_reader_refused"] = found["tasks"].get("refused", 0)
    return summary


def search_summary(found: dict) -> dict:
    """Search latency by kind, and the text-search indexes' cost on a turn
    (ratios of turns/s with them to without; CPU milliseconds per turn)."""
    summary = {}
    for kind, run in found["latency"].items():
        summary[f"search_{kind.replace(' ', '_')}_p50_ms"] = round(run["p50_ms"], 1)
        summary[f"search_{kind.replace(' ', '_')}_p99_ms"] = round(run["p99_ms"], 1)
    summary["search_loaded_per_s"] = round(found["loaded"]["per_s"], 1)
    summary["search_loaded_p99_ms"] = round(found["loaded"]["p99_ms"], 1)
    turn = found["turn"]
    summary["search_index_database_ratio"] = ratio(turn["database"]["with"]["tps"], turn["database"]["without"]["tps"])
    summary["search_index_app_ratio"] = ratio(turn["app"]["with"]["per_s"], turn["app"]["without"]["per_s"])
    for side in ("with", "without"):
        summary[f"search_turn_postgres_cpu_ms_{side}_index"] = turn["app"][side]["postgres_cpu_ms_per_turn"]
        summary[f"search_turn_server_cpu_ms_{side}_index"] = turn["app"][side]["server_cpu_ms_per_turn"]
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


def raise_open_files_limit() -> None:
    """A thousand connections need more descriptors than a default soft limit
    of 1,024: the servers, the upstream and the load generator inherit this."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    phases = selected_phases()
    if any(name.startswith(BASELINE_PREFIX) for name in RUNTIME_NAMES) and not BASELINE:
        raise SystemExit(f"BENCH_RUNTIMES names a {BASELINE_PREFIX} runtime: it needs BENCH_BASELINE=<git revision>")
    unknown = {runtime_of(name) for name in RUNTIME_NAMES} - set(RUNTIMES)
    if unknown:
        raise SystemExit(f"BENCH_RUNTIMES: unknown runtimes {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(RUNTIMES)})")
    if {"app", "history", "rls", "baseline", "slow", "search", "reads"} & set(phases) and not shutil.which("wrk"):
        raise SystemExit("wrk not found: install the distribution's wrk package (make bench does)")
    if "reads" in phases and not shutil.which("nginx", path=os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin"))):
        raise SystemExit("nginx not found: the reads phase runs the docs' nginx block (make test-deps installs it)")
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
                     "runtimes": {name: RUNTIMES[runtime_of(name)] for name in RUNTIME_NAMES}}
    try:
        baseline = "baseline" in phases or any(name.startswith(BASELINE_PREFIX) for name in RUNTIME_NAMES)
        bench = Bench(cluster, work, all_targets(),
                      prepare(cluster, norls="rls" in phases, baseline_tree=baseline_tree(work) if baseline else None))
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
        if (work / "baseline-tree").exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "baseline-tree")],
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
