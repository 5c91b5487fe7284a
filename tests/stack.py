"""The parts of a deployment around the app, started for tests from the
distribution's packages: PgBouncer in transaction pooling mode in front of
PostgreSQL, and nginx balancing round robin over gunicorn instances.

    client ─> nginx ─> gunicorn × N ─> PgBouncer (pool_mode = transaction) ─> PostgreSQL

Each process runs unprivileged (as the `postgres` OS user when the tests run
as root, as the PostgreSQL cluster does), listens on a free loopback port,
keeps its configuration and logs in its own temporary directory, and is
stopped, with its directory removed, when its context manager exits, however
it exits. A missing program is an error naming the package, never a skip.
"""
from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import requests
from support import Server, gunicorn, wait_until_serving

from devtools.cluster import APP_ROLE, DATABASE, Cluster, server_os_user
from devtools.ports import free_port

SBIN = ("/usr/sbin", "/sbin")


class MissingProgram(AssertionError):
    """A program the deployment tests need is not installed."""


def find_program(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))
    if found is None:
        raise MissingProgram(f"{name} is not installed: the deployment tests need the distribution's {name} "
                             f"package (`make test-deps` installs it, or apt-get install {name})")
    return found


@dataclass
class Service:
    """A long-running helper process in its own process group, logging to a file."""

    name: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (nginx's master stops its workers before it exits); if that
        takes too long, SIGKILL to the process group it leads."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextmanager
def _workdir(prefix: str):
    """A temporary directory the service user owns; removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    user = server_os_user()
    if user:
        entry = pwd.getpwnam(user)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    try:
        yield directory, user
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _write(path: Path, text: str, user: str | None, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)
    if user:
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)


@contextmanager
def _service(name: str, command: list[str], directory: Path, user: str | None):
    log = directory / f"{name}.out"
    identity = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []} if user else {}
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=directory, stdin=subprocess.DEVNULL, stdout=sink,
                                   stderr=subprocess.STDOUT, process_group=0, **identity)
    service = Service(name, process, log)
    try:
        yield service
    finally:
        service.stop()


def pgbouncer_version() -> tuple[int, ...]:
    banner = subprocess.run([find_program("pgbouncer"), "--version"], capture_output=True, text=True,
                            check=True).stdout
    match = re.search(r"PgBouncer (\d+)\.(\d+)(?:\.(\d+))?", banner)
    if match is None:
        raise AssertionError(f"cannot read the PgBouncer version from {banner!r}")
    return tuple(int(part or 0) for part in match.groups())


@dataclass
class PgBouncer:
    port: int
    version: tuple[int, ...]
    credentials: dict
    service: Service

    def url(self, role: str = APP_ROLE) -> str:
        return f"postgresql://{role}:{quote(self.credentials[role], safe='')}@127.0.0.1:{self.port}/{DATABASE}"

    def admin_url(self, role: str = APP_ROLE) -> str:
        return self.url(role).rsplit("/", 1)[0] + "/pgbouncer"


@contextmanager
def pgbouncer(cluster: Cluster, *, pool_size: int = 20, roles=(APP_ROLE,)):
    """PgBouncer in transaction pooling mode in front of `cluster`'s database.

    Clients authenticate with SCRAM against an auth_file holding the roles'
    passwords, which PgBouncer also uses to log in to PostgreSQL (SCRAM too).
    A refused server login is retried after 1 s, not the default 15 s, so a
    restarted database is used again at once; a client waits at most 5 s
    for a server connection. From 1.21 on, PgBouncer can carry protocol-level
    prepared statements (`max_prepared_statements`); it is pinned off here so
    every version behaves like the 1.18 of Debian 12.

    `admin_url()` reaches PgBouncer's console (SHOW POOLS, SHOW STATS) as the
    app role, listed in `stats_users`.
    """
    program = find_program("pgbouncer")
    version = pgbouncer_version()
    credentials = cluster.credentials()
    port = free_port()
    prepared = "max_prepared_statements = 0\n" if version >= (1, 21) else ""
    with _workdir("chat-test-pgbouncer-") as (directory, user):
        userlist = "".join(f'"{role}" "{credentials[role]}"\n' for role in roles)
        _write(directory / "userlist.txt", userlist, user, mode=0o600)
        _write(directory / "pgbouncer.ini", f"""\
[databases]
{DATABASE} = host=127.0.0.1 port={cluster.port} dbname={DATABASE}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {directory}/userlist.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 500
server_login_retry = 1
server_connect_timeout = 3
query_wait_timeout = 5
ignore_startup_parameters = extra_float_digits
stats_users = {APP_ROLE}
log_connections = 0
log_disconnections = 0
{prepared}""", user)
        with _service("pgbouncer", [program, str(directory / "pgbouncer.ini")], directory, user) as service:
            _wait_until(service, lambda: _listening(port), f"listen on {port}")
            yield PgBouncer(port, version, credentials, service)


@dataclass
class Balancer:
    url: str
    upstreams: list[str]
    service: Service


# What nginx answers itself (a request it cannot parse, a header or request
# line over large_client_header_buffers, a body over client_max_body_size, no
# upstream answering) in the API's JSON error shape instead of its HTML pages.
# A `=code` URI error page works for a request whose line nginx could not
# parse, where a named location (`@name`) gives a 500. docs/operations.md
# shows the block this writes.
NGINX_ERRORS = {  # nginx's status: (status answered, code, message)
    400: (400, "bad_request", "not a valid HTTP request"),
    494: (431, "request_header_fields_too_large", "a header field is over 32 KiB"),
    414: (414, "uri_too_long", "the request line is over 32 KiB"),
    413: (413, "request_entity_too_large", "the body is over 2 MiB"),
    502: (502, "bad_gateway", "no app instance answered"),
    504: (504, "gateway_timeout", "no app instance answered in time"),
}


def nginx_json_errors(indent: str = "        ") -> str:
    lines = []
    for status, (answered, code, message) in NGINX_ERRORS.items():
        body = json.dumps({"error": {"code": code, "message": message}})
        lines += [f"error_page {status} ={answered} /_errors/{answered}.json;",
                  f"location = /_errors/{answered}.json {{",
                  "    internal;",
                  "    default_type application/json;",
                  f"    return {answered} '{body}';",
                  "}"]
    return "".join(f"{indent}{line}\n" for line in lines)


@contextmanager
def nginx(upstreams: list[str]):
    """nginx on a free loopback port, balancing round robin over `upstreams`
    (`http://127.0.0.1:PORT` URLs). Each answer says which upstream served it
    in an `X-Upstream` header."""
    program = find_program("nginx")
    port = free_port()
    servers = "".join(f"        server {url.removeprefix('http://')} max_fails=0;\n" for url in upstreams)
    with _workdir("chat-test-nginx-") as (directory, user):
        _write(directory / "nginx.conf", f"""\
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;

events {{
    worker_connections 512;
}}

http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/client_body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;

    upstream chat_app {{
{servers}        keepalive 16;
    }}

    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 2m;
        large_client_header_buffers 4 32k;
{nginx_json_errors()}
        location / {{
            proxy_pass http://chat_app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_read_timeout 60s;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
""", user)
        command = [program, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-e",
                   str(directory / "error.log"), "-g", "daemon off;"]
        with _service("nginx", command, directory, user) as service:
            balancer = Balancer(f"http://127.0.0.1:{port}", list(upstreams), service)
            health = balancer.url + "/healthz"
            _wait_until(service, lambda: _answering(health), f"answer {health}")
            yield balancer


def _wait_until(service: Service, probe, what: str, timeout_s: float = 15.0) -> None:
    """Until `probe()` holds; fail at once if the service exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise AssertionError(f"{service.name} exited with {service.process.returncode}:\n{service.output()}")
        try:
            if probe():
                return
        except (OSError, requests.RequestException):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{service.name} did not {what} within {timeout_s}s:\n{service.output()}")


def _listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def _answering(url: str) -> bool:
    return requests.get(url, timeout=2).status_code == 200


@dataclass
class Deployment:
    """nginx → gunicorn × N → PgBouncer (transaction mode) → PostgreSQL."""

    url: str
    instances: list[Server]
    pooler: PgBouncer
    balancer: Balancer


@contextmanager
def scaled_out(cluster: Cluster, *, instances: int = 2, workers: int = 1, threads: int = 16, **env):
    """The whole deployment on `cluster`. The app runs with prepared statements
    off: PgBouncer's transaction pooling hands each transaction whichever server
    connection is free, where a statement prepared on another does not exist."""
    with ExitStack() as stack:
        pooler = stack.enter_context(pgbouncer(cluster))
        servers = [stack.enter_context(gunicorn(pooler.url(), workers=workers, threads=threads, wait_ready=False,
                                                DATABASE_PREPARED_STATEMENTS="off", **env))
                   for _ in range(instances)]
        for server in servers:
            wait_until_serving(server)
        balancer = stack.enter_context(nginx([server.url for server in servers]))
        try:
            yield Deployment(balancer.url, servers, pooler, balancer)
        finally:
            balancer.service.stop()
            for server in servers:  # all at once: each then only waits for its own graceful stop
                if server.process.poll() is None:
                    server.process.send_signal(signal.SIGTERM)
