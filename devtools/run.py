"""`make run` and `make token`: the private cluster, migrated, served by
gunicorn until Ctrl-C; and tokens signed like the ones `make run` prints."""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

import psycopg

from chat_blueprint.auth import mint_token

from .cluster import APP_ROLE, DATABASE, Cluster, ClusterError, find_bindir, migrate
from .ports import PortError, port_setting, require_free_port
from .server import ServerError, serve
from .settings import SettingError, check_serving_settings


def dev_secret(root: Path) -> str:
    """A stable local BETTER_AUTH_SECRET for `make run`, unless one is set."""
    path = root / "auth_secret"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


DEV_USER = "dev-user"
DEV_TOKEN_TTL_S = 86_400


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


class QuietStop:
    """gunicorn's output as `make run` shows it: every line while it serves; once a stop was asked for,
    not gunicorn's own routine INFO lines (the signal, each worker exiting, the master shutting down), so
    that a Ctrl-C ends in the one line `run` prints. Its warnings and errors, and whatever is not one of
    its JSON log lines (a traceback), still show."""

    def __init__(self):
        self.stopping = False

    def __call__(self, line: str) -> None:
        if self.stopping and _gunicorn_info(line):
            return
        sys.stdout.write(line)
        sys.stdout.flush()


def _gunicorn_info(line: str) -> bool:
    try:
        entry = json.loads(line)
    except ValueError:
        return False
    return isinstance(entry, dict) and entry.get("logger") == "gunicorn.error" and entry.get("level") == "INFO"


def run(root: Path) -> int:
    """Start the cluster, migrate, and serve with gunicorn until Ctrl-C."""
    port = port_setting("PORT", 8000)
    db_port = port_setting("DEV_DB_PORT", 54329)
    host = os.environ.get("HOST", "127.0.0.1")
    # The settings gunicorn will serve with, before anything starts; the database and the secret
    # are make run's own (a stand-in for the dev secret, which is made later when none is set).
    check_serving_settings({**os.environ, "DATABASE_URL": f"postgresql://{APP_ROLE}@127.0.0.1:{db_port}/{DATABASE}",
                            "BETTER_AUTH_SECRET": os.environ.get("BETTER_AUTH_SECRET") or "dev secret"})
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
        output = QuietStop()
        with serve(env, host=host, port=port, relay=output, wait=False) as server:

            def forward(signum, frame):
                output.stopping = True
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
    print(f"export API=http://127.0.0.1:{port_setting('PORT', 8000)}/api/{user}")
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
    except (ClusterError, PortError, SettingError) as exc:
        print(f"make {argv[0]}: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        what = _what_failed(exc.cmd)
        where = "" if what == "flask db upgrade" else f"; PostgreSQL's log is {root / 'postgres.log'}"
        print(f"make {argv[0]}: {what} failed with status {exc.returncode} (its messages are above{where})",
              file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"make {argv[0]}: the private PostgreSQL did not answer: {str(exc).strip().splitlines()[0]}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print("usage: python -m devtools run | token [USER] | install", file=sys.stderr)
    return 2
