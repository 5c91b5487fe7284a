"""The layout the README's "Layout" section describes, held by reading the
package's imports: the layers import downwards only, the services and the
database layer never import Flask themselves, nothing in the package
imports the dev tooling, and no module outgrows one concern."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "chat_blueprint"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 350
BENCH = PACKAGE.parent / "bench"
MAX_BENCH_LINES = 400

# What each layer may import from the package, besides itself and the top-level modules.
MAY_IMPORT = {
    "api": {"services", "db", "runtime", "assistants"},
    "services": {"db", "runtime", "assistants"},
    "db": set(),
    "runtime": {"db"},
    "assistants": set(),
}
NO_FLASK = ("services", "db/models.py", "db/tenancy.py", "db/pool.py", "db/isolation.py", "assistants",
            "runtime/logs.py", "runtime/metrics.py", "runtime/startup.py")


def layer(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def imported(path: Path) -> set[str]:
    """Every module `path` imports, as dotted names resolved against the package."""
    names = set()
    package = ".".join(("chat_blueprint", *path.relative_to(PACKAGE).parent.parts))
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            names.add(module)
            if node.level:
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_a_layer_imports_only_the_layers_below_it(path):
    own = layer(path)
    allowed = MAY_IMPORT.get(own, set(MAY_IMPORT)) | {own}
    for name in imported(path):
        parts = name.split(".")
        assert parts[0] != "devtools", f"{path.name} imports the dev tooling, which is not installed"
        if parts[0] == "chat_blueprint" and len(parts) > 2 and parts[1] in MAY_IMPORT:
            assert parts[1] in allowed, f"{path.relative_to(PACKAGE)} ({own}) imports {name}"


@pytest.mark.parametrize("prefix", NO_FLASK)
def test_services_and_the_database_layer_do_not_import_flask(prefix):
    for path in MODULES:
        if str(path.relative_to(PACKAGE)).startswith(prefix):
            assert not {name for name in imported(path) if name.split(".")[0] == "flask"}, path


def test_no_module_outgrows_one_concern():
    long = {str(path.relative_to(PACKAGE)): n for path in MODULES if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    top = [path.name for path in PACKAGE.glob("*.py")]
    assert len(top) <= 12, top


def test_no_bench_file_outgrows_one_job():
    sizes = {path.name: len(path.read_text().splitlines()) for path in sorted(BENCH.glob("*.py"))}
    long = {name: n for name, n in sizes.items() if n > MAX_BENCH_LINES}
    assert not long, f"bench files over {MAX_BENCH_LINES} lines: {long}"
