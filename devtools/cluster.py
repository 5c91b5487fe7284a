"""A private PostgreSQL cluster for `make run`, `make test` and `make bench`.

It uses the distribution's server binaries (installing the `postgresql`
package when they are missing and we are root), runs as an unprivileged OS
user (`initdb` refuses root), listens on 127.0.0.1 only, and creates two roles:
the owner, who runs migrations, and the app role, who serves with row-level
security in force. Nothing here is used in production.
"""
from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from .settings import check_app_settings

ROOT = Path(__file__).resolve().parent.parent
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


def migrate(cluster: Cluster, env: dict, *, database: str = DATABASE, quiet: bool = False, root: Path = ROOT) -> None:
    """`flask db upgrade` of `database` as the owner, exactly as in production;
    `quiet` discards its output (the benchmark's); `root` is the checkout whose
    app migrates (the benchmark's baseline is another). A setting the app
    refuses is a SettingError, in one line, before the command runs."""
    env = {**env, "DATABASE_URL": cluster.url(OWNER_ROLE, database), "APP_DB_ROLE": APP_ROLE}
    check_app_settings(env)
    output = subprocess.DEVNULL if quiet else None
    subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"], check=True, cwd=root, env=env,
                   stdout=output, stderr=output)
