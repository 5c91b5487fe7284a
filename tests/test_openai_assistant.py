"""The OpenAI-compatible backend against a real Chat Completions server on loopback.

No database is involved: the backend is built from settings and called
directly, and the fake server records exactly what went over the wire.
"""
from __future__ import annotations

import email.utils
import json
import logging
import socket
import time
import traceback

import pytest
from fake_llm import (
    Answer,
    FakeChatCompletions,
    flood,
    malformed,
    redirect,
    slow,
    stalled,
    status,
    streamed,
    text,
    tool_calls,
    trickled,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from support import ChatTemplateError, render_strict_chat_template

from chat_blueprint.assistants import AssistantError, AssistantTimeout, HistoryMessage, build_assistant
from chat_blueprint.assistants.completions import MAX_ARGUMENT_DEPTH, MAX_TOOL_CALLS
from chat_blueprint.assistants.deadlines import Watchdog
from chat_blueprint.assistants.openai_compatible import MAX_ANSWER_BYTES, OpenAICompatibleAssistant
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


# What a real model server needs (issue 13): error mapping, settings, `user`, windows.

@pytest.mark.parametrize("code", [408, 504])
def test_an_upstream_timeout_status_is_a_timeout(llm, make_assistant, code):
    """A gateway whose own upstream timed out answers 408 (or 504): a 504 here, not a 502."""
    llm.script(status(code))

    with pytest.raises(AssistantTimeout, match=f"HTTP {code}"):
        make_assistant().reply(WINDOW, turn=2)


@pytest.mark.parametrize("code, headers, expected", [
    (429, {"Retry-After": "7"}, 7),
    (503, {"Retry-After": "7"}, 7),
    (429, {"Retry-After": "3600"}, 60),
    (429, {"Retry-After": "0"}, 0),
    (429, {"retry-after-ms": "1500", "Retry-After": "9"}, 2),
    (429, {"Retry-After": "soon"}, None),
    (429, {}, None),
    (500, {"Retry-After": "7"}, None),
], ids=["429", "503", "capped", "zero", "ms-first", "garbage", "none", "not-for-500"])
def test_retry_after_of_a_429_or_503_is_kept(llm, make_assistant, code, headers, expected):
    llm.script(status(code, headers=headers))

    with pytest.raises(AssistantError) as failure:
        make_assistant().reply(WINDOW, turn=2)

    assert not isinstance(failure.value, AssistantTimeout)
    assert failure.value.retry_after_s == expected


def test_retry_after_as_an_http_date(llm, make_assistant):
    llm.script(status(503, headers={"Retry-After": email.utils.formatdate(time.time() + 20, usegmt=True)}))

    with pytest.raises(AssistantError) as failure:
        make_assistant().reply(WINDOW, turn=2)

    assert 18 <= failure.value.retry_after_s <= 21


def test_a_streamed_call_maps_statuses_the_same_way(llm, make_assistant):
    llm.script(status(408), status(429, headers={"Retry-After": "7"}))
    assistant = make_assistant()

    with pytest.raises(AssistantTimeout):
        list(assistant.stream(WINDOW, turn=2))
    with pytest.raises(AssistantError) as failure:
        list(assistant.stream(WINDOW, turn=2))
    assert failure.value.retry_after_s == 7


def test_a_trickled_answer_is_cut_off_at_the_timeout(llm, make_assistant):
    """Each piece arrives well within the per-read timeout, but the whole answer would take
    3 s: ASSISTANT_TIMEOUT_S bounds the whole answer, so it is a timeout after about 1 s."""
    llm.script(trickled(text("x" * 300), piece_bytes=10, interval_s=0.08))
    assistant = make_assistant(ASSISTANT_TIMEOUT_S="1")

    started = time.monotonic()
    with pytest.raises(AssistantTimeout):
        assistant.reply(WINDOW, turn=2)

    assert time.monotonic() - started < 1.6


def test_an_answer_that_stalls_is_cut_off_at_the_timeout_not_a_read_timeout_later(llm, make_assistant):
    """The body starts at once, a piece comes at 0.6 s, then nothing: each wait for bytes is
    within the client's timeout of 1 s, but the whole answer is due at 1 s, not at 1.6 s."""
    llm.script(trickled(text("x" * 300), piece_bytes=10, interval_s=0.6, stall_after=2))
    assistant = make_assistant(ASSISTANT_TIMEOUT_S="1")

    started = time.monotonic()
    with pytest.raises(AssistantTimeout):
        assistant.reply(WINDOW, turn=2)
    elapsed = time.monotonic() - started

    assert 0.95 <= elapsed < 1.4, elapsed
    llm.script(text("next"))
    assert assistant.reply(WINDOW, turn=2).text == "next"  # the pool still serves


def test_a_stream_that_stalls_is_cut_off_at_the_timeout(llm, make_assistant):
    llm.script(stalled(streamed(["one", " two", " three"], interval_s=0.3), after=3))  # the role, "one", " two"
    assistant = make_assistant(ASSISTANT_TIMEOUT_S="1")

    started, deltas = time.monotonic(), []
    with pytest.raises(AssistantTimeout):
        for item in assistant.stream(WINDOW, turn=2):
            deltas.append(item)
    elapsed = time.monotonic() - started

    assert deltas == ["one", " two"] and 0.95 <= elapsed < 1.4, (deltas, elapsed)


def test_a_trickled_answer_within_the_timeout_is_read_whole(llm, make_assistant):
    llm.script(trickled(text("y" * 100), piece_bytes=40, interval_s=0.02))

    assert make_assistant().reply(WINDOW, turn=2).text == "y" * 100


def test_temperature_and_max_tokens_are_sent_when_set(llm, make_assistant):
    make_assistant(ASSISTANT_TEMPERATURE="0.2", ASSISTANT_MAX_TOKENS="256").reply(WINDOW, turn=2)
    llm.script(streamed(["a"]))
    list(make_assistant(ASSISTANT_TEMPERATURE="0", ASSISTANT_MAX_TOKENS="1").stream(WINDOW, turn=2))
    make_assistant().reply(WINDOW, turn=2)

    blocking, streaming, plain = (request.body for request in llm.requests)
    assert (blocking["temperature"], blocking["max_tokens"]) == (0.2, 256)
    assert (streaming["temperature"], streaming["max_tokens"]) == (0, 1) and streaming["stream"] is True
    assert "temperature" not in plain and "max_tokens" not in plain


USER_KEY = "a-key-of-at-least-sixteen-characters"


def test_user_is_a_keyed_hash_stable_per_user(llm, make_assistant):
    one, other = make_assistant(ASSISTANT_USER_HASH_KEY=USER_KEY), make_assistant(ASSISTANT_USER_HASH_KEY=USER_KEY)
    one.reply(WINDOW, turn=2, user_id="alice")
    other.reply(WINDOW, turn=2, user_id="alice")  # another instance, same settings
    llm.script(streamed(["a"]))
    list(one.stream(WINDOW, turn=2, user_id="alice"))
    one.reply(WINDOW, turn=2, user_id="bob")
    make_assistant(ASSISTANT_USER_HASH_KEY=USER_KEY + "-rotated").reply(WINDOW, turn=2, user_id="alice")

    alice, alice_elsewhere, alice_streamed, bob, alice_other_key = (request.body["user"] for request in llm.requests)
    assert alice == alice_elsewhere == alice_streamed
    assert alice != bob and alice != alice_other_key
    assert "alice" not in alice and len(alice) == 32 and int(alice, 16) >= 0


def test_user_key_defaults_to_the_auth_secret_and_can_be_off(llm, make_assistant):
    make_assistant(BETTER_AUTH_SECRET=USER_KEY).reply(WINDOW, turn=2, user_id="alice")
    make_assistant(BETTER_AUTH_SECRET=USER_KEY, ASSISTANT_USER_HASH_KEY="off").reply(WINDOW, turn=2, user_id="alice")
    make_assistant().reply(WINDOW, turn=2, user_id="alice")  # no key at all (a JWKS-only set-up)

    with_secret, off, keyless = (request.body for request in llm.requests)
    assert len(with_secret["user"]) == 32 and "alice" not in with_secret["user"]
    assert "user" not in off and "user" not in keyless


def test_the_strict_template_refuses_what_the_stored_history_can_hold():
    """The template the tests hold windows to does refuse both shapes a raw window can take."""
    with pytest.raises(ChatTemplateError):
        render_strict_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError):
        render_strict_chat_template([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"},
                                     {"role": "user", "content": "b"}])
    assert render_strict_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                                        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]) \
        == "[INST] s\n\na [/INST] b</s>[INST] c [/INST]"


