"""Request headers over 64 KiB together are gunicorn's 431 JSON (CONTRACT
section 4), refused at a cost linear in what was read.

The finding (issue 24, item 10): gunicorn searched its whole header buffer
again for the blank line each time a piece arrived, and buffered up to 100
lines of 32 KiB; one such request cost a worker about a second of CPU, and a
few clients sending them stalled every other user of that worker.
gunicorn.conf.py replaces the header loop of gunicorn's parser; the tests
below drive it through real gunicorn and, piece by piece, through gunicorn's
parser with that replacement loaded."""
from __future__ import annotations

import hashlib
import inspect
import os
import runpy
import threading
import time
from pathlib import Path

import gunicorn.http.message
import gunicorn.util
import pytest
from gunicorn.config import Config
from gunicorn.http.errors import LimitRequestHeaders
from gunicorn.http.parser import RequestParser
from support import ROOT, make_user, raw_exchange
from test_protocol_errors import TOKEN_BYTES, assert_json_error, token_of

FIELD_LIMIT = 32 * 1024
HEADERS_LIMIT = 64 * 1024
REQUEST_LINE = b"GET /healthz HTTP/1.1\r\n"
# gunicorn's Request._parse_python as gunicorn.conf.py replaces it (gunicorn 27.0.1): a change to it upstream
# (a new check in the header loop, say) must be read before the replacement can be trusted to keep up.
REPLACED_SOURCE_SHA256 = "ed07ffec51784055b8d72cf2ce6cc8da842f478a67dd7659dbcbaeb069587454"
GUNICORNS_PARSE = gunicorn.http.message.Request._parse_python


def header_block(size: int, *fixed: bytes) -> bytes:
    """Header lines (`fixed` first, then `X-Pad-<n>` lines of at most 32 KiB),
    each with its CRLF, of exactly `size` bytes in all."""
    block = b"".join(fixed)
    n = 0
    while len(block) < size:
        name = f"X-Pad-{n}: ".encode()
        room = min(FIELD_LIMIT, size - len(block))
        block += name + b"p" * (room - len(name) - 2) + b"\r\n"
        n += 1
    assert len(block) == size, "no room for a last line: choose other fixed lines"
    return block


def flood(lines: int = 99) -> list[bytes]:
    """The item's request: header lines of 32 KiB each (gunicorn's field
    limit here), 99 of them beside Host (its field count limit is 100)."""
    parts = [REQUEST_LINE, b"Host: test\r\n"]
    for n in range(lines):
        name = f"X-Flood-{n}: ".encode()
        parts.append(name + b"f" * (FIELD_LIMIT - len(name) - 2) + b"\r\n")
    return [*parts, b"\r\n"]


def cpu_seconds(pids) -> float:
    """User and system CPU time of the processes `pids`, from /proc."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@pytest.fixture
def server(shared_server):
    return shared_server


def test_a_header_flood_is_a_431_and_costs_the_worker_little(server):
    workers = server.worker_pids()
    before = cpu_seconds(workers)
    response = raw_exchange(server.url, flood())
    spent = cpu_seconds(workers) - before
    print(f"\nworker CPU for one request of 99 header lines of 32 KiB: {spent:.2f} s")
    assert_json_error(response, 431, "request_header_fields_too_large")


def test_another_client_is_answered_while_four_flood(server):
    """Four clients send floods back to back (the issue's measurement); a
    fifth, ordinary one is answered meanwhile. Its wait is printed, not
    asserted: the machine is shared."""
    stop = threading.Event()
    refused = []

    def flood_until_stopped():
        while not stop.is_set():
            refused.append(raw_exchange(server.url, flood()).status)

    flooders = [threading.Thread(target=flood_until_stopped) for _ in range(4)]
    for thread in flooders:
        thread.start()
    try:
        time.sleep(0.5)
        waits = []
        for _ in range(5):
            started = time.monotonic()
            assert raw_exchange(server.url, [REQUEST_LINE + b"Host: test\r\n\r\n"]).status == 200
            waits.append(time.monotonic() - started)
    finally:
        stop.set()
        for thread in flooders:
            thread.join(60)
    print(f"\nanother client's waits while four flood: {', '.join(f'{wait * 1000:.0f} ms' for wait in waits)}")
    assert refused and set(refused) == {431}


def test_headers_of_64_kib_together_pass_and_one_byte_more_is_431(server):
    fixed = (b"Host: test\r\n", b"Connection: close\r\n")
    exact = raw_exchange(server.url, [REQUEST_LINE, header_block(HEADERS_LIMIT, *fixed), b"\r\n"])
    assert exact.status == 200 and exact.headers.get("x-request-id"), exact.body[:300]
    over = raw_exchange(server.url, [REQUEST_LINE, header_block(HEADERS_LIMIT + 1, *fixed), b"\r\n"])
    assert_json_error(over, 431, "request_header_fields_too_large")


def test_a_16_kib_token_among_ordinary_headers_reaches_the_app(server):
    user = make_user()
    ordinary = ["Host: api.example.com", "User-Agent: Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0",
                "Accept: application/json", "Accept-Language: en-GB,en;q=0.5", "Accept-Encoding: gzip, deflate, br",
                "Origin: https://app.example.com", "Referer: https://app.example.com/chat",
                f"Cookie: better-auth.session_token={'c' * 4000}", "Connection: close"]
    head = "\r\n".join([f"GET /api/{user.id}/tasks HTTP/1.1", *ordinary,
                        f"Authorization: Bearer {token_of(user.id, TOKEN_BYTES - 1)}"]) + "\r\n\r\n"
    response = raw_exchange(server.url, [head.encode()])
    assert response.status == 200 and response.json() == []


@pytest.fixture
def conf(monkeypatch, tmp_path):
    """gunicorn.conf.py run in this process, as gunicorn's master runs it; what
    it replaces in gunicorn is put back after the test."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_POOL_SIZE", "1")
    monkeypatch.setattr(gunicorn.util, "write_error", gunicorn.util.write_error)
    monkeypatch.setattr(gunicorn.http.message.Request, "_parse_python", GUNICORNS_PARSE)
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


