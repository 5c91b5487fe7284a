"""`useChat` as it comes: the AI SDK's own request body, per-user conversation
ids, regenerate and edit (CONTRACT.md section 4), against real gunicorn."""
from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fake_llm import echo, streamed
from support import connect, gunicorn, make_user


@pytest.fixture(scope="module")
def server(app_url):
    with gunicorn(app_url, CHAT_STREAM_FLUSH_S="0.2") as server:
        yield server


@pytest.fixture(scope="module")
def slow_server(app_url, llm):
    with gunicorn(app_url, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url, ASSISTANT_MODEL="fake-model",
                  CHAT_STREAM_FLUSH_S="0.2") as server:
        yield server


def ui_message(text: str, ui_id: str | None = None, role: str = "user", parts=None) -> dict:
    return {"id": ui_id or f"client-{uuid.uuid4().hex[:12]}", "role": role,
            "parts": parts if parts is not None else [{"type": "text", "text": text}]}


def sdk_post(server, user, chat_id, messages, trigger="submit-message", message_id=None, **extra):
    """The body DefaultChatTransport sends, as it sends it (plus whatever its `body` option adds)."""
    body = {"id": str(chat_id), "messages": messages, "trigger": trigger, **extra,
            **({"messageId": message_id} if message_id else {})}
    return requests.post(f"{server.url}/api/{user.id}/chat", json=body, headers=user.headers, timeout=60)


def native(server, user, **body):
    return requests.post(f"{server.url}/api/{user.id}/chat", json=body, headers=user.headers, timeout=60)


def events(response) -> list[dict]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "text/event-stream"
    return [json.loads(line.removeprefix("data: ")) for line in response.text.split("\n\n")
            if line.startswith("data: {")]


def streamed_text(found: list[dict]) -> str:
    return "".join(event["delta"] for event in found if event["type"] == "text-delta")