def test_consecutive_messages_of_one_role_are_merged(llm, make_assistant):
    """A failed turn leaves two user messages in a row; strict chat templates refuse that."""
    history = [
        HistoryMessage("assistant", "a reply whose question is outside the window"),
        HistoryMessage("user", "buy milk"),
        HistoryMessage("user", "buy milk, please"),  # the retry after a failed turn
        HistoryMessage("assistant", "Added milk."),
        HistoryMessage("assistant", "Anything else?"),
        HistoryMessage("user", "and eggs"),
    ]

    make_assistant(ASSISTANT_SYSTEM_PROMPT="You manage a todo list.").reply(history, turn=3)

    assert llm.requests[0].body["messages"] == [
        {"role": "system", "content": "You manage a todo list."},
        {"role": "user", "content": "buy milk\n\nbuy milk, please"},
        {"role": "assistant", "content": "Added milk.\n\nAnything else?"},
        {"role": "user", "content": "and eggs"},
    ]


@pytest.fixture(scope="module")
def prompted():
    """Backends with and without a system prompt (building one per example would cost most of the test)."""
    built = {system: OpenAICompatibleAssistant(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=1,
                                               system_prompt="sys" if system else None) for system in (True, False)}
    yield built
    for assistant in built.values():
        assistant.close()


