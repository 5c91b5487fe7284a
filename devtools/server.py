"""gunicorn with `gunicorn.conf.py`, as `make run`, the tests and the benchmarks start it.

One launcher for all three, so that what they measure and test is the
production runtime started one way: `python -m gunicorn -c gunicorn.conf.py
wsgi:app` from the project's root, on a loopback port (a free one unless
given), with the given environment on top of the current one. `serve()`
waits until the server answers, yields a `Server`, and stops it on exit with
SIGTERM (gunicorn's graceful stop), killing it if that takes too long.
Nothing here is used in production.

    with serve({"DATABASE_URL": url, "BETTER_AUTH_SECRET": secret}) as server:
        print(server.url, server.pids())
"""
from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .ports import free_port

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ("-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app")


class ServerError(RuntimeError):
    """gunicorn exited or did not answer in time; the message carries its output."""


@dataclass
class Server:
    """A running gunicorn: its base URL, master process and log file (None when it logs to our stdout)."""

    url: str
    process: subprocess.Popen
    log: Path | None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def worker_pids(self) -> set[int]:
        return child_pids(self.process.pid)

    def pids(self) -> list[int]:
        """The master first, then its workers."""
        return [self.process.pid, *sorted(self.worker_pids())]

    def answers(self, path: str = "/healthz", timeout_s: float = 5.0) -> bool:
        """Whether a GET of `path` answers 200 now."""
        address = urlsplit(self.url)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout_s)
        try:
            connection.request("GET", path)
            return connection.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            connection.close()

    def wait_until_serving(self, timeout_s: float = 90.0, path: str = "/healthz") -> None:
        """Until `path` answers 200. The master listens before a worker has
        booted, so a probe may wait on a busy machine: that is not a failure."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"gunicorn exited with {self.process.returncode}:\n{self.output()}")
            if self.answers(path):
                return
            time.sleep(0.1)
        raise ServerError(f"gunicorn did not answer {path} within {timeout_s}s:\n{self.output()}")

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def serve(env: Mapping[str, str], *, root: Path = ROOT, host: str = "127.0.0.1", port: int | None = None,
          log: Path | None = None, relay: Callable[[str], None] | None = None, wait: bool = True,
          ready_path: str = "/healthz", start_timeout_s: float = 90.0, stop_timeout_s: float = 20.0) -> Iterator[Server]:
    """gunicorn from `root` with `env` added to the current environment.

    Its output goes to `log` (truncated first); or, line by line, to `relay`,
    with gunicorn in a process group of its own, so that a terminal's Ctrl-C
    reaches only the caller, who decides how gunicorn stops; or else to our
    stdout. With `wait`, returns once `ready_path` answers 200. On exit, every
    line has been relayed.
    """
    port = free_port() if port is None else port
    environment = {**os.environ, **{name: str(value) for name, value in env.items()}, "HOST": host,
                   "PORT": str(port)}
    command, pump = [sys.executable, *COMMAND], None
    if relay is not None:
        process = subprocess.Popen(command, cwd=root, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, process_group=0, encoding="utf-8", errors="replace")
        pump = threading.Thread(target=_pump, args=(process.stdout, relay), name="gunicorn output", daemon=True)
        pump.start()
    elif log is None:
        process = subprocess.Popen(command, cwd=root, env=environment)
    else:
        with log.open("w") as sink:
            process = subprocess.Popen(command, cwd=root, env=environment, stdout=sink, stderr=subprocess.STDOUT)
    probe_host = "127.0.0.1" if host in ("", "0.0.0.0") else host
    server = Server(f"http://{probe_host}:{port}", process, log)
    try:
        if wait:
            server.wait_until_serving(start_timeout_s, ready_path)
        yield server
    finally:
        server.stop(stop_timeout_s)
        if pump is not None:
            pump.join(stop_timeout_s)


def _pump(output, relay: Callable[[str], None]) -> None:
    """Each line gunicorn (its master, its workers) writes, to `relay`, until all of them have exited.
    Reading goes on when relaying fails (our own stdout closed): a pipe left unread would block gunicorn."""
    with output:
        for line in output:
            try:
                relay(line)
            except OSError:
                pass


def child_pids(parent: int) -> set[int]:
    """The processes whose parent is `parent`, from /proc."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent:
                children.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return children
