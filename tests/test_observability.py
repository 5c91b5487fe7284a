"""JSON logs with request ids, nothing secret in them, and Prometheus metrics
that stay correct across several gunicorn workers."""
from __future__ import annotations

import json
import re
import time
import uuid
from urllib.parse import quote

import pytest
import requests
from fake_llm import FakeChatCompletions, streamed, text
from support import SECRET, gunicorn, make_user, raw_exchange

from chat_blueprint.auth import mint_token

from devtools.ports import free_port

SECRET_MESSAGE = "my bank password is hunter2-7c1e"


@pytest.fixture(scope="module")
def server(app_url):
    with gunicorn(app_url, workers=2, threads=4) as server:
        yield server


def json_lines(server) -> list[dict]:
    lines = []
    for line in server.output().splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def wait_for_log(server, predicate, timeout_s=10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in json_lines(server):
            if predicate(entry):
                return entry
        time.sleep(0.05)
    raise AssertionError("no matching log line in:\n" + server.output()[-3000:])


def test_every_log_line_is_json(server):
    requests.get(f"{server.url}/healthz", timeout=10)
    wait_for_log(server, lambda e: e.get("path") == "/healthz")
    lines = [line for line in server.output().splitlines() if line.strip()]
    assert lines and all(json.loads(line) for line in lines)


def test_each_request_is_one_line_of_the_log(server):
    """The finding: every line was written twice under gunicorn (the package's
    own handler, and the root's through propagation)."""
    user = make_user()
    request_ids = [f"once-{n}-{user.id}" for n in range(5)]
    for request_id in request_ids:
        requests.get(f"{server.url}/api/{user.id}/tasks", headers={**user.headers, "X-Request-ID": request_id},
                     timeout=10)
    wait_for_log(server, lambda e: e.get("request_id") == request_ids[-1])
    time.sleep(0.5)
    for request_id in request_ids:
        assert [e["logger"] for e in json_lines(server) if e.get("request_id") == request_id] == [
            "chat_blueprint.access"]


def test_a_valid_incoming_request_id_is_kept_and_logged(server):
    user = make_user()
    response = requests.get(f"{server.url}/api/{user.id}/tasks",
                            headers={**user.headers, "X-Request-ID": "trace-42.abc"}, timeout=10)
    assert response.headers["X-Request-ID"] == "trace-42.abc"
    entry = wait_for_log(server, lambda e: e.get("request_id") == "trace-42.abc")
    assert entry["route"] == "/api/<user_id>/tasks" and entry["status"] == 200 and entry["method"] == "GET"
    assert entry["user_id"] == user.id and entry["duration_ms"] >= 0


@pytest.mark.parametrize("incoming", ["", "has spaces", "x" * 200, "<script>", "-leading-dash"])
def test_an_invalid_request_id_is_replaced(server, incoming):
    response = requests.get(f"{server.url}/healthz", headers={"X-Request-ID": incoming}, timeout=10)
    echoed = response.headers["X-Request-ID"]
    assert echoed != incoming and re.fullmatch(r"[0-9a-f]{32}", echoed)


def test_tokens_and_message_contents_stay_out_of_the_logs(server):
    user = make_user()
    answer = requests.post(f"{server.url}/api/{user.id}/chat", json={"message": SECRET_MESSAGE},
                           headers=user.headers, timeout=30)
    assert answer.status_code == 200
    requests.get(f"{server.url}/api/{user.id}/tasks?token={user.token}", headers=user.headers, timeout=10)
    requests.get(f"{server.url}/api/{user.id}/tasks", headers={"Authorization": "Bearer forged.token.value"},
                 timeout=10)
    wait_for_log(server, lambda e: e.get("status") == 401 and e.get("path") == f"/api/{user.id}/tasks")
    output = server.output()
    assert user.token not in output and "forged.token.value" not in output
    assert "hunter2" not in output
    assert "test-secret-for-hs256" not in output


UNSAFE = "\x7f\x85\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066"


def test_line_breaks_and_direction_overrides_from_a_request_are_escaped_in_the_log(server):
    """The finding: U+2028 and U+202E from a path or a token's `sub` reached the
    log raw, so one access line was three under str.splitlines() (and a
    terminal showed it reordered). They are JSON escapes now: each line is one
    line, and reads back as the request had it."""
    user_id = f"mallory\u2028{uuid.uuid4().hex}\u202e{UNSAFE}"
    headers = {"Authorization": f"Bearer {mint_token(SECRET, user_id)}", "X-Request-ID": f"unsafe-{uuid.uuid4()}"}
    requests.get(f"{server.url}/api/{quote(user_id, safe='')}/tasks", headers=headers, timeout=10)
    nowhere = f"/nowhere/{UNSAFE}"
    requests.get(f"{server.url}{quote(nowhere)}", timeout=10)
    refused = raw_exchange(server.url, [f"GET /{UNSAFE} HTTP/1.1\r\nHost: test\r\n\r\n".encode()])
    assert refused.status == 400  # gunicorn's own refusal, whose warning line quotes the request line
    entry = wait_for_log(server, lambda e: e.get("request_id") == headers["X-Request-ID"])
    assert entry["status"] == 200 and entry["user_id"] == user_id and entry["path"] == f"/api/{user_id}/tasks"
    wait_for_log(server, lambda e: e.get("path") == nowhere and e.get("status") == 404)
    wait_for_log(server, lambda e: e.get("logger") == "gunicorn.error" and "Invalid request" in e["message"])
    output = server.output()
    assert not any(character in output for character in UNSAFE)
    assert all(json.loads(line) for line in output.splitlines() if line.strip())


def metric_value(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(sample_labels.get(key) == value for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(server) -> str:
    response = requests.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    return response.text


def test_metrics_count_requests_over_every_worker(server):
    user = make_user()
    before = scrape(server)
    route = "/api/<user_id>/tasks"
    for _ in range(20):
        assert requests.get(f"{server.url}/api/{user.id}/tasks", headers=user.headers, timeout=10).status_code == 200
    for _ in range(3):
        requests.get(f"{server.url}/api/{user.id}/tasks", timeout=10)
    after = scrape(server)
    ok = metric_value(after, "http_requests_total", route=route, status="200", method="GET") - \
        metric_value(before, "http_requests_total", route=route, status="200", method="GET")
    unauthorized = metric_value(after, "http_requests_total", route=route, status="401") - \
        metric_value(before, "http_requests_total", route=route, status="401")
    assert (ok, unauthorized) == (20, 3)
    observed = metric_value(after, "http_request_duration_seconds_count", route=route, method="GET") - \
        metric_value(before, "http_request_duration_seconds_count", route=route, method="GET")
    assert observed == 23


def test_metrics_time_the_assistant_and_show_the_pool(server):
    user = make_user()
    before = scrape(server)
    for n in range(4):
        assert requests.post(f"{server.url}/api/{user.id}/chat", json={"message": f"m{n}"}, headers=user.headers,
                             timeout=30).status_code == 200
    after = scrape(server)
    turns = metric_value(after, "assistant_duration_seconds_count", backend="builtin", outcome="ok") - \
        metric_value(before, "assistant_duration_seconds_count", backend="builtin", outcome="ok")
    assert turns == 4
    assert "db_pool_connections_in_use" in after
    assert metric_value(after, "db_pool_connections_in_use") >= 0


def test_route_labels_do_not_carry_user_ids(server):
    user = make_user()
    requests.get(f"{server.url}/api/{user.id}/tasks", headers=user.headers, timeout=10)
    requests.get(f"{server.url}/no/such/{user.id}", timeout=10)
    assert user.id not in scrape(server)


def test_each_request_is_logged_once(server):
    requests.get(f"{server.url}/healthz", headers={"X-Request-ID": "once-only-1"}, timeout=10)
    wait_for_log(server, lambda e: e.get("request_id") == "once-only-1")
    time.sleep(0.2)
    assert [e.get("request_id") for e in json_lines(server)].count("once-only-1") == 1


def test_metrics_name_their_charset_once(server):
    content_type = requests.get(f"{server.url}/metrics", timeout=10).headers["Content-Type"]
    assert content_type.startswith("text/plain;")
    assert content_type.count("charset") == 1, content_type


def test_tokens_are_counted_by_model_over_every_worker(app_url):
    """Prompt and completion tokens, by the model the backend reported, summed over the
    workers (the cost per model in docs/operations.md is read from these)."""
    user = make_user()
    with FakeChatCompletions() as llm, gunicorn(app_url, workers=2, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url,
                                                 ASSISTANT_MODEL="configured-name") as server:
        llm.script(text("one", usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}),
                   streamed(["t", "wo"], usage={"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}),
                   text("three", model="bigger-model",
                        usage={"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}),
                   text("four", model="", usage={"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}))
        before = scrape(server)
        url = f"{server.url}/api/{user.id}/chat"
        assert requests.post(url, json={"message": "one"}, headers=user.headers, timeout=30).status_code == 200
        streamed_turn = requests.post(url, json={"message": "two", "stream": True}, headers=user.headers, timeout=30)
        assert streamed_turn.status_code == 200 and '"type":"finish"' in streamed_turn.text
        assert requests.post(url, json={"message": "three"}, headers=user.headers, timeout=30).status_code == 200
        assert requests.post(url, json={"message": "four"}, headers=user.headers, timeout=30).status_code == 200
        after = scrape(server)

    def added(name, model):
        labels = {"backend": "openai", "model": model}
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    assert (added("assistant_prompt_tokens_total", "fake-model"),
            added("assistant_completion_tokens_total", "fake-model")) == (12, 5)
    assert (added("assistant_prompt_tokens_total", "bigger-model"),
            added("assistant_completion_tokens_total", "bigger-model")) == (11, 4)
    # A server that names no model: its tokens count under the model asked for.
    assert (added("assistant_prompt_tokens_total", "configured-name"),
            added("assistant_completion_tokens_total", "configured-name")) == (2, 1)


def gunicorn_says(server, prefix: str) -> dict:
    return wait_for_log(server, lambda e: e["logger"] == "gunicorn.error" and e["message"].startswith(prefix))


def test_the_start_up_banner_names_the_assistant_and_the_workers(server):
    banner = gunicorn_says(server, "Serving with")
    assert banner["message"] == "Serving with assistant builtin; 2 gevent workers, 1000 connections each"


def test_an_unreachable_model_server_is_named_in_the_log_and_the_banner_never_in_the_answer(app_url):
    """The finding: the 502 said "could not be reached" and the log only "AssistantError", so an
    operator could not tell which server was meant. Host and port only: ASSISTANT_BASE_URL may
    carry credentials, a secret path or a key in its query, and none of them is logged."""
    user, port = make_user(), free_port()  # nothing listens there
    base_url = f"http://proxy-user:url-SECRET@127.0.0.1:{port}/v1/path-SECRET?key=query-SECRET"
    with gunicorn(app_url, threads=4, ASSISTANT="openai", ASSISTANT_BASE_URL=base_url, ASSISTANT_MODEL="test-model",
                  ASSISTANT_API_KEY="sk-key-SECRET", GUNICORN_WORKER_CLASS="gthread") as server:
        banner = gunicorn_says(server, "Serving with")
        assert banner["message"] == (f"Serving with assistant openai test-model at 127.0.0.1:{port}; "
                                     "1 gthread worker, 4 threads each")
        answer = requests.post(f"{server.url}/api/{user.id}/chat", json={"message": "hello"}, headers=user.headers,
                               timeout=30)
        assert answer.status_code == 502
        assert answer.json()["error"]["message"] == "the assistant failed: the assistant backend could not be reached"
        assert str(port) not in answer.text
        unanswered = wait_for_log(server, lambda e: e["message"].startswith("chat turn unanswered"))
        assert unanswered["message"] == ("chat turn unanswered: assistant_failed (AssistantError: the assistant "
                                         f"backend could not be reached); assistant backend at 127.0.0.1:{port}")
        assert "SECRET" not in server.output()
