"""A newcomer's first hour, as the README tells it: what `make run` prints (it
runs `python -m devtools run`), the README's curl session
pasted as it stands, `make token`, a second run or a taken port, and Ctrl-C."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import requests
from support import ROOT

from devtools import run as devtools_run
from devtools.ports import free_port

START_TIMEOUT_S = 240


@dataclass
class DevRun:
    root: Path
    port: int
    db_port: int
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def exported(self) -> dict:
        return dict(re.findall(r"^  export (API|TOKEN)=(\S+)$", self.output(), re.MULTILINE))


def devtools(*args, root, port, db_port=None, **popen):
    env = {name: value for name, value in os.environ.items()
           if name not in ("BETTER_AUTH_SECRET", "DATABASE_URL", "BETTER_AUTH_JWKS_URL")}
    env.update(DEV_DATA_DIR=str(root), PORT=str(port), DEV_DB_PORT=str(db_port or free_port()), WEB_CONCURRENCY="1",
               GUNICORN_THREADS="8")
    return [sys.executable, "-m", "devtools", *args], {"cwd": ROOT, "env": env, **popen}


def new_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="dev-run-"))
    root.chmod(0o755)  # the postgres OS user must reach its data directory
    return root


@pytest.fixture(scope="module")
def dev_run():
    root, port, db_port = new_root(), free_port(), free_port()
    log = root.parent / f"{root.name}.log"
    command, options = devtools("run", root=root, port=port, db_port=db_port)
    with log.open("w") as sink:
        # A process group of its own, as a terminal gives `make run`: Ctrl-C signals the group.
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, process_group=0, **options)
    run = DevRun(root, port, db_port, process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "export TOKEN=" not in run.output():
            assert process.poll() is None, f"make run exited with {process.returncode}:\n{run.output()}"
            assert time.monotonic() < deadline, f"make run printed no token:\n{run.output()}"
            time.sleep(0.2)
        yield run
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(root, ignore_errors=True)
        log.unlink(missing_ok=True)


def one_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[0]


def test_make_run_prints_export_lines_a_curl_line_and_where_the_secret_is(dev_run):
    exported = dev_run.exported()
    assert exported["API"] == f"http://127.0.0.1:{dev_run.port}/api/dev-user"
    secret = (dev_run.root / "auth_secret").read_text().strip()
    claims = jwt.decode(exported["TOKEN"], secret, algorithms=["HS256"])
    assert claims["sub"] == "dev-user"
    output = dev_run.output()
    curl = [line.strip() for line in output.splitlines() if line.strip().startswith("curl ")]
    assert len(curl) == 1 and f"Bearer {exported['TOKEN']}" in curl[0]
    assert "/api/dev-user/chat" in curl[0]
    assert "make token USER=alice" in output and str(dev_run.root / "auth_secret") in output
    assert f"http://127.0.0.1:{dev_run.port}/docs" in output


def readme_curl_session() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## A curl session"):]
    return section[section.index("```sh\n") + len("```sh\n"):section.index("\n```", section.index("```sh"))]


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_the_readme_curl_session_runs_as_pasted(dev_run, shell):
    """Pasted after the two export lines, with ids captured as it goes."""
    exported = dev_run.exported()
    assert shutil.which("curl"), "curl is missing: apt-get install curl (make test installs it)"
    result = subprocess.run([shell, "-e", "-c", readme_curl_session()], capture_output=True, text=True, timeout=120,
                            env={"PATH": os.environ["PATH"], **exported})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert '"error"' not in out, out
    assert out.count('"response":"turn 1') == 1 and out.count('"response":"turn 2') == 2, out
    # The two toggles, then the PUT, in that order.
    assert re.findall(r'"completed":(true|false)', out)[-3:] == ["true", "false", "false"], out
    assert '"title":"Week"' in out and '"description":"2 litres"' in out
    assert out.rstrip().endswith("204")
    conversation = re.search(r'"conversation_id":"([0-9a-f-]{36})"', out).group(1)
    messages = requests.get(f"{exported['API']}/conversations/{conversation}/messages",
                            headers={"Authorization": f"Bearer {exported['TOKEN']}"}, timeout=10).json()["data"]
    assert [message["role"] for message in messages] == ["user", "assistant", "user", "assistant"]


def test_make_token_for_another_user(dev_run):
    command, options = devtools("token", "alice", root=dev_run.root, port=dev_run.port)
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, **options)
    assert result.returncode == 0, result.stderr
    exported = dict(re.findall(r"^export (API|TOKEN)=(\S+)$", result.stdout, re.MULTILINE))
    assert exported["API"] == f"http://127.0.0.1:{dev_run.port}/api/alice"
    headers = {"Authorization": f"Bearer {exported['TOKEN']}"}
    assert requests.get(f"{exported['API']}/tasks", headers=headers, timeout=10).status_code == 200
    assert requests.get(f"http://127.0.0.1:{dev_run.port}/api/dev-user/tasks", headers=headers,
                        timeout=10).status_code == 403


def test_make_token_before_any_make_run_says_so_in_one_line():
    root = new_root()
    try:
        command, options = devtools("token", "alice", root=root, port=free_port())
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, **options)
        assert result.returncode == 1
        assert "run make run once" in one_line(result)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_second_run_on_the_same_data_is_refused_in_one_line(dev_run):
    command, options = devtools("run", root=dev_run.root, port=free_port())
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, **options)
    assert result.returncode == 1
    line = one_line(result)
    assert "another make run is already serving" in line and str(dev_run.process.pid) in line
    assert requests.get(f"http://127.0.0.1:{dev_run.port}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("taken", ["PORT", "DEV_DB_PORT"])
def test_a_taken_port_is_refused_in_one_line(dev_run, taken):
    root = new_root()
    try:
        ports = {"port": dev_run.port} if taken == "PORT" else {"port": free_port(), "db_port": dev_run.db_port}
        command, options = devtools("run", root=root, **ports)
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, **options)
        assert result.returncode == 1
        number = dev_run.port if taken == "PORT" else dev_run.db_port
        assert one_line(result).startswith(f"make run: {taken} {number} is taken")
        assert not (root / "pgdata" / "PG_VERSION").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("setting, variable", [
    ({"ASSISTANT": "openai"}, "ASSISTANT_BASE_URL"),
    ({"WRITE_RATE_LIMIT": "many"}, "WRITE_RATE_LIMIT"),
    ({"PORT": "abc"}, "PORT"),
    ({"GUNICORN_THREADS": "lots"}, "GUNICORN_THREADS"),
    ({"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
])
def test_a_bad_setting_is_refused_in_one_line_before_anything_starts(setting, variable):
    """The finding: a setting the app refuses surfaced from `flask db upgrade`, after the cluster had
    started, as a traceback and a line pointing at PostgreSQL's log; one gunicorn reads was a traceback."""
    root = new_root()
    try:
        command, options = devtools("run", root=root, port=free_port())
        options["env"].update(setting)
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, **options)
        assert result.returncode == 1
        assert one_line(result).startswith(f"make run: {variable} ")
        assert not (root / "pgdata").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_failed_migration_points_at_its_own_messages_not_at_postgresqls_log(monkeypatch, capsys):
    """The finding: make run's line after a failed `flask db upgrade` sent the reader to PostgreSQL's
    log, which says nothing about it; the command's own messages are right above."""
    def failing_migration(root):
        raise subprocess.CalledProcessError(1, [sys.executable, "-m", "flask", "--app", "wsgi", "db", "upgrade"])

    monkeypatch.setattr(devtools_run, "run", failing_migration)
    assert devtools_run.main(["run"]) == 1
    assert capsys.readouterr().err == "make run: flask db upgrade failed with status 1 (its messages are above)\n"


