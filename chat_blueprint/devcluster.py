"""A private PostgreSQL cluster for `make run`, `make test` and `make bench`.

It uses the distribution's server binaries (installing the `postgresql`
package when they are missing and we are root), runs as an unprivileged OS
user (`initdb` refuses root), listens on 127.0.0.1 only, and creates two roles:
the owner, who runs migrations, and the app role, who serves with row-level
security in force. Nothing here is used in production.

    python -m chat_blueprint.devcluster run          # what `make run` does
    python -m chat_blueprint.devcluster token alice  # what `make token USER=alice` does
"""
from __future__ import annotations

import fcntl
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from .auth import mint_token

DATABASE = "chat"
OWNER_ROLE = "chat_owner"
APP_ROLE = "chat_app"
SUPERUSER = "postgres"
MIN_VERSION = 15


class ClusterError(RuntimeError):
    pass


def find_bindir(install: bool = True) -> Path:
    """The newest installed PostgreSQL (>= 15) server bin directory."""
    candidates = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        try:
            version = int(initdb.parent.parent.name.split(".")[0])
        except ValueError:
            continue
        if version >= MIN_VERSION:
            candidates.append((version, initdb.parent))
    if candidates:
        return max(candidates)[1]
    if install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("PostgreSQL server binaries are missing; installing the distribution's postgresql package",
              file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return find_bindir(install=False)
    raise ClusterError(f"PostgreSQL {MIN_VERSION}+ server binaries not found: install your distribution's "
                       "postgresql package (e.g. apt-get install postgresql)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_os_user() -> str | None:
    """Who runs PostgreSQL (and, in tests, its neighbours): ourselves, or `postgres` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"],
                       check=True)
    return "postgres"


@dataclass
class Cluster:
    root: Path
    port: int

    @property
    def datadir(self) -> Path:
        return self.root / "pgdata"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    @property
    def credentials_file(self) -> Path:
        return self.root / "credentials.json"

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.bindir = find_bindir()
        self.os_user = server_os_user()

    def _run(self, *args, check=True, **kwargs):
        command = [str(self.bindir / args[0]), *map(str, args[1:])]
        if self.os_user:
            command = ["runuser", "-u", self.os_user, "--", *command]
        return subprocess.run(command, check=check, **kwargs)

    def _give_to_server_user(self, path: Path) -> None:
        if self.os_user:
            entry = pwd.getpwnam(self.os_user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def credentials(self) -> dict:
        if self.credentials_file.exists():
            return json.loads(self.credentials_file.read_text())
        credentials = {role: secrets.token_urlsafe(18) for role in (SUPERUSER, OWNER_ROLE, APP_ROLE)}
        self.root.mkdir(parents=True, exist_ok=True)
        self.credentials_file.write_text(json.dumps(credentials))
        self.credentials_file.chmod(0o600)
        return credentials

    def initialize(self) -> None:
        """initdb once; later calls reuse the data."""
        if (self.datadir / "PG_VERSION").exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.datadir.mkdir(mode=0o700, exist_ok=True)
        self._give_to_server_user(self.datadir)
        reachable = ["runuser", "-u", self.os_user or "", "--", "test", "-w", str(self.datadir)]
        if self.os_user and subprocess.run(reachable).returncode:
            raise ClusterError(f"the {self.os_user} OS user cannot reach {self.datadir}: make its parent directories "
                               "traversable (chmod o+x) or point DEV_DATA_DIR elsewhere")
        pwfile = self.root / "initdb.pw"
        pwfile.write_text(self.credentials()[SUPERUSER])
        self._give_to_server_user(pwfile)
        try:
            self._run("initdb", "-D", self.datadir, "-U", SUPERUSER, "--pwfile", pwfile, "--auth", "scram-sha-256",
                      "--encoding", "UTF8", "--locale", "C", stdout=subprocess.DEVNULL)
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> None:
        self.initialize()
        self.logfile.touch()
        self._give_to_server_user(self.logfile)
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=300"
        self._run("pg_ctl", "-D", self.datadir, "-l", self.logfile, "-o", options, "-w", "-t", "60", "start",
                  stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", self.datadir, "-m", "fast", "-w", "stop", check=False,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def url(self, role: str, database: str = DATABASE) -> str:
        password = quote(self.credentials()[role], safe="")
        return f"postgresql://{role}:{password}@127.0.0.1:{self.port}/{database}"

    def bootstrap(self) -> None:
        """Create the owner and app roles and the database (idempotent)."""
        credentials = self.credentials()
        with psycopg.connect(self.url(SUPERUSER, "postgres"), autocommit=True) as conn:
            for role, attributes in ((OWNER_ROLE, "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB"),
                                     (APP_ROLE, "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE")):
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
                verb = "ALTER" if exists else "CREATE"
                conn.execute(sql.SQL(verb + " ROLE {} " + attributes + " PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(credentials[role])))
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(DATABASE), sql.Identifier(OWNER_ROLE)))


def migrate(cluster: Cluster, env: dict) -> None:
    """`flask db upgrade` as the owner, exactly as in production."""
    subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"], check=True,
                   env={**env, "DATABASE_URL": cluster.url(OWNER_ROLE), "APP_DB_ROLE": APP_ROLE})


def dev_secret(root: Path) -> str:
    """A stable local BETTER_AUTH_SECRET for `make run`, unless one is set."""
    path = root / "auth_secret"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


DEV_USER = "dev-user"
DEV_TOKEN_TTL_S = 86_400


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name) or str(default)
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ClusterError(f"{name} must be a TCP port number, got {raw!r}")
    return int(raw)


def require_free_port(host: str, port: int, variable: str) -> None:
    """Fail in one line when something already listens there (gunicorn and
    PostgreSQL would otherwise retry, then end in a stack of messages)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            raise ClusterError(f"{variable} {port} is taken by another program: choose a free one, e.g. "
                               f"{variable}={port + 1} make run") from None


def hold_run_lock(root: Path):
    """One `make run` per data directory: a second one says so instead of
    fighting the first over its PostgreSQL. The lock lasts as long as the process."""
    root.mkdir(parents=True, exist_ok=True)
    handle = (root / "run.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise ClusterError(f"another make run is already serving from {root} (pid {holder}): stop it with Ctrl-C, "
                           "or give this one its own DEV_DATA_DIR, PORT and DEV_DB_PORT") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def greeting(base: str, user: str, token: str, secret_hint: str) -> str:
    curl = (f"curl -s -X POST {base}/api/{user}/chat -H 'Authorization: Bearer {token}' "
            "-H 'Content-Type: application/json' -d '{\"message\": \"hello\"}'")
    return "\n".join([
        "",
        f"Serving {base}  (interactive docs: {base}/docs; Ctrl-C stops it and the database)",
        "",
        "Try:",
        "",
        f"  {curl}",
        "",
        f"For the README's curl session, paste (a token for user {user!r}, valid 24 hours):",
        "",
        f"  export API={base}/api/{user}",
        f"  export TOKEN={token}",
        "",
        f"A token for another user: make token USER=alice  ({secret_hint})",
        "",
    ])


def run(root: Path) -> int:
    """Start the cluster, migrate, and serve with gunicorn until Ctrl-C."""
    port = _port("PORT", 8000)
    db_port = _port("DEV_DB_PORT", 54329)
    host = os.environ.get("HOST", "127.0.0.1")
    lock = hold_run_lock(root)
    require_free_port(host, port, "PORT")
    cluster = Cluster(root, db_port)
    cluster.stop()  # a cluster left running by a run that was killed; the lock says no run owns it now
    require_free_port("127.0.0.1", db_port, "DEV_DB_PORT")
    started = False
    try:
        cluster.start()
        started = True
        cluster.bootstrap()
        own_secret = bool(os.environ.get("BETTER_AUTH_SECRET"))
        secret = os.environ["BETTER_AUTH_SECRET"] if own_secret else dev_secret(cluster.root)
        env = {**os.environ, "BETTER_AUTH_SECRET": secret}
        migrate(cluster, env)
        env.update(DATABASE_URL=cluster.url(APP_ROLE))
        from .devserver import ServerError, serve  # it builds on this module

        with serve(env, host=host, port=port, wait=False) as server:

            def forward(signum, frame):
                if server.process.poll() is None:
                    server.process.send_signal(signum)

            signal.signal(signal.SIGINT, forward)
            signal.signal(signal.SIGTERM, forward)
            local = host in ("127.0.0.1", "0.0.0.0", "localhost")
            base = f"http://127.0.0.1:{port}" if local else f"http://{host}:{port}"
            try:
                server.wait_until_serving(timeout_s=120)
            except ServerError:
                pass  # gunicorn said why on our stdout; its exit status is ours
            else:
                hint = ("signed with your BETTER_AUTH_SECRET" if own_secret else
                        f"the dev secret is in {cluster.root / 'auth_secret'}")
                print(greeting(base, DEV_USER, mint_token(secret, DEV_USER, DEV_TOKEN_TTL_S), hint), flush=True)
            return server.process.wait()
    finally:
        cluster.stop()
        if started:
            print(f"\nStopped gunicorn and the database (PostgreSQL on port {db_port}); the data stays in {root} "
                  "for the next make run.", flush=True)
        lock.close()


def token(root: Path, user: str) -> int:
    """`make token USER=alice`: export lines for another user, signed like `make run`'s."""
    secret = os.environ.get("BETTER_AUTH_SECRET")
    if not secret:
        path = root / "auth_secret"
        if not path.exists():
            raise ClusterError(f"no dev secret in {path} yet: run make run once (it creates it), "
                               "or set BETTER_AUTH_SECRET")
        secret = path.read_text().strip()
    if not user.strip() or "/" in user:
        raise ClusterError(f"USER must be a user id without '/', got {user!r}")
    print(f"export API=http://127.0.0.1:{_port('PORT', 8000)}/api/{user}")
    print(f"export TOKEN={mint_token(secret, user, DEV_TOKEN_TTL_S)}")
    return 0


def _what_failed(command) -> str:
    names = [Path(str(part)).name for part in command]
    for name, what in (("initdb", "initdb"), ("pg_ctl", "pg_ctl (PostgreSQL)"), ("flask", "flask db upgrade")):
        if name in names:
            return what
    return names[0]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path(os.environ.get("DEV_DATA_DIR", ".data"))
    try:
        if argv[:1] == ["run"]:
            return run(root)
        if argv[:1] == ["token"]:
            return token(root, argv[1] if len(argv) > 1 else DEV_USER)
        if argv[:1] == ["install"]:
            print(find_bindir())
            return 0
    except ClusterError as exc:
        print(f"make {argv[0]}: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"make {argv[0]}: {_what_failed(exc.cmd)} failed with status {exc.returncode} (its messages are above; "
              f"PostgreSQL's log is {root / 'postgres.log'})", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"make {argv[0]}: the private PostgreSQL did not answer: {str(exc).strip().splitlines()[0]}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
