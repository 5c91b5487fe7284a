"""Measuring during a load: the CPU of each process group, the peak of a
sampled value (the servers' memory), and the app role's connections."""
from __future__ import annotations

import os
import re
import resource
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import psycopg

from devtools.cluster import APP_ROLE, Cluster
from devtools.server import Server

TICKS = os.sysconf("SC_CLK_TCK")


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


MESSAGE_WRITES = "SELECT n_tup_ins + n_tup_upd + n_tup_del FROM pg_stat_user_tables WHERE relname = 'message'"


def message_writes(superuser_url: str) -> int:
    """Rows of the message table written so far (inserted, updated, deleted), as
    PostgreSQL's statistics have them: a backend reports its counts at latest
    when it ends, so read this after the servers have stopped."""
    with psycopg.connect(superuser_url) as conn:
        return conn.execute(MESSAGE_WRITES).fetchone()[0]