@settings(max_examples=200, deadline=None)
@given(window=st.lists(st.tuples(st.sampled_from(["user", "assistant"]), st.text(min_size=1, max_size=5)),
                       max_size=12),
       last=st.text(min_size=1, max_size=5), system=st.booleans())
def test_every_window_alternates_and_keeps_every_user_text(prompted, window, last, system):
    """Whatever the stored history: after the system prompt the roles alternate, the first
    and last are the user's, and every user message's text is there, in order."""
    history = [HistoryMessage(role, content) for role, content in window] + [HistoryMessage("user", last)]
    messages = prompted[system].messages(history)

    render_strict_chat_template(messages)  # raises where a strict template would
    if system:
        assert messages.pop(0) == {"role": "system", "content": "sys"}
    roles = [message["role"] for message in messages]
    assert roles[0] == "user" and roles[-1] == "user"
    assert all(first != second for first, second in zip(roles, roles[1:]))
    first_user = next(index for index, (role, _) in enumerate(window + [("user", last)]) if role == "user")
    sent_user_text = "\n\n".join(message["content"] for message in messages if message["role"] == "user")
    expected = [content for role, content in (window + [("user", last)])[first_user:] if role == "user"]
    assert sent_user_text == "\n\n".join(expected)


def test_the_watchdog_shuts_a_guarded_socket_at_its_deadline_and_no_other():
    watchdog = Watchdog()
    reading, writing = socket.socketpair()
    spared, spared_peer = socket.socketpair()
    with reading, writing, spared, spared_peer:
        with watchdog.guard(time.monotonic() + 0.1, spared):
            pass  # left before its deadline: never shut
        started = time.monotonic()
        with watchdog.guard(time.monotonic() + 0.3, reading):
            assert reading.recv(10) == b""  # blocked until the watchdog shut it
        assert 0.25 <= time.monotonic() - started < 1.0
        time.sleep(0.1)
        spared_peer.sendall(b"ok")
        assert spared.recv(10) == b"ok"


# A hostile model server (issue 24): redirects, answers too large, absurd numbers, deep nesting.

