"""The parts of a deployment around the app, started for tests from the
distribution's packages: PgBouncer in transaction pooling mode in front of
PostgreSQL, and nginx balancing round robin over gunicorn instances.

    client ─> nginx ─> gunicorn × N ─> PgBouncer (pool_mode = transaction) ─> PostgreSQL

Each process runs unprivileged (as the `postgres` OS user when the tests run
as root, as the PostgreSQL cluster does), listens on a free loopback port,
keeps its configuration and logs in its own temporary directory, and is
stopped, with its directory removed, when its context manager exits, however
it exits. A missing program is an error naming the package, never a skip.

Their configuration is docs/operations.md's, read from the Markdown as printed
(docs_blocks.py); the only changes are the addresses, ports and paths each
`fill` names.
"""
from __future__ import annotations

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
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import quote

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from docs_blocks import block, fill
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
def workdir(prefix: str):
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


def _write(path: Path, text: str | bytes, user: str | None, mode: int = 0o644) -> None:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
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


def pgbouncer_config(database_port: int, port: int, directory: Path) -> str:
    """docs/operations.md's pgbouncer.ini, with the tests' addresses, ports and paths."""
    config = fill(block("pgbouncer"), {
        "host=10.0.0.20 port=5432": f"host=127.0.0.1 port={database_port}",
        "listen_addr = 0.0.0.0": "listen_addr = 127.0.0.1",
        "listen_port = 6432": f"listen_port = {port}",
        "unix_socket_dir = /var/run/postgresql": f"unix_socket_dir = {directory}",
        "auth_file = /etc/pgbouncer/userlist.txt": f"auth_file = {directory}/userlist.txt",
    })
    # From 1.21 on, PgBouncer can carry protocol-level prepared statements; the
    # one line the tests add pins that off, so every version behaves like the
    # 1.18 of Debian 12 (test_scaleout shows why the app then turns them off).
    return config + ("max_prepared_statements = 0\n" if pgbouncer_version() >= (1, 21) else "")


@contextmanager
def pgbouncer(cluster: Cluster, *, roles=(APP_ROLE,)):
    """PgBouncer in transaction pooling mode in front of `cluster`'s database,
    configured as docs/operations.md prints it: clients authenticate with SCRAM
    against an auth_file holding the roles' passwords, which PgBouncer also uses
    to log in to PostgreSQL; a refused server login is retried after 1 s, so a
    restarted database is used again at once; a client waits at most 5 s for a
    server connection.

    `admin_url()` reaches PgBouncer's console (SHOW POOLS, SHOW STATS) as the
    app role, listed in `stats_users`.
    """
    program = find_program("pgbouncer")
    version = pgbouncer_version()
    credentials = cluster.credentials()
    port = free_port()
    with workdir("chat-test-pgbouncer-") as (directory, user):
        userlist = "".join(f'"{role}" "{credentials[role]}"\n' for role in roles)
        _write(directory / "userlist.txt", userlist, user, mode=0o600)
        _write(directory / "pgbouncer.ini", pgbouncer_config(cluster.port, port, directory), user)
        with _service("pgbouncer", [program, str(directory / "pgbouncer.ini")], directory, user) as service:
            _wait_until(service, lambda: _listening(port), f"listen on {port}")
            yield PgBouncer(port, version, credentials, service)


@dataclass
class Balancer:
    url: str
    upstreams: list[str]
    service: Service


def nginx_config(directory: Path, site: str) -> str:
    """A minimal nginx.conf for the tests, keeping every file in `directory`,
    whose http block holds `site` (what Debian's nginx.conf includes from
    conf.d/). Each answer says which upstream served it in an `X-Upstream`
    header: the docs' site block adds no header of its own, so it inherits
    this one."""
    return f"""\
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
    add_header X-Upstream $upstream_addr always;

{site}}}
"""


# The docs' per-user request rate, and the one the deployment tests run at
# unless they test that limit: their loads post faster than 10 a second for
# one user on purpose.
PER_USER_RATE = "rate=10r/s"
UNLIMITED_RATE = "rate=100000r/s"


def nginx_site(upstreams: list[str], listen: str, per_user_limit: bool = False) -> str:
    """docs/operations.md's site block: the tests' instances for its example
    upstreams, `listen` for its TLS listener (the tests speak plain HTTP to
    nginx; test_deploy_docs loads the block with TLS as printed), and the
    per-user rate as printed only with `per_user_limit`. Every instance stays
    in the rotation (`max_fails=0`), so a test can tell that round robin
    reached each of them."""
    servers = "".join(f"    server {url.removeprefix('http://')} max_fails=0;\n" for url in upstreams)
    return fill(block("nginx-site"), {
        "    server 10.0.0.11:8000;\n    server 10.0.0.12:8000;\n": servers,
        "listen 443 ssl;": listen,
        PER_USER_RATE: PER_USER_RATE if per_user_limit else UNLIMITED_RATE,
    })


def write_nginx_files(directory: Path, user: str | None, site: str) -> Path:
    """nginx.conf around `site`, the docs' JSON error pages beside it, where
    the site's relative `include` finds them, and a throwaway certificate at
    the paths of the docs' TLS lines; returns the path of nginx.conf."""
    certificate, key = directory / "chat.pem", directory / "chat.key"
    certificate_pem, key_pem = self_signed_certificate()
    _write(certificate, certificate_pem, user)
    _write(key, key_pem, user, mode=0o600)
    site = fill(site, {"/etc/ssl/certs/chat.example.com.pem": str(certificate),
                       "/etc/ssl/private/chat.example.com.key": str(key)})
    _write(directory / "chat-json-errors.conf", block("nginx-json-errors"), user)
    _write(directory / "nginx.conf", nginx_config(directory, site), user)
    return directory / "nginx.conf"


def self_signed_certificate() -> tuple[bytes, bytes]:
    """A certificate for localhost, valid one day, and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + timedelta(days=1)).sign(key, hashes.SHA256()))
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def nginx_command(directory: Path, *options: str) -> list[str]:
    return [find_program("nginx"), "-p", str(directory), "-c", str(directory / "nginx.conf"), "-e",
            str(directory / "error.log"), *options]


@contextmanager
def nginx(upstreams: list[str], per_user_limit: bool = False):
    """nginx on a free loopback port, balancing round robin over `upstreams`
    (`http://127.0.0.1:PORT` URLs), configured with docs/operations.md's site
    block and JSON error pages (see nginx_site for `per_user_limit`)."""
    port = free_port()
    with workdir("chat-test-nginx-") as (directory, user):
        write_nginx_files(directory, user, nginx_site(upstreams, f"listen 127.0.0.1:{port};", per_user_limit))
        with _service("nginx", nginx_command(directory, "-g", "daemon off;"), directory, user) as service:
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
