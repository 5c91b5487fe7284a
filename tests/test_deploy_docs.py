"""Every configuration file the docs print loads as printed.

The blocks are read from the Markdown (docs_blocks.py); nginx checks its
files with `nginx -t`, PgBouncer starts with its file and serves a query
(tests/stack.py runs the deployment tests on the same text), the systemd
unit and the Kubernetes job are held to the installed wheel in
test_install.py. The findings: the nginx block had `large_client_header_buffers`
twice (`nginx -t`: "directive is duplicate"), and the PgBouncer block put
comments after values, which PgBouncer reads as part of the value
(`invalid value "1 ; default 15 ..."`), so neither loaded.
"""
from __future__ import annotations

import re
import subprocess

import psycopg
from docs_blocks import ROOT, block, blocks, fenced, fill
from stack import nginx_command, pgbouncer, workdir, write_nginx_files

from devtools.ports import free_port

CONFIGURATION_LANGUAGES = {"nginx", "ini", "yaml", "conf", "systemd", "dockerfile", "toml"}
LOADED = {  # each marked block, and the test that loads it
    "nginx-site": "test_deploy_docs.py::test_nginx_loads_the_site_and_its_error_pages",
    "nginx-json-errors": "test_deploy_docs.py::test_nginx_loads_the_site_and_its_error_pages",
    "pgbouncer": "test_deploy_docs.py::test_pgbouncer_starts_with_its_block_and_pools_transactions",
    "systemd-unit": "test_install.py::test_the_systemd_unit_verifies_and_starts_the_installed_wheel",
    "k8s-cronjob": "test_install.py::test_the_kubernetes_prune_job_runs_in_the_image_layout",
}


def test_every_configuration_block_is_marked_and_loaded():
    """A configuration file shown in the docs without a test that loads it is the bug of issue 24."""
    unmarked = [(document, language) for document, name, language, _ in fenced()
                if language in CONFIGURATION_LANGUAGES and name is None]
    assert unmarked == [], "mark these blocks (<!-- config: NAME -->) and load them in a test"
    assert set(blocks()) == set(LOADED)


def test_nginx_loads_the_site_and_its_error_pages():
    """`nginx -t` of the site block inside an http block, as Debian's nginx.conf
    includes conf.d/, with TLS as printed: only its port (443 needs root) and
    the certificate's paths are the test's; the example upstreams stay."""
    site = fill(block("nginx-site"), {"listen 443 ssl;": f"listen 127.0.0.1:{free_port()} ssl;"})
    with workdir("chat-test-nginx-t-") as (directory, user):
        write_nginx_files(directory, user, site)
        checked = subprocess.run(nginx_command(directory, "-t"), capture_output=True, text=True,
                                 **({"user": user} if user else {}))
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr
    assert "warn" not in checked.stderr, checked.stderr


def test_pgbouncer_starts_with_its_block_and_pools_transactions(cluster):
    with pgbouncer(cluster) as pooler:
        with psycopg.connect(pooler.url()) as conn:
            assert conn.execute("select current_user").fetchone() == ("chat_app",)
        with psycopg.connect(pooler.admin_url(), autocommit=True, cursor_factory=psycopg.ClientCursor) as admin:
            settings = {row[0]: row[1] for row in admin.execute("SHOW CONFIG").fetchall()}
        log = pooler.service.output()
    assert (settings["pool_mode"], settings["server_login_retry"], settings["query_wait_timeout"]) == (
        "transaction", "1", "5")
    assert " ERROR " not in log and " WARNING " not in log, log


def test_the_configuration_table_names_every_setting_gunicorn_conf_reads():
    """The finding: `HOST` (and GUNICORN_TIMEOUT, GUNICORN_GRACEFUL_TIMEOUT)
    were read by gunicorn.conf.py and missing from README's table."""
    runtime = (ROOT / "gunicorn.conf.py").read_text()
    read = set(re.findall(r"os\.environ(?:\.get|\.setdefault)?[(\[]\s*[\"'](\w+)[\"']", runtime))
    read |= set(re.findall(r"[\"'](\w+)[\"'] not in os\.environ", runtime))
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration\n"):readme.index("## A curl session\n")]
    documented = {name for row in table.splitlines() if row.startswith("| `")
                  for name in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert {"HOST", "PORT", "WEB_CONCURRENCY"} <= read
    assert read - documented == set()


def test_the_deployment_diagram_names_the_default_worker_class():
    runtime = (ROOT / "gunicorn.conf.py").read_text()
    default = re.search(r"environ\.get\(\"GUNICORN_WORKER_CLASS\", \"(\w+)\"\)", runtime).group(1)
    operations = (ROOT / "docs/operations.md").read_text()
    diagram = operations[operations.index("## The deployment\n"):operations.index("### An instance")]
    assert re.findall(r"gunicorn × N instances \((\w+):", diagram) == [default]


def test_the_state_diagram_has_no_statement_break_inside_a_label():
    """Mermaid ends a statement at `;`, so a transition label holding one drew
    each word after it as a state of its own (found by rendering
    docs/architecture.md's diagram with mermaid-cli and Chromium)."""
    diagram = (ROOT / "docs" / "architecture.md").read_text().split("```mermaid\n", 1)[1].split("```", 1)[0]
    transitions = [line for line in diagram.splitlines() if "-->" in line]
    assert len(transitions) >= 8
    assert [line for line in transitions if ";" in line] == []
