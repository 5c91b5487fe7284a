"""Streaming chat turns (AI SDK UI message stream v1) through real gunicorn,
with gunicorn.conf.py's runtime, over real HTTP, on the real database."""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests
from fake_llm import FakeChatCompletions, flood, redirect, stalled, status, streamed, text, trickled
from support import StreamEvents, connect, gunicorn, make_user

EVENT_ORDER_HEAD = ["start", "start-step", "text-start"]
EVENT_ORDER_TAIL = ["text-end", "finish-step", "finish"]


@pytest.fixture(scope="module")
def builtin_server(app_url):
    with gunicorn(app_url, workers=1, CHAT_STREAM_KEEPALIVE_S=1) as server:
        yield server


@pytest.fixture(scope="module")
def openai_server(app_url, llm):
    with gunicorn(app_url, workers=1, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url,
                  ASSISTANT_MODEL="fake-model", ASSISTANT_TIMEOUT_S=10, CHAT_STREAM_KEEPALIVE_S=1) as server:
        yield server


@pytest.fixture
def fresh_llm(llm):
    llm.reset()
    return llm


class Stream(StreamEvents):
    """The events of one streamed answer, each with the time it arrived."""

    def __init__(self, response: requests.Response, started: float):
        self.response = response
        self.started = started
        self.events: list[dict] = []
        self.arrivals: list[float] = []
        self.comments = 0
        self.done = False

    def read(self, chunk_size: int = 1, within_s: float | None = None) -> Stream:
        """Every event, read `chunk_size` bytes at a time (1: each event's arrival is timed);
        `within_s`: fail once the stream has run that long."""
        self.response.encoding = "utf-8"  # what the protocol says; requests guesses ISO-8859-1 for text/*
        for line in self.response.iter_lines(chunk_size=chunk_size, decode_unicode=True):
            assert within_s is None or time.monotonic() - self.started < within_s, "the stream is still going"
            if line.startswith(":"):
                self.comments += 1
            elif line == "data: [DONE]":
                self.done = True
            elif line.startswith("data: "):
                self.events.append(json.loads(line.removeprefix("data: ")))
                self.arrivals.append(time.monotonic() - self.started)
            else:
                assert line == "", f"not SSE framing: {line!r}"
        return self


    def of(self, kind: str) -> dict:
        return next(event for event in self.events if event["type"] == kind)


def post_stream(server, user, message="hello", *, conversation_id=None, key=None, body=None, headers=None,
                timeout=30) -> Stream:
    payload = body if body is not None else {"message": message, "stream": True,
                                             **({"conversation_id": conversation_id} if conversation_id else {})}
    sent = {**user.headers, **({"Idempotency-Key": key} if key else {}), **(headers or {})}
    started = time.monotonic()
    response = requests.post(f"{server.url}/api/{user.id}/chat", json=payload, headers=sent, stream=True,
                             timeout=timeout)
    return Stream(response, started)


def stored(app_url, user_id, conversation_id):
    with connect(app_url, user_id) as conn:
        return conn.execute("select id, role, content, tool_calls, reply_to, model, finish_reason, usage"
                            " from message where conversation_id = %s order by id", (conversation_id,)).fetchall()


def assert_well_formed(stream: Stream) -> None:
    assert stream.types[:3] == EVENT_ORDER_HEAD, stream.types
    tail = [kind for kind in stream.types[3:] if kind not in ("text-delta", "tool-input-available")]
    assert tail == EVENT_ORDER_TAIL, stream.types
    deltas = [i for i, kind in enumerate(stream.types) if kind == "text-delta"]
    assert deltas and deltas == list(range(3, 3 + len(deltas))), stream.types
    assert stream.done


