"""The OpenAI-compatible backend against a real Chat Completions server on loopback.

No database is involved: the backend is built from settings and called
directly, and the fake server records exactly what went over the wire.
"""
from __future__ import annotations

import logging
import socket
import time
import traceback

import pytest
from fake_llm import FakeChatCompletions, malformed, slow, status, text, tool_calls

from chat_blueprint.assistants import AssistantError, AssistantTimeout, HistoryMessage, build_assistant
from chat_blueprint.assistants.openai_compatible import OpenAICompatibleAssistant
from chat_blueprint.config import load_settings

API_KEY = "sk-test-0123456789abcdefSECRET"
WINDOW = [
    HistoryMessage(role="user", content="buy milk"),
    HistoryMessage(role="assistant", content="Added 'buy milk'."),
    HistoryMessage(role="user", content="and eggs"),
]


@pytest.fixture
def llm():
    with FakeChatCompletions() as server:
        yield server


@pytest.fixture
def make_assistant(llm):
    """Builds backends from environment-style settings pointed at `llm`; closes them afterwards."""
    built = []

    def make(**env):
        values = {
            "DATABASE_URL": "postgresql://unused@127.0.0.1/unused",
            "ASSISTANT": "openai",
            "ASSISTANT_BASE_URL": llm.base_url,
            "ASSISTANT_MODEL": "fake-model",
            "ASSISTANT_API_KEY": API_KEY,
            "ASSISTANT_TIMEOUT_S": "5",
        }
        values.update({name: value for name, value in env.items() if value is not None})
        for name in [name for name, value in env.items() if value is None]:
            values.pop(name, None)
        assistant = build_assistant(load_settings(values))
        built.append(assistant)
        return assistant

    yield make
    for assistant in built:
        assistant.close()


def test_build_assistant_picks_this_backend(make_assistant):
    assert isinstance(make_assistant(), OpenAICompatibleAssistant)


def test_request_carries_system_prompt_then_window_in_order(llm, make_assistant):
    assistant = make_assistant(ASSISTANT_SYSTEM_PROMPT="You manage a todo list.")

    assistant.reply(WINDOW, turn=2)

    (request,) = llm.requests
    assert request.path == "/v1/chat/completions"
    assert request.body["model"] == "fake-model"
    assert request.body["messages"] == [
        {"role": "system", "content": "You manage a todo list."},
        {"role": "user", "content": "buy milk"},
        {"role": "assistant", "content": "Added 'buy milk'."},
        {"role": "user", "content": "and eggs"},
    ]


def test_no_system_message_without_a_prompt(llm, make_assistant):
    make_assistant().reply(WINDOW[:1], turn=1)

    assert llm.requests[0].body["messages"] == [{"role": "user", "content": "buy milk"}]


def test_api_key_is_the_bearer_token(llm, make_assistant):
    make_assistant().reply(WINDOW, turn=2)

    assert llm.requests[0].headers["authorization"] == f"Bearer {API_KEY}"