@pytest.fixture
def elsewhere():
    """Another server on loopback, standing for an internal service a redirect points at."""
    with FakeChatCompletions(default=text("SECRET FROM INTERNAL SERVICE")) as server:
        yield server


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("mode", ["blocking", "streamed"])
def test_a_redirect_is_an_error_and_its_target_is_never_contacted(llm, make_assistant, elsewhere, code, mode):
    llm.script(redirect(code, f"{elsewhere.base_url}/chat/completions"))
    assistant = make_assistant()

    with pytest.raises(AssistantError) as failure:
        assistant.reply(WINDOW, turn=2) if mode == "blocking" else list(assistant.stream(WINDOW, turn=2))

    assert not isinstance(failure.value, AssistantTimeout)
    assert str(failure.value) == f"the assistant backend answered HTTP {code}"
    assert elsewhere.requests == [] and len(llm.requests) == 1


def test_a_blocking_answer_over_8_mib_is_refused(llm, make_assistant):
    llm.script(text("x" * MAX_ANSWER_BYTES), text("y" * (MAX_ANSWER_BYTES - 1000)))
    assistant = make_assistant(ASSISTANT_TIMEOUT_S="30")

    with pytest.raises(AssistantError, match="too large"):
        assistant.reply(WINDOW, turn=2)
    assert len(assistant.reply(WINDOW, turn=2).text) == MAX_ANSWER_BYTES - 1000  # just under: read whole


def test_a_stream_over_8_mib_is_cut_as_soon_as_it_passes_the_cap(llm, make_assistant):
    """A 64 MiB stream: the error comes once 8 MiB have arrived, and the connection is
    closed then, so the server manages to send little more than the cap (plus what the
    sockets' buffers hold) and no more of it is read."""
    llm.script(flood(64 * 1024 * 1024))
    assistant = make_assistant(ASSISTANT_TIMEOUT_S="60")

    received = 0
    with pytest.raises(AssistantError, match="too large"):
        for item in assistant.stream(WINDOW, turn=2):
            received += len(item)
    assert received <= MAX_ANSWER_BYTES
    deadline = time.monotonic() + 10
    while not llm.streamed_bytes:
        assert time.monotonic() < deadline, "the server is still sending"
        time.sleep(0.05)
    assert llm.streamed_bytes[0] < MAX_ANSWER_BYTES + 16 * 1024 * 1024, llm.streamed_bytes


def test_a_stream_just_under_the_cap_is_read_whole(llm, make_assistant):
    llm.script(flood(MAX_ANSWER_BYTES - 256 * 1024))

    items = list(make_assistant(ASSISTANT_TIMEOUT_S="30").stream(WINDOW, turn=2))

    assert len(items[-1].text) > MAX_ANSWER_BYTES - 1024 * 1024


ABSURD_COUNTS = {"10**400": 10**400, "10**42": 10**42, "2**63": 2**63, "negative": -1, "fraction": 1.5,
                 "infinity": float("inf"), "string": "7", "boolean": True, "null": None}


@pytest.mark.parametrize("count", ABSURD_COUNTS.values(), ids=ABSURD_COUNTS.keys())
@pytest.mark.parametrize("mode", ["blocking", "streamed"])
def test_usage_beyond_a_bigint_or_not_a_count_is_dropped(llm, make_assistant, mode, count):
    usage = {"prompt_tokens": 3, "completion_tokens": count, "total_tokens": 7}
    llm.script(text("counted", usage=usage) if mode == "blocking" else streamed(["counted"], usage=usage))
    assistant = make_assistant()

    reply = assistant.reply(WINDOW, turn=2) if mode == "blocking" else list(assistant.stream(WINDOW, turn=2))[-1]

    assert reply.text == "counted" and reply.usage is None


def test_usage_up_to_the_largest_bigint_is_kept(llm, make_assistant):
    usage = {"prompt_tokens": 0, "completion_tokens": 2**63 - 1, "total_tokens": 2**63 - 1}
    llm.script(text("counted", usage=usage))

    assert make_assistant().reply(WINDOW, turn=2).usage == usage


def nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [MAX_ARGUMENT_DEPTH + 1, 500, 5000, 200_000])
@pytest.mark.parametrize("mode", ["blocking", "streamed"])
def test_tool_call_arguments_nested_too_deeply_are_an_assistant_error(llm, make_assistant, mode, depth):
    call = {"id": "c", "name": "add_task", "arguments": nested(depth)}
    llm.script(tool_calls([call]) if mode == "blocking" else streamed([], calls=[call]))
    assistant = make_assistant()

    with pytest.raises(AssistantError, match="nested too deeply"):
        assistant.reply(WINDOW, turn=2) if mode == "blocking" else list(assistant.stream(WINDOW, turn=2))