def test_event_order_headers_and_the_stored_reply(builtin_server, app_url):
    user = make_user()
    stream = post_stream(builtin_server, user, "stream me a reply please")
    assert stream.response.status_code == 200
    headers = stream.response.headers
    assert headers["Content-Type"] == "text/event-stream"
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    assert headers["x-vercel-ai-ui-message-stream"] == "v1"
    stream.read()
    assert_well_formed(stream)
    start, finish = stream.of("start"), stream.of("finish")
    conversation_id = start["messageMetadata"]["conversation_id"]
    rows = stored(app_url, user.id, conversation_id)
    assert [row[1] for row in rows] == ["user", "assistant"]
    assert stream.types.count("text-delta") > 3  # word by word
    assert stream.text() == rows[1][2]
    assert start["messageMetadata"] == {"conversation_id": conversation_id, "user_message_id": rows[0][0]}
    assert finish["finishReason"] == "stop"
    assert finish["messageMetadata"] == {"conversation_id": conversation_id, "user_message_id": rows[0][0],
                                         "assistant_message_id": rows[1][0], "model": "builtin", "usage": None}
    assert len({event.get("id") for event in stream.events if event["type"].startswith("text-")}) == 1
    again = post_stream(builtin_server, user, "second", conversation_id=conversation_id).read()
    assert again.of("start")["messageId"] != start["messageId"]
    assert "turn 2" in again.text()


def test_accept_header_asks_for_a_stream_and_json_stays_json(builtin_server):
    user = make_user()
    streamed_answer = post_stream(builtin_server, user, body={"message": "by accept"},
                                  headers={"Accept": "text/event-stream"}).read()
    assert streamed_answer.response.headers["Content-Type"] == "text/event-stream"
    assert_well_formed(streamed_answer)
    for body, headers in (({"message": "plain"}, {}), ({"message": "plain", "stream": False}, {"Accept": "*/*"})):
        answer = requests.post(f"{builtin_server.url}/api/{user.id}/chat", json=body,
                               headers={**user.headers, **headers}, timeout=30)
        assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
        assert set(answer.json()) >= {"model", "finish_reason", "usage"}


@pytest.mark.parametrize("case", ["unauthenticated", "unknown conversation", "bad body", "string stream",
                                  "not json"])
def test_refusals_before_the_stream_are_json_with_their_status(builtin_server, case):
    user = make_user()
    url = f"{builtin_server.url}/api/{user.id}/chat"
    expected, kwargs = {
        "unauthenticated": (401, {"json": {"message": "x", "stream": True}}),
        "unknown conversation": (404, {"json": {"message": "x", "stream": True,
                                                "conversation_id": "00000000-0000-4000-8000-000000000000"},
                                       "headers": user.headers}),
        "bad body": (422, {"json": {"message": "", "stream": True}, "headers": user.headers}),
        "string stream": (422, {"json": {"message": "x", "stream": "true"}, "headers": user.headers}),
        "not json": (400, {"data": b"{", "headers": {**user.headers, "Content-Type": "application/json"}}),
    }[case]
    answer = requests.post(url, timeout=30, **{"headers": {"Accept": "text/event-stream"}, **kwargs})
    assert answer.status_code == expected
    assert answer.headers["Content-Type"] == "application/json" and "error" in answer.json()


def test_in_flight_key_is_409_json_while_its_stream_runs(openai_server, fresh_llm):
    fresh_llm.script(streamed(["slow ", "answer"], interval_s=1.5))
    user = make_user()
    first = post_stream(openai_server, user, "keyed", key="stream-key")
    assert first.response.status_code == 200
    second = requests.post(f"{openai_server.url}/api/{user.id}/chat", json={"message": "keyed", "stream": True},
                           headers={**user.headers, "Idempotency-Key": "stream-key"}, timeout=30)
    assert second.status_code == 409 and second.json()["error"]["code"] == "idempotency_key_in_flight"
    assert first.read().text() == "slow answer"


def test_deltas_arrive_as_the_upstream_produces_them(openai_server, fresh_llm, app_url):
    pieces = [f"piece{n} " for n in range(6)]
    fresh_llm.script(streamed(pieces, interval_s=0.4))
    user = make_user()
    stream = post_stream(openai_server, user, "tell me slowly").read()
    assert_well_formed(stream)
    first_delta = stream.arrivals[stream.types.index("text-delta")]
    finish = stream.arrivals[stream.types.index("finish")]
    # The upstream's last piece goes out about 2.4 s after its first.
    assert finish - first_delta > 1.5, (first_delta, finish)
    assert stream.text() == "".join(pieces)
    body = fresh_llm.requests[-1].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    finish_event = stream.of("finish")
    assert finish_event["messageMetadata"]["model"] == "fake-model"
    assert finish_event["messageMetadata"]["usage"] == {"prompt_tokens": 7, "completion_tokens": 6,
                                                        "total_tokens": 13}
    row = stored(app_url, user.id, stream.of("start")["messageMetadata"]["conversation_id"])[1]
    assert row[2] == stream.text() and row[5:] == ("fake-model", "stop", finish_event["messageMetadata"]["usage"])


