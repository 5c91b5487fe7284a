"""CORS for a browser frontend on another origin (CONTRACT section 2,
`CORS_ORIGINS`): the preflight needs no token, Authorization, Content-Type and
Idempotency-Key are allowed, other origins get no Access-Control-Allow-Origin;
and the same seen from a real browser."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from browser import chromium
from support import built_app, gunicorn, make_user

from chat_blueprint.config import ConfigError, load_settings

FRONTEND = "http://localhost:3000"
OTHER = "https://evil.example"


def preflight(client, path, origin=FRONTEND, method="POST",
              headers="authorization,content-type,idempotency-key"):
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                         "Access-Control-Request-Headers": headers})


def header_set(response, name) -> set[str]:
    return {value.strip().lower() for value in response.headers.get(name, "").split(",") if value.strip()}


@pytest.fixture(scope="module")
def cors_app(app_url):
    with built_app(app_url, CORS_ORIGINS=f"{FRONTEND}, https://app.example.com") as app:
        yield app


@pytest.mark.parametrize("path, method", [("/api/{user}/tasks", "POST"), ("/api/{user}/chat", "POST"),
                                          ("/api/{user}/tasks/1", "PUT"), ("/api/{user}/tasks/1/complete", "PATCH"),
                                          ("/api/{user}/conversations", "GET"), ("/api/openapi.json", "GET")])
def test_a_preflight_needs_no_token(cors_app, path, method):
    response = preflight(cors_app.test_client(), path.format(user="alice"), method=method)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Access-Control-Allow-Origin"] == FRONTEND
    assert header_set(response, "Access-Control-Allow-Headers") >= {"authorization", "content-type",
                                                                    "idempotency-key"}
    assert method.lower() in header_set(response, "Access-Control-Allow-Methods")
    assert "origin" in header_set(response, "Vary")
    assert int(response.headers["Access-Control-Max-Age"]) > 0


def test_another_origin_gets_no_cors_headers(cors_app, alice):
    client = cors_app.test_client()
    for origin in (OTHER, "http://localhost:3001", "https://localhost:3000", "http://localhost:3000.evil.example"):
        answer = preflight(client, f"/api/{alice.id}/tasks", origin=origin)
        assert "Access-Control-Allow-Origin" not in answer.headers
        assert "Access-Control-Allow-Headers" not in answer.headers
        answer = client.get(f"/api/{alice.id}/tasks", headers={**alice.headers, "Origin": origin})
        assert answer.status_code == 200
        assert "Access-Control-Allow-Origin" not in answer.headers


def test_answers_carry_the_headers_a_client_reads(cors_app, alice):
    client = cors_app.test_client()
    created = client.post(f"/api/{alice.id}/tasks", json={"title": "from the browser"},
                          headers={**alice.headers, "Origin": "https://APP.example.com", "Idempotency-Key": "k1"})
    assert created.status_code == 201
    assert created.headers["Access-Control-Allow-Origin"] == "https://APP.example.com"
    assert header_set(created, "Access-Control-Expose-Headers") >= {
        "retry-after", "link", "x-request-id", "x-vercel-ai-ui-message-stream"}
    assert "Access-Control-Allow-Credentials" not in created.headers
    # Errors too, so the page can read why (a 401 without a token, a 403 on another user's path).
    for response in (client.get(f"/api/{alice.id}/tasks", headers={"Origin": FRONTEND}),
                     client.get("/api/someone-else/tasks", headers={**alice.headers, "Origin": FRONTEND})):
        assert response.status_code in (401, 403)
        assert response.headers["Access-Control-Allow-Origin"] == FRONTEND


def test_a_preflight_changes_nothing_and_the_real_request_still_needs_a_token(cors_app, alice):
    client = cors_app.test_client()
    assert preflight(client, f"/api/{alice.id}/tasks").status_code == 200
    assert client.get(f"/api/{alice.id}/tasks", headers=alice.headers).get_json() == []
    assert client.post(f"/api/{alice.id}/tasks", json={"title": "x"}, headers={"Origin": FRONTEND}).status_code == 401


def test_without_cors_origins_there_are_no_cors_headers(client, alice):
    response = preflight(client, f"/api/{alice.id}/tasks")
    assert response.status_code == 200  # still no 401 on a preflight
    assert not [name for name in response.headers.keys() if name.lower().startswith("access-control-")]
    response = client.get(f"/api/{alice.id}/tasks", headers={**alice.headers, "Origin": FRONTEND})
    assert not [name for name in response.headers.keys() if name.lower().startswith("access-control-")]


def test_star_allows_every_origin(app_url, alice):
    with built_app(app_url, CORS_ORIGINS="*") as app:
        client = app.test_client()
        response = preflight(client, f"/api/{alice.id}/chat", origin=OTHER)
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert client.get(f"/api/{alice.id}/tasks", headers={**alice.headers, "Origin": OTHER}).headers[
            "Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("value, origins", [
    ("http://localhost:3000", ("http://localhost:3000",)),
    (" https://App.Example.com/ , http://localhost:3000 ", ("https://app.example.com", "http://localhost:3000")),
    ("http://[::1]:3000", ("http://[::1]:3000",)),
    ("*", ("*",)),
    ("", None),
])
def test_cors_origins_are_read(value, origins):
    assert load_settings({"DATABASE_URL": "postgresql://h/db", "CORS_ORIGINS": value}).cors_origins == origins


@pytest.mark.parametrize("value", ["localhost:3000", "http://localhost:3000/app", "ftp://files.example",
                                   "http://localhost:3000?x=1", "http://user@localhost:3000", "*, http://a.example",
                                   "http://localhost:port", ",", "http://"])
def test_bad_cors_origins_stop_start_up_naming_the_variable(value):
    with pytest.raises(ConfigError, match="^CORS_ORIGINS"):
        load_settings({"DATABASE_URL": "postgresql://h/db", "CORS_ORIGINS": value})


class FrontendPage:
    """A static page on its own port, like a Next.js frontend: served as
    http://127.0.0.1:PORT (an allowed origin) or http://localhost:PORT (not)."""

    def __init__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _Page(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"<!DOCTYPE html><title>frontend</title><p>a frontend</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ADD_TASK = """async ([api, token, key]) => {
  try {
    const answer = await fetch(api + "/tasks", {
      method: "POST",
      headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json", "Idempotency-Key": key},
      body: JSON.stringify({title: "from the frontend"}),
    });
    return {status: answer.status, requestId: answer.headers.get("X-Request-ID"), body: await answer.json()};
  } catch (error) {
    return {error: String(error)};
  }
}"""


def test_a_browser_frontend_on_another_origin(app_url):
    """Through real gunicorn, and with Chromium itself enforcing CORS: from the
    allowed origin the preflight passes and the answer is readable; from any
    other, the browser never sends the request at all."""
    user = make_user("browser")
    with FrontendPage() as frontend:
        allowed = f"http://127.0.0.1:{frontend.port}"
        # The browser closes (and with it its keep-alive connections) before gunicorn stops.
        with gunicorn(app_url, CORS_ORIGINS=f"{allowed},{FRONTEND}") as server, chromium() as browser:
            api = f"{server.url}/api/{user.id}"
            preflight_answer = requests.options(f"{api}/chat", timeout=10, headers={
                "Origin": FRONTEND, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,idempotency-key"})
            assert preflight_answer.status_code == 200
            assert preflight_answer.headers["Access-Control-Allow-Origin"] == FRONTEND
            refused = requests.options(f"{api}/chat", timeout=10,
                                       headers={"Origin": OTHER, "Access-Control-Request-Method": "POST"})
            assert "Access-Control-Allow-Origin" not in refused.headers

            page = browser.new_page()
            page.goto(allowed + "/")
            answer = page.evaluate(ADD_TASK, [api, user.token, "first"])
            assert answer.get("status") == 201, answer
            assert answer["body"]["title"] == "from the frontend"
            assert answer["requestId"]  # an exposed header
            page.goto(f"http://localhost:{frontend.port}/")
            blocked = page.evaluate(ADD_TASK, [api, user.token, "second"])
            assert "error" in blocked and "Failed to fetch" in blocked["error"], blocked
            stored = requests.get(f"{api}/tasks", headers=user.headers, timeout=10).json()
            assert [task["title"] for task in stored] == ["from the frontend"]
