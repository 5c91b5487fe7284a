"""Request bodies an attacker shapes, sent over a raw socket to real gunicorn:
chunked bodies over the 1 MiB limit, malformed chunked framing, and bodies
whose validation errors would be larger than the body itself."""
from __future__ import annotations

import json

import pytest
import requests
from support import connect, make_user, raw_exchange

MIB = 1024 * 1024
VALID_TASK = b'{"title": "smuggled"}'


@pytest.fixture
def server(shared_server):
    return shared_server


def head(user, path: str = "tasks", extra: str = "") -> bytes:
    return (f"POST /api/{user.id}/{path} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {user.token}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n{extra}\r\n").encode()


def chunks(body: bytes, size: int = 64 * 1024):
    for start in range(0, len(body), size):
        piece = body[start:start + size]
        yield b"%x\r\n%s\r\n" % (len(piece), piece)
    yield b"0\r\n\r\n"


def padded(total: int) -> bytes:
    """A valid task body of exactly `total` bytes (JSON whitespace after it)."""
    return VALID_TASK + b" " * (total - len(VALID_TASK))


def stored_tasks(app_url, user) -> int:
    with connect(app_url, user.id) as conn:
        return conn.execute("select count(*) from task").fetchone()[0]


def test_a_chunked_body_of_exactly_one_mib_is_read_whole(server, app_url):
    user = make_user()
    response = raw_exchange(server.url, [head(user), *chunks(padded(MIB))])
    assert response.status == 201, response.body[:300]
    assert response.json()["title"] == "smuggled" and stored_tasks(app_url, user) == 1


@pytest.mark.parametrize("size", [MIB + 1, MIB + 40 * 1024])
def test_a_chunked_body_over_one_mib_is_413_and_stores_nothing(server, app_url, size):
    user = make_user()
    response = raw_exchange(server.url, [head(user), *chunks(padded(size))])
    assert response.status == 413
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "request_entity_too_large"
    assert stored_tasks(app_url, user) == 0


def test_a_64_mib_chunked_body_is_413_not_cut_and_stored(server, app_url):
    """The finding: a 64 MiB body was cut at 1 MiB and stored a task (201)."""
    user = make_user()
    body = padded(64 * MIB)

    def lazily():
        yield head(user)
        yield from chunks(body, size=MIB)

    response = raw_exchange(server.url, lazily())
    assert response.status == 413, response.body[:300]
    assert response.json()["error"]["code"] == "request_entity_too_large"
    assert stored_tasks(app_url, user) == 0
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200


FRAMING = {
    "size not hex": b"zz\r\n" + VALID_TASK + b"\r\n0\r\n\r\n",
    "negative size": b"-1\r\n" + VALID_TASK + b"\r\n0\r\n\r\n",
    "missing CRLF after the data": b"%x\r\n%sXX0\r\n\r\n" % (len(VALID_TASK), VALID_TASK),
    "bare LF after the size": b"%x\n%s\r\n0\r\n\r\n" % (len(VALID_TASK), VALID_TASK),
    "bare LF after the data": b"%x\r\n%s\n0\r\n\r\n" % (len(VALID_TASK), VALID_TASK),
    "trailer without a colon": b"%x\r\n%s\r\n0\r\nnot a header\r\n\r\n" % (len(VALID_TASK), VALID_TASK),
    "forbidden trailer": b"%x\r\n%s\r\n0\r\nContent-Length: 5\r\n\r\n" % (len(VALID_TASK), VALID_TASK),
    "bad chunk extension": b"%x;=\r\n%s\r\n0\r\n\r\n" % (len(VALID_TASK), VALID_TASK),
}


@pytest.mark.parametrize("framing", FRAMING.values(), ids=FRAMING.keys())
def test_malformed_chunked_framing_is_400_json_and_stores_nothing(server, app_url, framing):
    user = make_user()
    response = raw_exchange(server.url, [head(user), framing])
    assert response.status == 400, response.body[:300]
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "malformed_body" and "chunked" in error["message"]
    assert response.headers.get("x-request-id")
    assert stored_tasks(app_url, user) == 0


def test_malformed_framing_is_400_before_authentication_too(server):
    """The body is judged before the route: no token, no second answer after the first."""
    user = make_user()
    request = head(user).replace(f"Authorization: Bearer {user.token}\r\n".encode(), b"")
    response = raw_exchange(server.url, [request, FRAMING["size not hex"]])
    assert response.status == 400 and response.json()["error"]["code"] == "malformed_body"


def test_a_well_framed_chunked_body_is_accepted(server, app_url):
    user = make_user()
    response = raw_exchange(server.url, [head(user), *chunks(VALID_TASK, size=5)])
    assert response.status == 201 and stored_tasks(app_url, user) == 1


def test_eighty_thousand_unknown_keys_answer_under_64_kib(server):
    """The finding: a 0.96 MB body of 80,000 unknown keys answered a 2.3 MB 422."""
    user = make_user()
    body = {"title": "ok", **{f"k{n:05d}": 0 for n in range(80_000)}}
    data = json.dumps(body, separators=(",", ":")).encode()
    assert len(data) < MIB
    response = requests.post(f"{server.url}/api/{user.id}/tasks", data=data, timeout=30,
                             headers={**user.headers, "Content-Type": "application/json"})
    assert response.status_code == 422
    assert len(response.content) < 64 * 1024
    error = response.json()["error"]
    assert error["code"] == "validation_failed"
    assert error["fields"] and all(messages == ["Unknown field."] for messages in error["fields"].values())
    assert error["fields_omitted"] == 80_000 - len(error["fields"])
    assert f"{error['fields_omitted']} more" in error["message"]


def test_one_huge_unknown_key_answers_under_64_kib(server):
    user = make_user()
    key = "k" * (MIB - 100)
    response = requests.post(f"{server.url}/api/{user.id}/tasks", json={"title": "ok", key: 1},
                             headers=user.headers, timeout=30)
    assert response.status_code == 422 and len(response.content) < 64 * 1024
    (name,) = response.json()["error"]["fields"]
    assert name.startswith("kkkk") and name.endswith("\u2026") and len(name) < 200


def test_few_invalid_fields_are_all_listed(server):
    user = make_user()
    response = requests.post(f"{server.url}/api/{user.id}/tasks", json={"title": "", "colour": "red"},
                             headers=user.headers, timeout=10)
    error = response.json()["error"]
    assert response.status_code == 422 and set(error["fields"]) == {"title", "colour"}
    assert "fields_omitted" not in error and error["message"] == "the request has invalid fields"
