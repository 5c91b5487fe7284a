"""A turn's lifecycle (CONTRACT.md section 4): a reply stored while it is
produced, stopped and resumed from any instance, and a producer that dies.

Two gunicorn instances share the database: what one produces, the other stops
and follows, with no call between them."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fake_llm import echo, slow, streamed, text
from support import StreamEvents, connect, gunicorn, make_user

FLUSH_S = 0.5
PIECES = [f"piece{n} " for n in range(12)]


@pytest.fixture(scope="module")
def instances(app_url, llm):
    """Two instances with the OpenAI-compatible backend on the tests' own upstream."""
    env = dict(ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url, ASSISTANT_MODEL="fake-model",
               ASSISTANT_TIMEOUT_S=20, CHAT_STREAM_FLUSH_S=FLUSH_S, CHAT_STREAM_KEEPALIVE_S=1)
    with gunicorn(app_url, **env) as first, gunicorn(app_url, **env) as second:
        yield first, second


@pytest.fixture
def upstream(llm):
    llm.reset()
    llm.hangups.clear()
    yield llm
    llm.default = echo()


class Events(StreamEvents):
    """An SSE answer read as it arrives, on a thread of its own."""

    def __init__(self, response: requests.Response):
        self.response = response
        self.events: list[dict] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines(chunk_size=1, decode_unicode=True):
                if line.startswith("data: ") and line != "data: [DONE]":
                    self.events.append(json.loads(line.removeprefix("data: ")))
                elif line == "data: [DONE]":
                    self.events.append({"type": "[DONE]"})
        except requests.RequestException:
            self.events.append({"type": "(connection lost)"})
        finally:
            self.done.set()

    def wait_for(self, kind: str, timeout_s: float = 20) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [event for event in self.events if event["type"] == kind]
            if found:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no {kind} event in {self.types}")

    def wait_for_text(self, text: str, timeout_s: float = 20) -> None:
        """Until the deltas so far are as long as `text`."""
        deadline = time.monotonic() + timeout_s
        while len(self.text()) < len(text):
            assert time.monotonic() < deadline, f"the text stayed {self.text()!r}"
            time.sleep(0.02)

    def finished(self, timeout_s: float = 20) -> Events:
        assert self.done.wait(timeout_s), f"the stream did not end: {self.types}"
        return self



def post_stream(server, user, message, conversation_id=None, key=None) -> Events:
    body = {"message": message, "stream": True, **({"conversation_id": conversation_id} if conversation_id else {})}
    headers = {**user.headers, **({"Idempotency-Key": key} if key else {})}
    response = requests.post(f"{server.url}/api/{user.id}/chat", json=body, headers=headers, stream=True, timeout=60)
    assert response.status_code == 200, response.text
    return Events(response)


def resume(server, user, conversation_id) -> requests.Response:
    return requests.get(f"{server.url}/api/{user.id}/chat/{conversation_id}/stream", headers=user.headers,
                        stream=True, timeout=60)


def stop(server, user, conversation_id) -> requests.Response:
    return requests.post(f"{server.url}/api/{user.id}/conversations/{conversation_id}/stop", headers=user.headers,
                         timeout=30)


