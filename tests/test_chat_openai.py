"""The chat endpoint with ASSISTANT=openai against a real Chat Completions
server on loopback (tests/fake_llm.py): what it receives, what is stored,
and how failures and retries behave."""
from __future__ import annotations

import pytest
from support import built_app, connect
from fake_llm import FakeChatCompletions, malformed, slow, status, text, tool_calls

API_KEY = "sk-test-key-that-must-never-leak-0123456789"
SYSTEM_PROMPT = "You help the user manage their todo list."


@pytest.fixture(scope="module")
def llm():
    with FakeChatCompletions() as server:
        yield server


@pytest.fixture(scope="module")
def openai_app(app_url, llm):
    with built_app(app_url, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url, ASSISTANT_MODEL="test-model",
                   ASSISTANT_API_KEY=API_KEY, ASSISTANT_TIMEOUT_S="1", ASSISTANT_SYSTEM_PROMPT=SYSTEM_PROMPT,
                   CHAT_HISTORY_LIMIT=4) as app:
        yield app
        app.extensions["assistant"].close()


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
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.body["messages"] == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "assistant", "content": "first answer"},
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
