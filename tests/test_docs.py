"""/docs in a real browser: Debian's Chromium, headless, driven by Playwright
(with the distribution's browser; Playwright downloads none). The page loads,
shows every operation, takes a pasted token and runs a chat turn, and never
asks any host but the app for anything (CONTRACT section 4, `/docs`)."""
from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest
import requests
from browser import chromium
from support import gunicorn, make_user

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(app_url):
    with gunicorn(app_url) as server:
        yield server


@pytest.fixture(scope="module")
def browser(server):
    """Closed before the server stops, so gunicorn waits on no keep-alive connection."""
    with chromium() as context:
        yield context


class Watched:
    """A page whose every request, failure and console error is recorded."""

    def __init__(self, context):
        self.page = context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.requests, self.failures, self.errors = [], [], []
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.on("requestfailed", lambda request: self.failures.append(request.url))
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))

    def foreign(self, origin: str) -> list[str]:
        return [request.url for request in self.requests
                if not request.url.startswith("data:") and _origin(request.url) != origin]


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def open_docs(browser, server) -> Watched:
    watched = Watched(browser)
    watched.page.goto(f"{server.url}/docs")
    watched.page.wait_for_selector("#operations-default-chat")
    return watched


def test_docs_show_every_operation_from_the_app_alone(browser, server):
    watched = open_docs(browser, server)
    try:
        document = requests.get(f"{server.url}/api/openapi.json", timeout=10).json()
        operation_ids = [operation["operationId"] for path in document["paths"].values()
                         for method, operation in path.items() if method != "parameters"]
        for operation_id in operation_ids:
            assert watched.page.locator(f"#operations-default-{operation_id}").count() == 1, operation_id
        assert watched.page.locator("button.authorize").count() == 1
        watched.page.wait_for_load_state("networkidle")
        assert watched.foreign(server.url) == []
        assert watched.failures == []
        assert watched.errors == []
        assert f"{server.url}/api/openapi.json" in [request.url for request in watched.requests]
    finally:
        watched.page.close()


def test_a_pasted_token_runs_a_chat_turn(browser, server):
    user = make_user("docs")
    watched = open_docs(browser, server)
    page = watched.page
    try:
        page.click("button.authorize")
        page.fill(".modal-ux input", user.token)
        page.click(".modal-ux button.authorize")
        page.click(".modal-ux button.btn-done")

        chat = page.locator("#operations-default-chat")
        chat.locator(".opblock-summary").click()
        chat.locator("input[placeholder='user_id']").fill(user.id)
        chat.locator("textarea.body-param__text").fill(json.dumps({"message": "hello from the docs"}))
        with page.expect_response(lambda response: response.url.endswith(f"/api/{user.id}/chat")) as answer:
            chat.locator("button.execute").click()
        assert answer.value.status == 200
        assert "turn 1" in answer.value.json()["response"]
        sent = answer.value.request
        assert sent.headers["authorization"] == f"Bearer {user.token}"
        shown = chat.locator(".live-responses-table tr.response")
        shown.first.wait_for()
        assert shown.first.locator(".response-col_status").inner_text().strip() == "200"
        assert "turn 1" in shown.first.locator(".response-col_description").inner_text()

        stored = requests.get(f"{server.url}/api/{user.id}/conversations", headers=user.headers, timeout=10).json()
        assert len(stored["data"]) == 1
        assert watched.foreign(server.url) == []
        assert watched.errors == []
    finally:
        page.close()