def test_the_replaced_method_is_the_one_gunicorn_has(conf):
    """The replacement copies the start of gunicorn's method; a gunicorn whose
    method differs (an upgrade) has to be read again before it is replaced."""
    source = inspect.getsource(GUNICORNS_PARSE)
    assert hashlib.sha256(source.encode()).hexdigest() == REPLACED_SOURCE_SHA256, (
        "gunicorn's Request._parse_python changed: compare it with _parse_head in gunicorn.conf.py")
    assert gunicorn.http.message.Request._parse_python is conf["_parse_head"]
    assert conf["http_parser"] == "python"


def parse(request: bytes, piece: int, read: list | None = None):
    """gunicorn's parser (whichever `Request._parse_python` is in place) over
    `request` arriving `piece` bytes at a time: (method, path, headers, body),
    or the class of what it raised. `read` gets the bytes it took."""
    def pieces():
        for start in range(0, len(request), piece):
            if read is not None:
                read.append(len(request[start:start + piece]))
            yield request[start:start + piece]

    cfg = Config()
    cfg.set("http_parser", "python")
    cfg.set("limit_request_field_size", FIELD_LIMIT)
    try:
        message = next(RequestParser(cfg, pieces(), ("127.0.0.1", 1)))
        return message.method, message.path, message.headers, message.body.read()
    except Exception as exc:  # noqa: BLE001 - the class is what is compared
        return type(exc)


HEADS = {
    "headers": b"GET /a?b=c HTTP/1.1\r\nHost: test\r\nX-Two: 2\r\n\r\n",
    "no headers": b"GET / HTTP/1.1\r\n\r\n",
    "a body behind": b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    "an empty line first": b"\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n",
    "a bare LF in a header": b"GET / HTTP/1.1\r\nHost: t\nX: y\r\n\r\n",
    "bare LFs at the end": b"GET / HTTP/1.1\r\nHost: t\n\n",
    "CR CR LF": b"GET / HTTP/1.1\r\nHost: t\r\r\n\r\n",
    "a folded line": b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
    "a bad name": b"GET / HTTP/1.1\r\nX Y: a\r\n\r\n",
    "cut short": b"GET / HTTP/1.1\r\nHost: t\r\n\r",
}


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 8192])
@pytest.mark.parametrize("request_bytes", HEADS.values(), ids=HEADS.keys())
def test_the_replacement_parses_as_gunicorn_does(conf, monkeypatch, request_bytes, piece):
    """Whatever the pieces, the same headers, body and refusals as gunicorn's
    own parser, whose blank-line search these are cut to straddle."""
    ours = parse(request_bytes, piece)
    monkeypatch.setattr(gunicorn.http.message.Request, "_parse_python", GUNICORNS_PARSE)
    assert ours == parse(request_bytes, piece)


@pytest.mark.parametrize("piece", [1, 8192])
def test_the_limit_is_64_kib_of_header_lines_with_their_line_ends(conf, piece):
    head = REQUEST_LINE + header_block(HEADERS_LIMIT, b"Host: test\r\n") + b"\r\n"
    assert parse(head, piece)[0] == "GET"
    assert parse(head.replace(b"Host: test", b"Host: tests"), piece) is LimitRequestHeaders


def test_a_flood_is_refused_after_64_kib_are_read(conf):
    read = []
    assert parse(b"".join(flood()), 8192, read) is LimitRequestHeaders
    assert sum(read) <= HEADERS_LIMIT + len(REQUEST_LINE) + 2 * 8192