def messages(server, user, conversation_id) -> list[dict]:
    answer = requests.get(f"{server.url}/api/{user.id}/conversations/{conversation_id}/messages",
                          headers=user.headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def started(events: Events) -> str:
    return events.wait_for("start")["messageMetadata"]["conversation_id"]


def test_a_reply_is_stored_while_it_is_produced(instances, upstream):
    """The reply is a `streaming` message from the start; the other instance reads
    its text so far, never more than CHAT_STREAM_FLUSH_S (and a read) behind."""
    first, second = instances
    upstream.script(streamed(PIECES, interval_s=0.25))
    user = make_user()
    stream = post_stream(first, user, "tell me slowly")
    conversation_id = started(stream)
    lags = []
    while not stream.done.is_set():
        reply = messages(second, user, conversation_id)[-1]
        seen_at, sent = time.monotonic(), stream.text()
        if reply["status"] != "streaming":
            break
        assert reply["role"] == "assistant" and sent.startswith(reply["content"])
        lags.append(len(sent) - len(reply["content"]))
        time.sleep(0.1)
    stream.finished()
    assert max(lags) <= len("piece0 ") * (FLUSH_S / 0.25 + 2), lags
    assert any(lag < len(stream.text()) for lag in lags)
    final = messages(second, user, conversation_id)
    assert [m["status"] for m in final] == ["complete", "complete"] and final[1]["content"] == "".join(PIECES)
    assert final[1]["ui_id"] == stream.wait_for("start")["messageId"] and final[0]["ui_id"].startswith("msg-")
    assert all(m["superseded_at"] is None for m in final)


def test_stop_on_one_instance_ends_the_stream_on_the_other(instances, upstream):
    first, second = instances
    upstream.script(streamed(PIECES, interval_s=0.3))
    user = make_user()
    stream = post_stream(first, user, "go on and on")
    conversation_id = started(stream)
    stream.wait_for_text("piece0 piece1 ")
    asked = time.monotonic()
    stopped = stop(second, user, conversation_id)
    assert stopped.status_code == 200
    reply_id = stopped.json()["assistant_message_id"]
    assert stopped.json() == {"stopped": True, "assistant_message_id": reply_id} and isinstance(reply_id, int)
    stream.finished(10)
    assert stream.types[-2:] == ["abort", "[DONE]"] and stream.events[-2]["reason"] == "stopped"
    assert "finish" not in stream.types
    assert upstream.hangups and upstream.hangups[0] - asked < 2.0, upstream.hangups
    reply = messages(second, user, conversation_id)[-1]
    assert reply["id"] == reply_id and reply["status"] == "stopped" and reply["finish_reason"] is None
    assert reply["content"] == stream.text() and reply["content"] != "".join(PIECES)
    again = stop(second, user, conversation_id)
    assert again.json() == {"stopped": False, "assistant_message_id": None}


def test_stop_answers_a_blocking_turn_with_what_it_had(instances, upstream):
    first, second = instances
    upstream.script(slow(8, text("never seen")))
    user = make_user()
    with ThreadPoolExecutor(1) as pool:
        opened = requests.post(f"{first.url}/api/{user.id}/chat", json={"message": "open"}, headers=user.headers,
                               timeout=30).json()
        conversation_id = opened["conversation_id"]
        upstream.script(slow(8, text("never seen")))
        pending = pool.submit(requests.post, f"{first.url}/api/{user.id}/chat", timeout=30, headers=user.headers,
                              json={"message": "slow one", "conversation_id": conversation_id})
        deadline = time.monotonic() + 10
        while messages(second, user, conversation_id)[-1]["status"] != "streaming":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        asked = time.monotonic()
        assert stop(second, user, conversation_id).json()["stopped"] is True
        answer = pending.result()
    assert time.monotonic() - asked < 3.0
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "stopped" and answer.json()["response"] == ""
    assert answer.json()["finish_reason"] is None
    assert upstream.hangups


def test_stop_of_nothing_and_of_another_users_conversation(instances):
    first, _ = instances
    alice, bob = make_user("alice"), make_user("bob")
    conversation_id = requests.post(f"{first.url}/api/{alice.id}/chat", json={"message": "hi"},
                                    headers=alice.headers, timeout=30).json()["conversation_id"]
    assert stop(first, alice, conversation_id).json() == {"stopped": False, "assistant_message_id": None}
    refused = stop(first, bob, conversation_id)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "conversation_not_found"
    assert stop(first, alice, "00000000-0000-4000-8000-000000000000").status_code == 404


def test_resume_on_the_other_instance_replays_then_follows(instances, upstream):
    first, second = instances
    upstream.script(streamed(PIECES, interval_s=0.25))
    user = make_user()
    original = post_stream(first, user, "stream me")
    conversation_id = started(original)
    original.wait_for_text("piece0 piece1 piece2 ")
    resumed = resume(second, user, conversation_id)
    assert resumed.status_code == 200 and resumed.headers["Content-Type"].startswith("text/event-stream")
    assert resumed.headers["x-vercel-ai-ui-message-stream"] == "v1"
    follower = Events(resumed).finished()
    original.finished()
    assert follower.wait_for("start") == original.wait_for("start")
    assert follower.types[:3] == ["start", "start-step", "text-start"]
    assert follower.text() == original.text() == "".join(PIECES)
    assert follower.types[-2:] == ["finish", "[DONE]"]
    assert follower.wait_for("finish")["messageMetadata"] == original.wait_for("finish")["messageMetadata"]
    assert resume(second, user, conversation_id).status_code == 204


def test_a_resumed_stream_that_ends_with_a_stop(instances, upstream):
    first, second = instances
    upstream.script(streamed(PIECES, interval_s=0.3))
    user = make_user()
    original = post_stream(first, user, "stop me later")
    conversation_id = started(original)
    follower = Events(resume(second, user, conversation_id))
    follower.wait_for("start")
    time.sleep(1.0)
    assert stop(first, user, conversation_id).json()["stopped"] is True
    for stream in (original.finished(10), follower.finished(10)):
        assert stream.types[-2:] == ["abort", "[DONE]"], stream.types
    assert follower.text() == messages(first, user, conversation_id)[-1]["content"]


def test_resume_with_nothing_streaming_is_204(instances):
    first, _ = instances
    user = make_user()
    assert resume(first, user, "00000000-0000-4000-8000-000000000000").status_code == 204
    conversation_id = requests.post(f"{first.url}/api/{user.id}/chat", json={"message": "done"},
                                    headers=user.headers, timeout=30).json()["conversation_id"]
    assert resume(first, user, conversation_id).status_code == 204
    assert resume(first, make_user("other"), conversation_id).status_code == 204


def test_a_dead_producer_leaves_an_interrupted_reply_a_retry_answers_again(app_url, llm, upstream):
    """kill -9 of the worker mid-stream: the reply stays `streaming` until its
    stale time (ASSISTANT_TIMEOUT_S + 30 s after it began; moved here to now),
    then reads `interrupted`, resumes are 204, and a retry with the key answers
    the user message again, superseding the interrupted reply."""
    upstream.script(streamed(PIECES, interval_s=0.3))
    user = make_user()
    with gunicorn(app_url, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url, ASSISTANT_MODEL="fake-model",
                  ASSISTANT_TIMEOUT_S=20, CHAT_STREAM_FLUSH_S=FLUSH_S) as doomed:
        stream = post_stream(doomed, user, "I will be cut", key="cut-key")
        conversation_id = started(stream)
        stream.wait_for_text("piece0 piece1 piece2 piece3 ")
        time.sleep(FLUSH_S + 0.3)
        for pid in doomed.worker_pids():
            os.kill(pid, signal.SIGKILL)
        stream.finished(10)
    assert "finish" not in stream.types
    with connect(app_url, user.id) as conn:
        status, content = conn.execute("select status, content from message where role = 'assistant'"
                                       " and conversation_id = %s", (conversation_id,)).fetchone()
        assert status == "streaming" and content and stream.text().startswith(content)
        conn.execute("update message set stale_at = now() where conversation_id = %s and status = 'streaming'",
                     (conversation_id,))
        conn.execute("update idempotency_key set updated_at = now() - interval '1 hour' where key = 'cut-key'")
        conn.commit()
    upstream.default = text("answered again")
    with gunicorn(app_url, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url, ASSISTANT_MODEL="fake-model",
                  ASSISTANT_TIMEOUT_S=20) as survivor:
        listed = messages(survivor, user, conversation_id)
        assert [m["status"] for m in listed] == ["complete", "interrupted"] and listed[1]["content"] == content
        assert resume(survivor, user, conversation_id).status_code == 204
        retry = requests.post(f"{survivor.url}/api/{user.id}/chat", json={"message": "I will be cut"},
                              headers={**user.headers, "Idempotency-Key": "cut-key"}, timeout=30)
        assert retry.status_code == 200 and retry.json()["response"] == "answered again"
        current = messages(survivor, user, conversation_id)
        assert [m["status"] for m in current] == ["complete", "complete"]
        assert current[1]["content"] == "answered again" and current[1]["reply_to"] == current[0]["id"]
    with connect(app_url, user.id) as conn:
        superseded = conn.execute("select content from message where superseded_at is not null"
                                  " and conversation_id = %s", (conversation_id,)).fetchall()
    assert superseded == [(content,)]


def test_a_stopped_turns_key_answers_with_the_stopped_reply(instances, upstream):
    first, second = instances
    upstream.script(streamed(PIECES, interval_s=0.3))
    user = make_user()
    stream = post_stream(first, user, "keyed", key="stop-key")
    conversation_id = started(stream)
    while not stream.text():
        time.sleep(0.02)
    assert stop(second, user, conversation_id).json()["stopped"] is True
    stream.finished(10)
    replay = requests.post(f"{second.url}/api/{user.id}/chat", json={"message": "keyed"},
                           headers={**user.headers, "Idempotency-Key": "stop-key"}, timeout=30)
    assert replay.status_code == 200 and replay.json()["status"] == "stopped"
    assert replay.json()["response"] == messages(second, user, conversation_id)[-1]["content"]
