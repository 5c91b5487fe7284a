"""What the reads phase drives: one user (READER) with the largest page of
tasks there is, READER_CLIENTS wrk loops of it, and VICTIM_CLIENTS other
users' chat turns alone and beside those loops, A B A B A B; the ratio of
the turns' p50s is what the reader moved the others' p50 by. `edge` is
nginx as the deployment tests start it, with docs/operations.md's per-user
rate as printed."""
from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psycopg

from bench.measure import Cpu
from bench.settings import RLS_ROUNDS, ROOT, SECONDS, log
from bench.tools import gunicorn, median_run, wrk

READER = "bench-reader"
READER_TASKS = int(os.environ.get("BENCH_READER_TASKS", "1000"))  # 1,000: a whole page at the largest `limit`
READER_CLIENTS = 4
VICTIM_CLIENTS = 2

# The largest page of tasks there is, again and again, by one user.
TASKS_REQUEST = """
request = function()
  local t = targets[1]
  return wrk.format("GET", "/api/" .. t[1] .. "/tasks?limit=1000", {["Authorization"] = "Bearer " .. t[2]})
end
"""


def seed_reader(superuser_url: str) -> None:
    """READER_TASKS tasks of the longest title and description for READER."""
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        conn.execute("DELETE FROM task WHERE user_id = %s", (READER,))
        conn.execute("INSERT INTO task (user_id, title, description) SELECT %s, repeat('t', 200), repeat('d', 1000) "
                     "FROM generate_series(1, %s)", (READER, READER_TASKS))


@contextmanager
def edge(upstream: str):
    """nginx as the deployment tests start it (tests/stack.py), with the per-user rate as printed."""
    sys.path.insert(0, str(ROOT / "tests"))
    from stack import nginx
    with nginx([upstream], per_user_limit=True) as balancer:
        yield balancer


def phase(bench) -> dict:
    """The turns alone and beside the reader's loops, straight to gunicorn, then
    through nginx with docs/operations.md's site block as printed."""
    seed_reader(bench.superuser_url)
    found = {"paths": {}, "cpu": {}}
    with gunicorn(bench.app_url, bench.work, "reads") as server:
        found["paths"]["direct"] = rounds(bench, [server], server.url, "direct", found["cpu"])
        with edge(server.url) as balancer:  # nginx's CPU counts as the server's
            found["paths"]["nginx"] = rounds(bench, [server, balancer.service], balancer.url, "nginx", found["cpu"])
    return found


def rounds(bench, servers: list, url: str, name: str, cpu_reports: dict) -> dict:
    """The turns at `url` alone and beside the reader's loops, RLS_ROUNDS rounds
    of each; the CPU of `servers` (and the rest) goes into `cpu_reports`."""
    cpu = {"alone": Cpu(bench.cluster), "beside": Cpu(bench.cluster)}
    runs = {"alone": [], "beside": []}
    pages = []
    wrk(url, bench.work, f"warmup-reads-{name}", bench.targets, VICTIM_CLIENTS, min(SECONDS, 5))
    for round_ in range(RLS_ROUNDS):
        with cpu["alone"].measure(servers=servers):
            runs["alone"].append(wrk(url, bench.work, f"reads-{name}-alone-{round_}", bench.targets,
                                     VICTIM_CLIENTS, SECONDS / 2))
        with ThreadPoolExecutor(1) as pool, cpu["beside"].measure(servers=servers):
            reader = pool.submit(wrk, url, bench.work, f"reads-{name}-tasks-{round_}", [(READER, "")],
                                 READER_CLIENTS, SECONDS / 2 + 2, TASKS_REQUEST)
            time.sleep(1)  # the loops under way before the turns start, and after they end
            runs["beside"].append(wrk(url, bench.work, f"reads-{name}-beside-{round_}", bench.targets,
                                      VICTIM_CLIENTS, SECONDS / 2))
            pages.append(reader.result())
    if name == "nginx":
        for page in pages:  # nginx's 429s there are the per-user limit at work, not failed requests
            page["refused"], page["non_2xx"] = page["non_2xx"], 0
    found = {kind: median_run(runs[kind]) for kind in runs}
    found["tasks"] = median_run(pages)
    found["p50_ratio"] = round(found["beside"]["p50_ms"] / found["alone"]["p50_ms"], 2)
    cpu_reports.update({f"{name}.{kind}": cpu[kind].report() for kind in cpu})
    log(f"reads [{name}]: others' chat p50 {found['alone']['p50_ms']:.1f} ms alone, {found['beside']['p50_ms']:.1f} ms "
        f"beside {READER_CLIENTS} loops of {READER_TASKS} tasks ({found['tasks']['per_s']:.0f} requests/s, "
        f"{found['tasks'].get('refused', 0)} refused): x{found['p50_ratio']}")
    return found
