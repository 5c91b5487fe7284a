"""What the HTTP servers answer before the app sees a request, over raw
sockets: gunicorn's own refusals are JSON, not HTML; a 16 KiB bearer token
reaches the app, directly and through nginx; a longer Authorization header is
the app's 401 JSON; nginx's own refusals are JSON with the configuration of
docs/operations.md."""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
from stack import nginx
from support import SECRET, make_user, raw_exchange

from chat_blueprint import auth

TOKEN_BYTES = 16 * 1024


@pytest.fixture
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def nginx_in_front(_shared_gunicorn):
    with nginx([_shared_gunicorn.url]) as balancer:
        yield balancer


@pytest.fixture
def balancer(nginx_in_front, shared_server):
    """nginx in front of the shared gunicorn, once that answers /readyz."""
    return nginx_in_front


def get(path: str, *headers: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: test", "Connection: close", *headers]) + "\r\n\r\n").encode()


def token_of(user_id: str, length: int) -> str:
    """A valid HS256 token for `user_id` of `length` characters, or one fewer
    (base64url text is never 4k + 1 long); a Better Auth token carries the
    user's row in its claims, here a long `image`."""
    expires = int(time.time()) + 600

    def token(padding: int) -> str:
        return jwt.encode({"sub": user_id, "exp": expires, "user": {"image": "x" * padding}}, SECRET,
                          algorithm="HS256")

    padding = max(0, (length - len(token(0))) * 3 // 4 - 8)
    while len(token(padding + 1)) <= length:
        padding += 1
    assert length - 1 <= len(token(padding)) <= length
    return token(padding)


def assert_json_error(response, status: int, code: str) -> None:
    assert response.status == status, response.body[:300]
    assert response.headers["content-type"] == "application/json", response.headers
    assert response.json()["error"]["code"] == code


GUNICORN_REFUSALS = {
    "bad request line": (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    "bad method": (get("/healthz").replace(b"GET", b"G\x01T", 1), 400, "bad_request"),
    "bad http version": (get("/healthz").replace(b"HTTP/1.1", b"HTTP/9.9", 1), 400, "bad_request"),
    "request line over 4094 bytes": (get("/healthz?" + "q" * 5000), 414, "uri_too_long"),
    "header line over the field limit": (get("/healthz", "X-Big: " + "b" * 40_000), 431,
                                         "request_header_fields_too_large"),
    "too many header fields": (get("/healthz", *(f"X-{n}: n" for n in range(120))), 431,
                               "request_header_fields_too_large"),
    "unsupported transfer coding": (get("/healthz", "Transfer-Encoding: br, chunked"), 501, "not_implemented"),
}


@pytest.mark.parametrize("request_bytes, status, code", GUNICORN_REFUSALS.values(), ids=GUNICORN_REFUSALS.keys())
def test_gunicorn_refusals_are_json(server, request_bytes, status, code):
    """The finding: these were gunicorn's HTML pages."""
    response = raw_exchange(server.url, [request_bytes])
    assert_json_error(response, status, code)
    assert response.json()["error"]["message"]


def test_a_16_kib_token_reaches_the_app(server):
    """The largest token the app reads (16 KiB once auth.MAX_TOKEN_BYTES
    allows it) passes gunicorn's header limit and is answered by the app."""
    user = make_user()
    length = min(TOKEN_BYTES, auth.MAX_TOKEN_BYTES)
    bearer = f"Authorization: Bearer {token_of(user.id, length)}"
    response = raw_exchange(server.url, [get(f"/api/{user.id}/tasks", bearer)])
    assert response.status == 200 and response.json() == []
    longest = raw_exchange(server.url, [get(f"/api/{user.id}/tasks",
                                            f"Authorization: Bearer {token_of(user.id, TOKEN_BYTES)}")])
    assert longest.headers.get("x-request-id"), "gunicorn answered instead of the app"
    assert longest.status in (200, 401) and longest.headers["content-type"] == "application/json"


@pytest.mark.parametrize("size", [TOKEN_BYTES + 1, 20 * 1024])
def test_a_longer_authorization_header_is_the_apps_401_json(server, size):
    user = make_user()
    response = raw_exchange(server.url, [get(f"/api/{user.id}/tasks", "Authorization: Bearer " + "a" * size)])
    assert_json_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_16_kib_token_passes_nginx(balancer):
    user = make_user()
    length = min(TOKEN_BYTES, auth.MAX_TOKEN_BYTES)
    bearer = f"Authorization: Bearer {token_of(user.id, length)}"
    response = raw_exchange(balancer.url, [get(f"/api/{user.id}/tasks", bearer)])
    assert response.status == 200 and response.headers.get("x-upstream")
    longer = raw_exchange(balancer.url, [get(f"/api/{user.id}/tasks", "Authorization: Bearer " + "a" * 20_000)])
    assert_json_error(longer, 401, "unauthorized")


def test_headers_over_64_kib_together_are_gunicorns_431_json_through_nginx(balancer):
    """nginx passes header lines of up to 4 x 32 KiB (its buffers); gunicorn
    refuses them past 64 KiB together, and nginx relays that answer."""
    response = raw_exchange(balancer.url, [get("/healthz", *(f"X-Pad-{n}: {'p' * 30_000}" for n in range(3)))])
    assert_json_error(response, 431, "request_header_fields_too_large")
    assert response.headers.get("x-upstream"), "nginx answered instead of gunicorn"


NGINX_REFUSALS = {
    "bad request line": (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    "no Host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "header line over 32 KiB": (get("/healthz", "X-Big: " + "b" * 40_000), 431, "request_header_fields_too_large"),
    "request line over 32 KiB": (get("/healthz?" + "q" * 40_000), 414, "uri_too_long"),
    "body over 2 MiB": (b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: 3000000\r\n\r\n", 413,
                        "request_entity_too_large"),
    "malformed chunk": (b"POST /healthz HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400,
                        "bad_request"),
}


@pytest.mark.parametrize("request_bytes, status, code", NGINX_REFUSALS.values(), ids=NGINX_REFUSALS.keys())
def test_nginx_refusals_are_json(balancer, request_bytes, status, code):
    assert_json_error(raw_exchange(balancer.url, [request_bytes]), status, code)


def test_nginx_limits_each_user_to_the_printed_rate_in_json(_shared_gunicorn, shared_server):
    """The docs' per-user limit as printed (10 a second, bursts of 40): one
    user's 60 requests at once are 40 answers and 20 of nginx's 429s in the
    API's JSON with `Retry-After`; another user, and /healthz, are served
    meanwhile; and the limited user is served again a moment later."""
    greedy, other = make_user(), make_user()
    with nginx([_shared_gunicorn.url], per_user_limit=True) as limited:
        def tasks(user):
            return get(f"/api/{user.id}/tasks", f"Authorization: Bearer {user.token}")

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: raw_exchange(limited.url, [tasks(greedy)]), range(60)))
        statuses = Counter(answer.status for answer in answers)
        assert statuses[429] >= 20 - 2 and statuses[200] + statuses[429] == 60, statuses  # 1 token per 0.1 s
        refused = next(answer for answer in answers if answer.status == 429)
        assert_json_error(refused, 429, "rate_limited")
        assert refused.headers["retry-after"] == "1"
        assert raw_exchange(limited.url, [tasks(other)]).status == 200
        assert raw_exchange(limited.url, [get("/healthz")]).status == 200
        time.sleep(1.0)
        assert raw_exchange(limited.url, [tasks(greedy)]).status == 200
