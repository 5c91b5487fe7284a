"""The chat endpoint with ASSISTANT=openai against a real Chat Completions
server on loopback (tests/fake_llm.py): what it receives, what is stored,
and how failures and retries behave."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
from fake_llm import FakeChatCompletions, malformed, redirect, slow, status, text, tool_calls
from support import built_app, connect, make_user, render_strict_chat_template

API_KEY = "sk-test-key-that-must-never-leak-0123456789"
SYSTEM_PROMPT = "You help the user manage their todo list."


@contextmanager
def app_on(app_url, llm, **env):
    """An app with ASSISTANT=openai pointed at `llm` (model test-model), its client closed afterwards."""
    with built_app(app_url, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url, ASSISTANT_MODEL="test-model",
                   **env) as app:
        yield app
        app.extensions["assistant"].close()


@pytest.fixture(scope="module")
def openai_app(app_url, llm):
    with app_on(app_url, llm, ASSISTANT_API_KEY=API_KEY, ASSISTANT_TIMEOUT_S="1", ASSISTANT_SYSTEM_PROMPT=SYSTEM_PROMPT,
                CHAT_HISTORY_LIMIT=4, ASSISTANT_TEMPERATURE="0.3", ASSISTANT_MAX_TOKENS="500") as app:
        yield app


@pytest.fixture
def client(openai_app, llm):
    llm.reset()
    return openai_app.test_client()


def chat(client, user, message, conversation_id=None, key=None):
    body = {"message": message, **({"conversation_id": conversation_id} if conversation_id else {})}
    headers = {**user.headers, **({"Idempotency-Key": key} if key else {})}
    return client.post(f"/api/{user.id}/chat", json=body, headers=headers)


def stored(app_url, user_id):
    with connect(app_url, user_id) as conn:
        return conn.execute("select role, content, tool_calls, reply_to from message order by id").fetchall()


def test_request_carries_system_prompt_window_and_new_message(client, llm, alice):
    llm.script(text("first answer"), text("second answer"), text("third answer"))
    conversation_id = chat(client, alice, "one").get_json()["conversation_id"]
    chat(client, alice, "two", conversation_id)
    chat(client, alice, "three", conversation_id)
    request = llm.requests[-1]
    assert request.body["model"] == "test-model"
    assert (request.body["temperature"], request.body["max_tokens"]) == (0.3, 500)
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    # The last CHAT_HISTORY_LIMIT=4 messages begin with "first answer": an assistant message
    # opening the window is left out, since strict chat templates want a user message first.
    assert request.body["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": "three"},
    ]


def test_text_reply_is_stored_and_returned(client, llm, alice, app_url):
    llm.script(text("Added milk to your list."))
    answer = chat(client, alice, "add milk").get_json()
    assert answer["response"] == "Added milk to your list." and answer["tool_calls"] == []
    assert stored(app_url, alice.id)[-1][:3] == ("assistant", "Added milk to your list.", [])


def test_tool_call_reply_without_text_is_stored_and_returned(client, llm, alice, app_url):
    calls = [{"id": "call_1", "name": "add_task", "arguments": {"title": "eggs", "due": None}}]
    llm.script(tool_calls(calls))
    answer = chat(client, alice, "add eggs").get_json()
    assert answer["response"] == "" and answer["tool_calls"] == calls
    assert stored(app_url, alice.id)[-1][:3] == ("assistant", "", calls)
    conversation_id = answer["conversation_id"]
    messages = client.get(f"/api/{alice.id}/conversations/{conversation_id}/messages",
                          headers=alice.headers).get_json()["data"]
    assert messages[-1]["tool_calls"] == calls


@pytest.mark.parametrize("failure, expected", [
    (slow(3, then=text("too late")), 504),
    (status(500, "upstream exploded"), 502),
    (status(429, "slow down", error_code="rate_limit_exceeded"), 502),
    (status(408, "upstream timed out"), 504),
    (malformed(), 502),
])
def test_failures_keep_the_message_once_and_a_retry_completes(client, llm, alice, app_url, failure, expected):
    llm.script(failure)
    failed = chat(client, alice, "please answer", key="retry-me")
    assert failed.status_code == expected
    error = failed.get_json()["error"]
    assert error["conversation_id"] and API_KEY not in failed.get_data(as_text=True)
    assert [row[0] for row in stored(app_url, alice.id)] == ["user"]
    llm.script(text("recovered"))
    retried = chat(client, alice, "please answer", key="retry-me")
    assert retried.status_code == 200, retried.get_json()
    assert retried.get_json()["response"] == "recovered"
    assert retried.get_json()["conversation_id"] == error["conversation_id"]
    rows = stored(app_url, alice.id)
    assert [(role, content) for role, content, _, _ in rows] == [("user", "please answer"), ("assistant", "recovered")]
    assert llm.requests[-1].body["messages"][-1] == {"role": "user", "content": "please answer"}


def test_an_upstream_retry_after_is_passed_on(client, llm, alice):
    llm.script(status(429, "slow down", headers={"Retry-After": "7"}), status(503, headers={"Retry-After": "86400"}))
    limited = chat(client, alice, "are you there?")
    unavailable = chat(client, alice, "are you there now?")
    assert (limited.status_code, limited.headers["Retry-After"]) == (502, "7")
    assert (unavailable.status_code, unavailable.headers["Retry-After"]) == (502, "60")  # at most a minute
    assert limited.get_json()["error"]["code"] == "assistant_failed"


def test_user_is_a_stable_hash_per_user_never_the_id(client, llm, alice):
    bob = make_user("bob")
    llm.script(text("a"), text("b"), text("c"))
    conversation_id = chat(client, alice, "one").get_json()["conversation_id"]
    chat(client, alice, "two", conversation_id)
    chat(client, bob, "one")
    alice_first, alice_second, bob_first = (request.body["user"] for request in llm.requests)
    assert alice_first == alice_second != bob_first
    assert alice.id not in alice_first and bob.id not in bob_first


def test_after_a_failed_turn_roles_still_alternate_with_every_user_text(client, llm, alice, app_url):
    llm.script(text("noted"), status(500), text("both done"))
    conversation_id = chat(client, alice, "add milk").get_json()["conversation_id"]
    assert chat(client, alice, "add eggs", conversation_id).status_code == 502
    assert chat(client, alice, "and bread", conversation_id).status_code == 200
    assert [row[:2] for row in stored(app_url, alice.id)] == [
        ("user", "add milk"), ("assistant", "noted"), ("user", "add eggs"), ("user", "and bread"),
        ("assistant", "both done")]
    assert llm.requests[-1].body["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "add milk"},
        {"role": "assistant", "content": "noted"},
        {"role": "user", "content": "add eggs\n\nand bread"},
    ]
    render_strict_chat_template(llm.requests[-1].body["messages"])  # what vLLM and llama.cpp would render


@pytest.fixture(scope="module")
def long_window_app(app_url, llm):
    """The default window bounds: 50 messages, 48,000 characters; messages up to 16,000."""
    with app_on(app_url, llm, ASSISTANT_TIMEOUT_S="5") as app:
        yield app


def test_the_window_stops_at_48000_characters_with_the_new_message_whole(long_window_app, llm, alice):
    client = long_window_app.test_client()
    llm.reset()
    texts = [f"message {n} " + chr(ord("a") + n) * 15_990 for n in range(5)]
    llm.script(*(text(f"reply {n}") for n in range(5)))
    conversation_id = None
    for message in texts:
        answer = chat(client, alice, message, conversation_id)
        assert answer.status_code == 200, answer.get_json()
        conversation_id = answer.get_json()["conversation_id"]
    sent = llm.requests[-1].body["messages"]
    # Newest first: message 4, reply 3, message 3, reply 2 fit (32,014 characters);
    # message 2 would make it 48,014, so the window stops there and opens with message 3.
    assert sent == [
        {"role": "user", "content": texts[3]},
        {"role": "assistant", "content": "reply 3"},
        {"role": "user", "content": texts[4]},
    ]
    assert sum(len(message["content"]) for message in sent) <= 48_000


@pytest.fixture(scope="module")
def tiny_window_app(app_url, llm):
    with app_on(app_url, llm, ASSISTANT_TIMEOUT_S="5", CHAT_HISTORY_MAX_CHARS="100") as app:
        yield app


def test_a_new_message_longer_than_the_bound_is_sent_whole_and_alone(tiny_window_app, llm, alice):
    client = tiny_window_app.test_client()
    llm.reset()
    llm.script(text("short"), text("long"), text("short again"))
    conversation_id = chat(client, alice, "hello").get_json()["conversation_id"]
    long_message = "z" * 500
    assert chat(client, alice, long_message, conversation_id).status_code == 200
    assert llm.requests[-1].body["messages"] == [{"role": "user", "content": long_message}]
    assert chat(client, alice, "ok", conversation_id).status_code == 200
    # "ok" and "long" fit in 100 characters; the 500-character message does not.
    assert llm.requests[-1].body["messages"] == [{"role": "user", "content": "ok"}]


# A hostile model server (issue 24), in blocking mode: a 502 or a reply without what it could not
# hold, never a 500, and a retry with the key still completes the turn.

@pytest.mark.parametrize("code", [302, 307])
def test_a_redirect_is_a_502_and_its_target_is_never_contacted(client, llm, alice, app_url, code):
    with FakeChatCompletions(default=text("SECRET FROM INTERNAL SERVICE")) as elsewhere:
        llm.script(redirect(code, f"{elsewhere.base_url}/chat/completions"))
        failed = chat(client, alice, "where to?", key="redirected")
        assert elsewhere.requests == []
    assert failed.status_code == 502 and failed.get_json()["error"]["code"] == "assistant_failed"
    assert f"HTTP {code}" in failed.get_json()["error"]["message"]
    assert [row[0] for row in stored(app_url, alice.id)] == ["user"]
    llm.script(text("from the right place"))
    assert chat(client, alice, "where to?", key="redirected").get_json()["response"] == "from the right place"


@pytest.mark.parametrize("count", [10**400, 10**42], ids=["10**400", "10**42"])
def test_usage_beyond_a_bigint_is_dropped(client, llm, alice, app_url, count):
    llm.script(text("counted", usage={"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count}))
    answer = chat(client, alice, "count this")
    assert answer.status_code == 200, answer.get_json()
    assert answer.get_json()["usage"] is None
    with connect(app_url, alice.id) as conn:
        assert conn.execute("select usage from message where role = 'assistant'").fetchall() == [(None,)]


def test_tool_call_arguments_nested_too_deeply_are_a_502_and_a_retry_completes(client, llm, alice, app_url):
    deep = '{"a": ' * 500 + "1" + "}" * 500
    llm.script(tool_calls([{"id": "c", "name": "add_task", "arguments": deep}]), text("flat this time"))
    failed = chat(client, alice, "nest", key="nested")
    assert failed.status_code == 502 and "nested too deeply" in failed.get_json()["error"]["message"]
    assert [row[0] for row in stored(app_url, alice.id)] == ["user"]
    assert chat(client, alice, "nest", key="nested").get_json()["response"] == "flat this time"