def test_keep_alives_while_the_assistant_says_nothing(openai_server, fresh_llm):
    fresh_llm.script(streamed(["late"], interval_s=2.5))
    stream = post_stream(openai_server, make_user(), "wait for it").read()
    assert stream.comments >= 1 and stream.text() == "late"


def test_tool_calls_are_assembled_from_their_deltas(openai_server, fresh_llm, app_url):
    calls = [{"id": "call_1", "name": "add_task", "arguments": {"title": "milk", "tags": ["home"]}},
             {"id": "call_2", "name": "list_tasks", "arguments": {}}]
    fresh_llm.script(streamed(["Adding it."], finish_reason="tool_calls", calls=calls))
    user = make_user()
    stream = post_stream(openai_server, user, "add milk").read()
    assert_well_formed(stream)
    tools = [event for event in stream.events if event["type"] == "tool-input-available"]
    assert tools == [{"type": "tool-input-available", "toolCallId": call["id"], "toolName": call["name"],
                      "input": call["arguments"]} for call in calls]
    assert stream.types.index("tool-input-available") > stream.types.index("text-end")
    assert stream.of("finish")["finishReason"] == "tool-calls"
    row = stored(app_url, user.id, stream.of("start")["messageMetadata"]["conversation_id"])[1]
    assert row[3] == calls and row[6] == "tool_calls"


def test_a_reply_cut_off_at_length_says_so(openai_server, fresh_llm, app_url):
    fresh_llm.script(streamed(["cut ", "off"], finish_reason="length"), text("cut", finish_reason="length"))
    user = make_user()
    stream = post_stream(openai_server, user, "long story").read()
    assert stream.of("finish")["finishReason"] == "length"
    blocking = requests.post(f"{openai_server.url}/api/{user.id}/chat", json={"message": "long story"},
                             headers=user.headers, timeout=30).json()
    assert blocking["finish_reason"] == "length"
    messages = requests.get(f"{openai_server.url}/api/{user.id}/conversations/{blocking['conversation_id']}/messages",
                            headers=user.headers, timeout=30).json()["data"]
    assert [(m["role"], m["finish_reason"], m["model"]) for m in messages] == [
        ("user", None, None), ("assistant", "length", "fake-model")]


def test_upstream_dying_mid_stream_is_an_error_event_and_a_retry_completes_it(openai_server, fresh_llm, app_url):
    fresh_llm.script(streamed(["half ", "a ", "reply"], cut_after=3), streamed(["whole reply"]))
    user = make_user()
    failed = post_stream(openai_server, user, "fragile", key="dies").read()
    assert failed.types[:3] == EVENT_ORDER_HEAD and failed.types[-1] == "error" and failed.done
    assert "finish" not in failed.types and failed.of("error")["errorText"]
    conversation_id = failed.of("start")["messageMetadata"]["conversation_id"]
    assert [row[1] for row in stored(app_url, user.id, conversation_id)] == ["user"]
    retried = post_stream(openai_server, user, "fragile", key="dies").read()
    assert_well_formed(retried)
    assert retried.text() == "whole reply"
    rows = stored(app_url, user.id, conversation_id)
    assert [row[1] for row in rows] == ["user", "assistant"] and rows[1][4] == rows[0][0]
    assert retried.of("start")["messageMetadata"]["user_message_id"] == rows[0][0]


@pytest.fixture(scope="module")
def hasty_server(app_url, llm):
    """ASSISTANT_TIMEOUT_S=1, on gunicorn.conf.py's runtime (gevent by default)."""
    with gunicorn(app_url, workers=1, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url,
                  ASSISTANT_MODEL="fake-model", ASSISTANT_TIMEOUT_S=1) as server:
        yield server