def test_make_test_refuses_a_bad_setting_in_one_line_before_any_cluster_starts():
    """The servers and the migration of the suite inherit its environment: a bad setting there
    was a traceback in every test that needed the database."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                             "tests/test_policies.py"], cwd=ROOT, env={**os.environ, "WRITE_RATE_LIMIT": "many"},
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "Error" not in output, output
    [line] = [line for line in output.splitlines() if "WRITE_RATE_LIMIT" in line]
    assert "make test: WRITE_RATE_LIMIT must look like" in line


def test_the_benchmarks_migration_refuses_a_bad_setting_in_one_line():
    """`make bench` migrates through the same function, and does not catch the refusal: it ends
    the benchmark with that line alone, no traceback."""
    root = new_root()
    try:
        script = ("import sys\nfrom devtools.cluster import Cluster, migrate\n"
                  "migrate(Cluster(sys.argv[1], 1), {'ASSISTANT': 'openai'}, quiet=True)\n")
        result = subprocess.run([sys.executable, "-c", script, str(root)], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 1
        assert one_line(result) == "ASSISTANT_BASE_URL is not set (required when ASSISTANT=openai)"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_ctrl_c_stops_gunicorn_and_the_database_and_says_so_in_one_line(dev_run):
    """Last in this module: it ends the run. A terminal's Ctrl-C signals the whole process group.
    The finding: it printed gevent `SystemExit` tracebacks and gunicorn's shutdown chatter, which
    read like a crash; a clean stop is the one line saying what stopped."""
    before = len(dev_run.output())
    os.killpg(dev_run.process.pid, signal.SIGINT)
    assert dev_run.process.wait(timeout=90) == 0
    after = dev_run.output()[before:]
    assert "Traceback" not in after, after
    lines = [line for line in after.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Stopped gunicorn and the database"), after
    assert not accepts(dev_run.port) and not accepts(dev_run.db_port)