def test_tool_call_arguments_nested_up_to_the_limit_are_kept(llm, make_assistant):
    llm.script(tool_calls([{"id": "c", "name": "add_task", "arguments": nested(MAX_ARGUMENT_DEPTH)}]))

    arguments = make_assistant().reply(WINDOW, turn=2).tool_calls[0]["arguments"]

    assert json.dumps(arguments) == nested(MAX_ARGUMENT_DEPTH)


@pytest.mark.parametrize("mode", ["blocking", "streamed"])
def test_a_body_nested_too_deeply_is_a_malformed_answer(llm, make_assistant, mode):
    """Nesting in a field nobody reads still makes the JSON parser recurse."""
    deep = b"[" * 100_000 + b"]" * 100_000
    if mode == "blocking":
        llm.script(malformed(b'{"choices": [], "x": ' + deep + b"}"))
    else:
        llm.script(Answer(events=[b'data: {"choices": [], "x": ' + deep + b"}\n\n", b"data: [DONE]\n\n"]))
    assistant = make_assistant()

    with pytest.raises(AssistantError, match="malformed"):
        assistant.reply(WINDOW, turn=2) if mode == "blocking" else list(assistant.stream(WINDOW, turn=2))


def test_more_tool_calls_than_a_reply_may_hold_are_an_assistant_error(llm, make_assistant):
    """Each new tool-call index costs memory however few bytes it took: their number is bounded."""
    calls = [{"id": f"c{n}", "name": "t", "arguments": "{}"} for n in range(MAX_TOOL_CALLS + 1)]
    llm.script(tool_calls(calls), streamed([], calls=calls), tool_calls(calls[:-1]))
    assistant = make_assistant()

    with pytest.raises(AssistantError, match="too many tool calls"):
        assistant.reply(WINDOW, turn=2)
    with pytest.raises(AssistantError, match="too many tool calls"):
        list(assistant.stream(WINDOW, turn=2))
    assert len(assistant.reply(WINDOW, turn=2).tool_calls) == MAX_TOOL_CALLS


@pytest.mark.parametrize("code", [500, 302])
def test_an_error_status_whose_body_trickles_is_cut_off_at_the_timeout(llm, make_assistant, code):
    """The client reads an error status's body itself, whole and with no deadline: a body
    trickled for 10 s held the call 10 s past ASSISTANT_TIMEOUT_S=1."""
    answer = Answer(status=code, body=b"x" * 300, headers={"Location": "http://127.0.0.1:9/"})
    llm.script(trickled(answer, piece_bytes=10, interval_s=0.3))
    assistant = make_assistant(ASSISTANT_TIMEOUT_S="1")

    started = time.monotonic()
    with pytest.raises(AssistantTimeout):
        assistant.reply(WINDOW, turn=2)

    assert time.monotonic() - started < 1.6


@pytest.mark.parametrize("mode", ["blocking", "streamed"])
def test_only_the_head_of_an_error_body_is_read(llm, make_assistant, mode):
    """A 500 whose body never ends: its status is known at once, and what follows is not
    waited for (the client would read until a read timed out, or forever). Its code is
    past the head read, in JSON cut short: the message names the status only."""
    body = json.dumps({"error": {"message": "x" * (8 * 1024 * 1024), "code": "overloaded"}}).encode()
    llm.script(trickled(Answer(status=500, body=body), piece_bytes=64 * 1024, interval_s=0, stall_after=4))
    assistant = make_assistant(ASSISTANT_TIMEOUT_S="5")

    started = time.monotonic()
    with pytest.raises(AssistantError) as failure:
        assistant.reply(WINDOW, turn=2) if mode == "blocking" else list(assistant.stream(WINDOW, turn=2))

    assert time.monotonic() - started < 2
    assert str(failure.value) == "the assistant backend answered HTTP 500"