def listed(server, user, conversation_id, **query) -> list[dict]:
    answer = requests.get(f"{server.url}/api/{user.id}/conversations/{conversation_id}/messages",
                          params=query, headers=user.headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def conversation(server, user, conversation_id) -> dict:
    return requests.get(f"{server.url}/api/{user.id}/conversations/{conversation_id}", headers=user.headers,
                        timeout=30).json()


def test_the_sdk_body_starts_a_conversation_with_the_chat_id_and_keeps_ui_ids(server):
    user, chat_id = make_user(), uuid.uuid4()
    first = ui_message("hello from useChat")
    found = events(sdk_post(server, user, chat_id, [first], extra_field="from the transport's body option"))
    start, finish = found[0], found[-1]
    assert start["type"] == "start" and finish["type"] == "finish"
    assert start["messageMetadata"]["conversation_id"] == str(chat_id)
    stored = listed(server, user, chat_id)
    assert [m["ui_id"] for m in stored] == [first["id"], start["messageId"]]
    assert stored[0]["content"] == "hello from useChat" and stored[1]["content"] == streamed_text(found)
    second = ui_message("and again")
    events(sdk_post(server, user, chat_id, [first, ui_message("an old reply", role="assistant"), second]))
    assert [m["role"] for m in listed(server, user, chat_id)] == ["user", "assistant"] * 2
    assert conversation(server, user, chat_id)["message_count"] == 4


def test_two_users_with_the_same_chat_id_stay_apart(server, app_url):
    alice, bob, chat_id = make_user("alice"), make_user("bob"), uuid.uuid4()
    events(sdk_post(server, alice, chat_id, [ui_message("alice's secret")]))
    events(sdk_post(server, bob, chat_id, [ui_message("bob's own")]))
    assert [m["content"] for m in listed(server, alice, chat_id) if m["role"] == "user"] == ["alice's secret"]
    assert [m["content"] for m in listed(server, bob, chat_id) if m["role"] == "user"] == ["bob's own"]
    assert "turn 1" in listed(server, bob, chat_id)[1]["content"]
    for user in (alice, bob):
        with connect(app_url, user.id) as conn:
            assert conn.execute("select count(*) from conversation where id = %s", (chat_id,)).fetchone()[0] == 1


def test_the_same_ui_id_sent_again_replays_the_turn(server):
    user, chat_id = make_user(), uuid.uuid4()
    message = ui_message("only once")
    first = events(sdk_post(server, user, chat_id, [message]))
    again = events(sdk_post(server, user, chat_id, [message]))
    assert again[0]["messageId"] == first[0]["messageId"] and streamed_text(again) == streamed_text(first)
    assert again[-1]["messageMetadata"] == first[-1]["messageMetadata"]
    assert len(listed(server, user, chat_id)) == 2


def test_native_regenerate_supersedes_the_reply_and_answers_the_same_message(server):
    user = make_user()
    answer = native(server, user, message="first question").json()
    conversation_id = answer["conversation_id"]
    native(server, user, message="second question", conversation_id=conversation_id)
    regenerated = native(server, user, conversation_id=conversation_id, regenerate=True)
    assert regenerated.status_code == 200, regenerated.text
    again = regenerated.json()
    current = listed(server, user, conversation_id)
    assert [m["content"] for m in current if m["role"] == "user"] == ["first question", "second question"]
    assert current[-1]["id"] == again["assistant_message_id"] and current[-1]["reply_to"] == current[2]["id"]
    everything = listed(server, user, conversation_id, include="superseded")
    superseded = [m for m in everything if m["superseded_at"] is not None]
    assert len(everything) == 5 and len(superseded) == 1 and superseded[0]["reply_to"] == current[2]["id"]
    assert conversation(server, user, conversation_id)["message_count"] == 4


def test_native_edit_supersedes_the_message_and_what_follows(slow_server, llm):
    llm.reset()
    llm.default = echo()
    user = make_user()
    conversation_id = native(slow_server, user, message="one").json()["conversation_id"]
    second = native(slow_server, user, message="two", conversation_id=conversation_id).json()
    native(slow_server, user, message="three", conversation_id=conversation_id)
    edited = native(slow_server, user, message="two, edited", conversation_id=conversation_id,
                    edit=second["user_message_id"])
    assert edited.status_code == 200, edited.text
    window = [m["content"] for m in llm.requests[-1].body["messages"]]
    assert window[-1] == "two, edited" and "two" not in window and "three" not in window
    current = listed(slow_server, user, conversation_id)
    assert [m["content"] for m in current if m["role"] == "user"] == ["one", "two, edited"]
    old = [m for m in listed(slow_server, user, conversation_id, include="superseded") if m["superseded_at"]]
    assert [m["content"] for m in old if m["role"] == "user"] == ["two", "three"]
    assert current[2]["ui_id"] == next(m for m in old if m["content"] == "two")["ui_id"]
    missing = native(slow_server, user, message="x", conversation_id=conversation_id, edit=second["user_message_id"])
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "message_not_found"


def test_sdk_regenerate_and_edit_by_ui_id(server):
    user, chat_id = make_user(), uuid.uuid4()
    first = ui_message("tell me")
    reply_id = events(sdk_post(server, user, chat_id, [first]))[0]["messageId"]
    regenerated = events(sdk_post(server, user, chat_id, [first], trigger="regenerate-message", message_id=reply_id))
    assert regenerated[0]["messageId"] != reply_id
    current = listed(server, user, chat_id)
    assert [m["ui_id"] for m in current] == [first["id"], regenerated[0]["messageId"]]
    edited = ui_message("tell me more", ui_id=first["id"])
    found = events(sdk_post(server, user, chat_id, [edited], message_id=first["id"]))
    current = listed(server, user, chat_id)
    assert [m["content"] for m in current if m["role"] == "user"] == ["tell me more"]
    assert current[0]["ui_id"] == first["id"] and current[1]["ui_id"] == found[0]["messageId"]
    last = events(sdk_post(server, user, chat_id, [edited], trigger="regenerate-message"))
    assert listed(server, user, chat_id)[1]["ui_id"] == last[0]["messageId"]


def test_regenerate_and_edit_wait_for_a_reply_being_produced(slow_server, llm):
    llm.reset()
    llm.script(streamed([f"w{n} " for n in range(10)], interval_s=0.3))
    user = make_user()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(native, slow_server, user, message="slow", stream=True)
        deadline = time.monotonic() + 10
        while not requests.get(f"{slow_server.url}/api/{user.id}/conversations", headers=user.headers,
                               timeout=10).json()["data"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        conversation_id = requests.get(f"{slow_server.url}/api/{user.id}/conversations", headers=user.headers,
                                       timeout=10).json()["data"][0]["id"]
        busy = native(slow_server, user, conversation_id=conversation_id, regenerate=True)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "reply_in_progress"
        user_message = listed(slow_server, user, conversation_id)[0]
        busy = native(slow_server, user, conversation_id=conversation_id, message="x", edit=user_message["id"])
        assert busy.status_code == 409
        running.result()
    llm.default = echo()


def test_a_stopped_reply_can_be_regenerated(slow_server, llm):
    llm.reset()
    llm.script(streamed([f"w{n} " for n in range(20)], interval_s=0.2))
    user = make_user()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(native, slow_server, user, message="stop me", stream=True)
        time.sleep(1.0)
        conversation_id = requests.get(f"{slow_server.url}/api/{user.id}/conversations", headers=user.headers,
                                       timeout=10).json()["data"][0]["id"]
        assert requests.post(f"{slow_server.url}/api/{user.id}/conversations/{conversation_id}/stop",
                             headers=user.headers, timeout=10).json()["stopped"] is True
        running.result()
    llm.default = echo()
    again = native(slow_server, user, conversation_id=conversation_id, regenerate=True)
    assert again.status_code == 200 and again.json()["status"] == "complete"
    assert [m["status"] for m in listed(slow_server, user, conversation_id)] == ["complete", "complete"]


@pytest.mark.parametrize("messages, field", [
    ([ui_message("a reply", role="assistant")], "messages"),
    ([ui_message("with a file", parts=[{"type": "text", "text": "see"},
                                       {"type": "file", "url": "data:,x", "mediaType": "text/plain"}])], "messages"),
    ([ui_message("x", ui_id="i" * 256)], "messages"),
    ([ui_message("   ")], "messages"),
    ([], "messages"),
])
def test_sdk_bodies_that_cannot_be_a_turn_are_422(server, messages, field):
    user, chat_id = make_user(), uuid.uuid4()
    refused = sdk_post(server, user, chat_id, messages)
    assert refused.status_code == 422 and field in refused.json()["error"]["fields"], refused.text
    assert requests.get(f"{server.url}/api/{user.id}/conversations", headers=user.headers,
                        timeout=10).json()["data"] == []


def test_parts_that_carry_no_text_of_the_user_are_left_out(server):
    user, chat_id = make_user(), uuid.uuid4()
    parts = [{"type": "step-start"}, {"type": "text", "text": "kept "}, {"type": "data-note", "data": {"x": 1}},
             {"type": "text", "text": "whole"}]
    events(sdk_post(server, user, chat_id, [ui_message("", parts=parts)]))
    assert listed(server, user, chat_id)[0]["content"] == "kept whole"


def test_regenerate_in_an_unknown_conversation_is_404_and_without_a_user_message_422(server, app_url):
    user = make_user()
    missing = native(server, user, conversation_id=str(uuid.uuid4()), regenerate=True)
    assert missing.status_code == 404
    with connect(app_url, user.id) as conn:
        empty = conn.execute("insert into conversation (user_id, title) values (%s, 'empty') returning id",
                             (user.id,)).fetchone()[0]
        conn.commit()
    nothing = native(server, user, conversation_id=str(empty), regenerate=True)
    assert nothing.status_code == 422 and "regenerate" in nothing.json()["error"]["fields"]


def test_the_same_ui_id_posted_twice_at_once_is_answered_once(slow_server, llm):
    llm.reset()
    llm.default = streamed(["only ", "one ", "answer"], interval_s=0.3)
    user, chat_id = make_user(), uuid.uuid4()
    message = ui_message("twice at once")
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: sdk_post(slow_server, user, chat_id, [message]), range(2)))
    llm.default = echo()
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses in ([200, 200], [200, 409]), [answer.text[:200] for answer in answers]
    assert len(listed(slow_server, user, chat_id)) == 2


def test_messages_as_ui_messages(server):
    user, chat_id = make_user(), uuid.uuid4()
    first = ui_message("render me")
    found = events(sdk_post(server, user, chat_id, [first]))
    page = requests.get(f"{server.url}/api/{user.id}/conversations/{chat_id}/messages", params={"format": "ui"},
                        headers=user.headers, timeout=10).json()
    ui = page["data"]
    assert [m["id"] for m in ui] == [first["id"], found[0]["messageId"]]
    assert ui[0]["role"] == "user" and ui[0]["parts"] == [{"type": "text", "text": "render me"}]
    assert ui[1]["parts"] == [{"type": "text", "text": streamed_text(found)}]
    assert ui[1]["metadata"]["status"] == "complete" and ui[1]["metadata"]["conversation_id"] == str(chat_id)
    assert set(ui[1]["metadata"]) == {"conversation_id", "message_id", "status", "model", "finish_reason", "usage",
                                      "created_at"}