def test_an_upstream_that_stalls_ends_the_stream_at_the_timeout(hasty_server, fresh_llm):
    """Two deltas, then silence: the error comes at ASSISTANT_TIMEOUT_S from the start, not a
    whole read timeout after the last byte (which would be about 1.6 s)."""
    fresh_llm.script(stalled(streamed(["slow ", "start"], interval_s=0.3), after=3))
    stream = post_stream(hasty_server, make_user(), "and then?").read()
    assert stream.types == [*EVENT_ORDER_HEAD, "text-delta", "text-delta", "error"], stream.types
    assert "in time" in stream.of("error")["errorText"] and stream.done
    assert stream.arrivals[-1] < 1.45, stream.arrivals


def test_a_blocking_answer_that_stalls_is_a_504_at_the_timeout(hasty_server, fresh_llm):
    """A piece at once, one at 0.6 s, then silence: 504 at 1 s (a read timeout would say 1.6 s)."""
    fresh_llm.script(trickled(text("never finished"), piece_bytes=20, interval_s=0.6, stall_after=2))
    user = make_user()
    started = time.monotonic()
    answer = requests.post(f"{hasty_server.url}/api/{user.id}/chat", json={"message": "and then?"},
                           headers=user.headers, timeout=30)
    elapsed = time.monotonic() - started
    assert answer.status_code == 504 and answer.json()["error"]["code"] == "assistant_timeout"
    assert elapsed < 1.45, elapsed


def test_upstream_refusing_is_an_error_event(openai_server, fresh_llm):
    fresh_llm.script(status(500))
    stream = post_stream(openai_server, make_user(), "refused").read()
    assert stream.types == [*EVENT_ORDER_HEAD, "error"] and "500" in stream.of("error")["errorText"]