def test_without_a_key_a_placeholder_is_sent_not_the_environment(llm, make_assistant, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment")

    make_assistant(ASSISTANT_API_KEY=None).reply(WINDOW, turn=2)

    assert llm.requests[0].headers["authorization"] == "Bearer unused"


def test_text_reply(llm, make_assistant):
    llm.script(text("Added eggs too."))

    reply = make_assistant().reply(WINDOW, turn=2)

    assert reply.text == "Added eggs too."
    assert reply.tool_calls == []


def test_tool_call_reply_without_text_is_valid(llm, make_assistant):
    llm.script(tool_calls([
        {"id": "call_1", "name": "add_task", "arguments": {"title": "eggs", "tags": ["food"]}},
        {"id": "call_2", "name": "list_tasks", "arguments": ""},
    ]))

    reply = make_assistant().reply(WINDOW, turn=2)

    assert reply.text == ""
    assert reply.tool_calls == [
        {"id": "call_1", "name": "add_task", "arguments": {"title": "eggs", "tags": ["food"]}},
        {"id": "call_2", "name": "list_tasks", "arguments": {}},
    ]


def test_tool_calls_with_text(llm, make_assistant):
    llm.script(tool_calls([{"id": "c", "name": "add_task", "arguments": {"title": "eggs"}}], content="On it."))

    reply = make_assistant().reply(WINDOW, turn=2)

    assert reply.text == "On it."
    assert reply.tool_calls[0]["arguments"] == {"title": "eggs"}


def test_past_tool_calls_are_described_in_text(llm, make_assistant):
    """Unanswered `tool_calls` in a request are rejected by OpenAI, so they travel as text."""
    history = [
        HistoryMessage(role="user", content="add eggs"),
        HistoryMessage(role="assistant", content="",
                       tool_calls=[{"id": "c", "name": "add_task", "arguments": {"title": "eggs"}}]),
        HistoryMessage(role="user", content="thanks"),
    ]

    make_assistant().reply(history, turn=2)

    sent = llm.requests[0].body["messages"]
    assert sent[1] == {"role": "assistant", "content": '[called tool add_task with {"title": "eggs"}]'}
    assert all("tool_calls" not in message for message in sent)


def test_slow_server_is_a_timeout_within_the_budget(llm, make_assistant):
    llm.script(slow(10))
    assistant = make_assistant(ASSISTANT_TIMEOUT_S="0.5")

    started = time.monotonic()
    with pytest.raises(AssistantTimeout):
        assistant.reply(WINDOW, turn=2)

    assert time.monotonic() - started < 2
    assert len(llm.requests) == 1  # no retry that would outlive ASSISTANT_TIMEOUT_S


@pytest.mark.parametrize("code", [500, 503, 429, 401, 404, 400])
def test_error_status_is_an_assistant_error_without_retry(llm, make_assistant, code):
    llm.script(status(code))

    with pytest.raises(AssistantError) as failure:
        make_assistant().reply(WINDOW, turn=2)

    assert not isinstance(failure.value, AssistantTimeout)
    assert f"HTTP {code}" in str(failure.value)
    assert len(llm.requests) == 1


@pytest.mark.parametrize("body", [
    b"{\"choices\": [ this is not json",
    b"",
    b"<html>Bad gateway</html>",
    b"null",
    b"[1, 2]",
    b"{}",
    b"{\"choices\": []}",
    b"{\"choices\": [{\"message\": null}]}",
    b"{\"choices\": [{\"message\": {\"role\": \"assistant\", \"content\": 5}}]}",
    b"{\"choices\": [{\"message\": {\"role\": \"assistant\", \"content\": \"\"}}]}",
    b"{\"choices\": [{\"message\": {\"role\": \"assistant\", \"content\": null}}]}",
], ids=["truncated", "empty", "html", "null", "list", "no-choices", "zero-choices", "null-message",
        "number-content", "empty-reply", "null-reply"])
def test_malformed_body_is_an_assistant_error(llm, make_assistant, body):
    llm.script(malformed(body))

    with pytest.raises(AssistantError) as failure:
        make_assistant().reply(WINDOW, turn=2)

    assert not isinstance(failure.value, AssistantTimeout)


def test_tool_call_arguments_that_are_not_json(llm, make_assistant):
    llm.script(tool_calls([{"id": "c", "name": "add_task", "arguments": "{title: eggs"}]))

    with pytest.raises(AssistantError, match="not JSON"):
        make_assistant().reply(WINDOW, turn=2)


def test_unreachable_server_is_an_assistant_error(make_assistant):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assistant = make_assistant(ASSISTANT_BASE_URL=f"http://127.0.0.1:{port}/v1")

    with pytest.raises(AssistantError, match="could not be reached"):
        assistant.reply(WINDOW, turn=2)


def test_a_retry_succeeds_once_the_server_recovers(llm, make_assistant):
    llm.script(status(500))
    assistant = make_assistant()

    with pytest.raises(AssistantError):
        assistant.reply(WINDOW, turn=2)
    llm.script(text("back again"))

    assert assistant.reply(WINDOW, turn=2).text == "back again"


@pytest.mark.parametrize("answer", [
    status(401, message=f"Incorrect API key provided: {API_KEY}"),
    status(429, message=f"key {API_KEY} is over quota"),
    malformed(f"not json {API_KEY}".encode()),
    slow(10),
], ids=["401", "429", "malformed", "timeout"])
def test_api_key_never_appears_in_errors_or_logs(llm, make_assistant, caplog, answer):
    llm.script(answer)
    assistant = make_assistant(ASSISTANT_TIMEOUT_S="0.5")

    with caplog.at_level(logging.DEBUG), pytest.raises(AssistantError) as failure:
        assistant.reply(WINDOW, turn=2)

    assert API_KEY not in "".join(traceback.format_exception(failure.value))
    assert API_KEY not in repr(failure.value.args)
    assert API_KEY not in caplog.text


def test_a_key_echoed_as_the_error_code_is_redacted(llm, make_assistant):
    llm.script(status(401, error_code=API_KEY))

    with pytest.raises(AssistantError) as failure:
        make_assistant().reply(WINDOW, turn=2)

    assert str(failure.value) == "the assistant backend answered HTTP 401 ([redacted])"


def test_upstream_error_code_is_kept(llm, make_assistant):
    llm.script(status(404, "The model does not exist", error_code="model_not_found"))

    with pytest.raises(AssistantError) as failure:
        make_assistant().reply(WINDOW, turn=2)

    assert str(failure.value) == "the assistant backend answered HTTP 404 (model_not_found)"


def test_fake_server_delay_applies_to_every_answer(llm, make_assistant):
    llm.delay = 0.2
    assistant = make_assistant()

    started = time.monotonic()
    assistant.reply(WINDOW, turn=2)

    assert time.monotonic() - started >= 0.2
