"""The configuration blocks the docs print, read from the Markdown itself, so
that what the tests load (tests/test_deploy_docs.py, tests/test_install.py)
and run (tests/stack.py) is the text an operator pastes, not a copy of it.

A block is marked by an HTML comment (invisible once rendered) on the line
before its fence:

    <!-- config: nginx-site -->
    ```nginx
    upstream chat_app {
    ...
    ```

A test that needs its own addresses, ports or paths replaces the docs' example
values with `fill`, naming each one; a value the block no longer holds is an
error, so the docs and the tests cannot drift apart unnoticed.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("docs/operations.md", "README.md")
FENCE = re.compile(r"^(?P<indent> *)```(?P<language>\w*)[^\n]*\n(?P<body>.*?)^(?P=indent)```$",
                   re.MULTILINE | re.DOTALL)
MARK = re.compile(r"<!-- config: ([\w-]+) -->")


def fenced() -> list[tuple[str, str | None, str, str]]:
    """(document, name or None, language, text) of every fenced block of the
    docs; an indented block (in a list) comes back without its indentation."""
    found = []
    for document in DOCUMENTS:
        text = (ROOT / document).read_text()
        for match in FENCE.finditer(text):
            line_before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
            mark = MARK.fullmatch(line_before)
            body = re.sub(f"^{match['indent']}", "", match["body"], flags=re.MULTILINE)
            found.append((document, mark and mark.group(1), match["language"], body))
    return found


def blocks() -> dict[str, str]:
    """Every marked block of the docs, by name."""
    found = {}
    for _, name, _, text in fenced():
        if name:
            assert name not in found, f"two blocks are marked {name!r}"
            found[name] = text
    return found


def block(name: str) -> str:
    return blocks()[name]


def fill(text: str, values: dict[str, str]) -> str:
    """`text` with each of the docs' example values (an address, a port, a
    path: the keys) replaced by the test's own; each must occur exactly once."""
    for example, own in values.items():
        assert text.count(example) == 1, f"the docs' block no longer holds {example!r} exactly once"
        text = text.replace(example, own)
    return text