def test_a_client_that_goes_away_still_gets_its_reply_stored(openai_server, fresh_llm, app_url):
    fresh_llm.script(streamed([f"w{n} " for n in range(5)], interval_s=0.3))
    user = make_user()
    stream = post_stream(openai_server, user, "I will hang up")
    lines = stream.response.iter_lines(decode_unicode=True)
    start = json.loads(next(line for line in lines if line.startswith("data: ")).removeprefix("data: "))
    assert start["type"] == "start"
    stream.response.close()
    conversation_id = start["messageMetadata"]["conversation_id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        rows = stored(app_url, user.id, conversation_id)
        if rows[1][2] == "w0 w1 w2 w3 w4 ":
            break
        time.sleep(0.1)
    assert [row[1] for row in rows] == ["user", "assistant"] and rows[1][2] == "w0 w1 w2 w3 w4 "


def test_idempotent_replay_as_a_stream_and_as_json(builtin_server, app_url):
    user = make_user()
    first = post_stream(builtin_server, user, "replay me", key="replayed").read()
    conversation_id = first.of("start")["messageMetadata"]["conversation_id"]
    replayed = post_stream(builtin_server, user, "replay me", key="replayed").read()
    assert_well_formed(replayed)
    assert replayed.types.count("text-delta") == 1 and replayed.text() == first.text()
    assert replayed.of("finish")["messageMetadata"] == first.of("finish")["messageMetadata"]
    as_json = requests.post(f"{builtin_server.url}/api/{user.id}/chat", json={"message": "replay me"},
                            headers={**user.headers, "Idempotency-Key": "replayed"}, timeout=30).json()
    assert as_json["response"] == first.text() and as_json["model"] == "builtin"
    assert as_json["assistant_message_id"] == first.of("finish")["messageMetadata"]["assistant_message_id"]
    assert len(stored(app_url, user.id, conversation_id)) == 2


def test_two_hundred_streams_in_flight_on_one_instance_all_finish(app_url, llm):
    llm.reset()
    llm.default = streamed(["one ", "two ", "three"], interval_s=0.5)
    try:
        with gunicorn(app_url, workers=1, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url,
                      ASSISTANT_MODEL="fake-model", ASSISTANT_TIMEOUT_S=60, DATABASE_POOL_TIMEOUT_S=60) as server:
            users = [make_user() for _ in range(20)]

            def one(n):
                return post_stream(server, users[n % 20], f"crowd {n}", timeout=120).read()

            with ThreadPoolExecutor(max_workers=200) as pool:
                streams = list(pool.map(one, range(200)))
    finally:
        from fake_llm import echo

        llm.default = echo()
    assert all(stream.response.status_code == 200 for stream in streams)
    assert all(stream.types[-1] == "finish" and stream.text() == "one two three" for stream in streams)
    ids = {stream.of("finish")["messageMetadata"]["assistant_message_id"] for stream in streams}
    assert len(ids) == 200


def test_trickling_clients_leave_healthz_fast(app_url):
    with gunicorn(app_url, workers=1) as server:
        host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
        user = make_user()
        head = (f"POST /api/{user.id}/chat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {user.token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n").encode()
        sockets, stop = [], threading.Event()
        try:
            for _ in range(300):
                conn = socket.create_connection((host, port), timeout=10)
                conn.sendall(head + b"{")
                sockets.append(conn)

            def trickle():
                while not stop.wait(0.2):
                    for conn in sockets:
                        try:
                            conn.send(b" ")
                        except OSError:
                            pass

            trickler = threading.Thread(target=trickle, daemon=True)
            trickler.start()
            time.sleep(1)
            timings = []
            for _ in range(20):
                started = time.monotonic()
                assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
                timings.append(time.monotonic() - started)
            other = make_user()
            started = time.monotonic()
            assert requests.post(f"{server.url}/api/{other.id}/chat", json={"message": "am I served?"},
                                 headers=other.headers, timeout=10).status_code == 200
            chat_s = time.monotonic() - started
        finally:
            stop.set()
            for conn in sockets:
                conn.close()
    # Generous bounds for a shared machine; a starved server takes the full 10 s timeouts.
    assert max(timings) < 2.0, timings
    assert chat_s < 3.0


def test_sigterm_lets_streams_in_flight_finish(app_url, llm):
    llm.reset()
    llm.script(*[streamed([f"part{n} " for n in range(6)], interval_s=0.4) for _ in range(3)])
    with gunicorn(app_url, workers=1, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url,
                  ASSISTANT_MODEL="fake-model") as server:
        users = [make_user() for _ in range(3)]
        streams = [post_stream(server, user, "finish me") for user in users]
        for stream in streams:
            assert stream.response.status_code == 200
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        results = [stream.read() for stream in streams]
        server.process.wait(timeout=30)
    assert all(result.types[-1] == "finish" for result in results), [result.types for result in results]
    for user, result in zip(users, results):
        rows = stored(app_url, user.id, result.of("start")["messageMetadata"]["conversation_id"])
        assert [row[1] for row in rows] == ["user", "assistant"] and rows[1][2] == result.text()


# A hostile model server (issue 24): what it sends can neither cut the stream nor poison what is stored.

HOSTILE_PIECES = ["nul \x00 ", "lone \ud800 and \udfff ", "a pair split \ud83d", "\ude00 across chunks", " \U0001f600"]
HOSTILE_TEXT = "nul \ufffd lone \ufffd and \ufffd a pair split \ufffd\ufffd across chunks \U0001f600"
HOSTILE_CALLS = [{"id": "call\x00\ud800", "name": "add\udfff", "arguments": {"title": "milk\x00", "\ud800": ["\udfff"]}}]
STORED_CALLS = [{"id": "call\ufffd\ufffd", "name": "add\ufffd", "arguments": {"title": "milk\ufffd", "\ufffd": ["\ufffd"]}}]


def test_nul_and_lone_surrogates_are_streamed_exactly_as_they_are_stored(openai_server, fresh_llm, app_url):
    fresh_llm.script(streamed(HOSTILE_PIECES, calls=HOSTILE_CALLS, finish_reason="tool_calls",
                              model="model\x00\ud800"))
    user = make_user()
    stream = post_stream(openai_server, user, "say something odd").read()
    assert_well_formed(stream)
    row = stored(app_url, user.id, stream.of("start")["messageMetadata"]["conversation_id"])[1]
    assert stream.text() == row[2] == HOSTILE_TEXT
    tools = [event for event in stream.events if event["type"] == "tool-input-available"]
    assert [(tool["toolCallId"], tool["toolName"], tool["input"]) for tool in tools] == [
        (call["id"], call["name"], call["arguments"]) for call in STORED_CALLS]
    assert row[3] == STORED_CALLS
    assert stream.of("finish")["messageMetadata"]["model"] == row[5] == "model\ufffd\ufffd"


@pytest.mark.parametrize("count", [10**400, 10**42], ids=["10**400", "10**42"])
def test_usage_beyond_a_bigint_is_dropped_not_stored_nor_counted(openai_server, fresh_llm, app_url, count):
    fresh_llm.script(streamed(["counted"], usage={"prompt_tokens": count, "completion_tokens": 1,
                                                  "total_tokens": count}, model="absurd-model"))
    user = make_user()
    stream = post_stream(openai_server, user, "count this").read()
    assert_well_formed(stream)
    assert stream.of("finish")["messageMetadata"]["usage"] is None
    assert stored(app_url, user.id, stream.of("start")["messageMetadata"]["conversation_id"])[1][7] is None
    metrics = requests.get(f"{openai_server.url}/metrics", timeout=10).text
    assert 'model="absurd-model"' not in metrics


def test_a_stream_over_8_mib_is_an_error_event_nothing_is_kept_and_memory_stays_bounded(app_url, llm):
    """A 64 MiB stream: cut at 8 MiB with a 502 `error` then `[DONE]`; the worker's peak
    memory grows by far less than the stream (before the cap: about ten times it)."""
    llm.reset()
    llm.script(streamed(["warm"]), flood(64 * 1024 * 1024), streamed(["a short one"]))
    with gunicorn(app_url, workers=1, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url,
                  ASSISTANT_MODEL="fake-model", ASSISTANT_TIMEOUT_S=60) as server:
        (worker,) = server.worker_pids()
        user = make_user()
        post_stream(server, user, "warm up").read()  # the first turn's imports and allocations
        peak_before = peak_rss_bytes(worker)
        failed = post_stream(server, user, "flood me", key="flood").read(chunk_size=65536, within_s=60)
        grown = peak_rss_bytes(worker) - peak_before
        assert failed.types[:3] == EVENT_ORDER_HEAD and failed.types[-1] == "error" and failed.done, failed.types[-3:]
        assert "too large" in failed.of("error")["errorText"] and "finish" not in failed.types
        assert len(failed.text()) <= 8 * 1024 * 1024
        conversation_id = failed.of("start")["messageMetadata"]["conversation_id"]
        assert [row[1] for row in stored(app_url, user.id, conversation_id)] == ["user"]
        assert grown < 150 * 1024 * 1024, grown
        retried = post_stream(server, user, "flood me", key="flood").read()
        assert_well_formed(retried)
        assert [row[1] for row in stored(app_url, user.id, conversation_id)] == ["user", "assistant"]


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status_file:
        line = next(line for line in status_file if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


@pytest.mark.parametrize("code", [302, 307])
def test_a_redirect_is_an_error_event_and_its_target_is_never_contacted(openai_server, fresh_llm, code):
    with FakeChatCompletions(default=text("SECRET FROM INTERNAL SERVICE")) as elsewhere:
        fresh_llm.script(redirect(code, f"{elsewhere.base_url}/chat/completions"))
        stream = post_stream(openai_server, make_user(), "where to?").read()
    assert stream.types == [*EVENT_ORDER_HEAD, "error"] and stream.done
    assert f"HTTP {code}" in stream.of("error")["errorText"]
    assert elsewhere.requests == []


def test_tool_call_arguments_nested_too_deeply_are_an_error_event(openai_server, fresh_llm, app_url):
    deep = '{"a": ' * 500 + "1" + "}" * 500
    fresh_llm.script(streamed(["calling"], calls=[{"id": "c", "name": "t", "arguments": deep}]))
    user = make_user()
    stream = post_stream(openai_server, user, "nest").read()
    assert stream.types == [*EVENT_ORDER_HEAD, "text-delta", "error"] and stream.done
    assert "nested too deeply" in stream.of("error")["errorText"]
    assert [row[1] for row in stored(app_url, user.id, stream.of("start")["messageMetadata"]["conversation_id"])] \
        == ["user"]
