"""The chat endpoint through the Flask test client, on the real database."""
from __future__ import annotations

import threading
import uuid
from contextlib import contextmanager

import psycopg
import pytest
from support import built_app, connect

from chat_blueprint.assistants import AssistantError, AssistantTimeout
from chat_blueprint.assistants.builtin import BuiltinAssistant


class RecordingAssistant(BuiltinAssistant):
    """The builtin assistant, remembering what it was shown."""

    def __init__(self):
        self.calls = []

    def reply(self, history, turn, *, user_id=None):
        self.calls.append((list(history), turn))
        return super().reply(history, turn)


class ScriptedAssistant:
    """Fails (or runs `action`) on the calls listed, answers like the builtin otherwise."""

    def __init__(self, failures=(), action=None):
        self.failures = list(failures)
        self.action = action
        self.calls = 0

    def reply(self, history, turn, *, user_id=None):
        self.calls += 1
        if self.action is not None:
            self.action()
        if self.failures:
            raise self.failures.pop(0)
        return BuiltinAssistant().reply(history, turn)


@contextmanager
def assistant(app, backend):
    previous = app.extensions["assistant"]
    app.extensions["assistant"] = backend
    try:
        yield backend
    finally:
        app.extensions["assistant"] = previous


def chat(client, user, message="hello", conversation_id=None, key=None, **extra):
    body = {"message": message, **extra}
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    headers = {**user.headers, **({"Idempotency-Key": key} if key else {})}
    return client.post(f"/api/{user.id}/chat", json=body, headers=headers)


def stored_messages(app_url, user_id, conversation_id):
    with connect(app_url, user_id) as conn:
        return conn.execute("select id, role, content, reply_to, turn from message where conversation_id = %s"
                            " order by id", (conversation_id,)).fetchall()


def test_new_conversation_stores_both_messages(client, alice, app_url):
    response = chat(client, alice, "remember the milk")
    assert response.status_code == 200
    answer = response.get_json()
    assert set(answer) == {"conversation_id", "response", "tool_calls", "user_message_id", "assistant_message_id",
                           "model", "finish_reason", "usage", "status"}
    assert (answer["model"], answer["finish_reason"], answer["usage"]) == ("builtin", "stop", None)
    assert "turn 1" in answer["response"] and answer["tool_calls"] == []
    rows = stored_messages(app_url, alice.id, answer["conversation_id"])
    assert rows == [
        (answer["user_message_id"], "user", "remember the milk", None, 1),
        (answer["assistant_message_id"], "assistant", answer["response"], answer["user_message_id"], None),
    ]
    conversation = client.get(f"/api/{alice.id}/conversations/{answer['conversation_id']}",
                              headers=alice.headers).get_json()
    assert conversation["title"] == "remember the milk" and conversation["message_count"] == 2


def test_follow_ups_see_the_history(client, alice, app):
    with assistant(app, RecordingAssistant()) as recorder:
        first = chat(client, alice, "one").get_json()
        conversation_id = first["conversation_id"]
        second = chat(client, alice, "two", conversation_id).get_json()
        third = chat(client, alice, "three", conversation_id).get_json()
    assert ["turn 1" in first["response"], "turn 2" in second["response"], "turn 3" in third["response"]] == [True] * 3
    assert {second["conversation_id"], third["conversation_id"]} == {conversation_id}
    history, turn = recorder.calls[-1]
    assert turn == 3
    assert [(m.role, m.content) for m in history] == [
        ("user", "one"), ("assistant", first["response"]), ("user", "two"), ("assistant", second["response"]),
        ("user", "three")]


def test_title_is_the_first_80_characters_of_the_first_message(client, alice):
    message = "x" * 79 + "yz" + " tail"
    answer = chat(client, alice, message).get_json()
    chat(client, alice, "second message", answer["conversation_id"])
    conversation = client.get(f"/api/{alice.id}/conversations/{answer['conversation_id']}", headers=alice.headers)
    assert conversation.get_json()["title"] == message[:80]


def seed_messages(app_url, user_id, count):
    """A conversation with `count` stored messages, written in SQL as the user."""
    with connect(app_url, user_id) as conn:
        conversation_id = conn.execute("insert into conversation (user_id, title, message_count, turn_count)"
                                       " values (%s, 'long', %s, %s) returning id",
                                       (user_id, count, count // 2)).fetchone()[0]
        with conn.cursor() as cursor:
            cursor.executemany(
                "insert into message (conversation_id, user_id, role, content, turn) values (%s, %s, 'user', %s, %s)",
                [(conversation_id, user_id, f"message {n}", n // 2 + 1) for n in range(count)])
    return str(conversation_id)


def test_only_the_window_reaches_the_assistant(client, alice, app, app_url):
    conversation_id = seed_messages(app_url, alice.id, 500)
    limit = app.config["SETTINGS"].chat_history_limit
    with assistant(app, RecordingAssistant()) as recorder:
        answer = chat(client, alice, "newest", conversation_id).get_json()
    history, turn = recorder.calls[0]
    assert len(history) == limit == 50
    assert [m.content for m in history] == [f"message {n}" for n in range(500 - limit + 1, 500)] + ["newest"]
    assert turn == 251 and "turn 251" in answer["response"]
    assert len(stored_messages(app_url, alice.id, conversation_id)) == 502


def test_history_limit_is_configurable(app_url, alice):
    with built_app(app_url, CHAT_HISTORY_LIMIT=3) as app:
        client = app.test_client()
        with assistant(app, RecordingAssistant()) as recorder:
            conversation_id = chat(client, alice, "a").get_json()["conversation_id"]
            second = chat(client, alice, "b", conversation_id).get_json()
            chat(client, alice, "c", conversation_id)
    history, turn = recorder.calls[-1]
    assert [m.content for m in history] == ["b", second["response"], "c"] and turn == 3


@contextmanager
def counting_statements(monkeypatch):
    """Counts every statement psycopg sends, whether from SQLAlchemy or raw."""
    sent = []
    execute = psycopg.Cursor.execute

    def counted(cursor, query, *args, **kwargs):
        sent.append(str(query))
        return execute(cursor, query, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", counted)
        yield sent


def test_a_turn_runs_a_constant_number_of_statements(client, alice, app_url, monkeypatch):
    short = chat(client, alice, "short").get_json()["conversation_id"]
    long = seed_messages(app_url, alice.id, 2000)
    counts = []
    for conversation_id in (short, long, short):
        with counting_statements(monkeypatch) as sent:
            assert chat(client, alice, "count me", conversation_id).status_code == 200
        counts.append(len(sent))
    with counting_statements(monkeypatch) as sent:
        assert chat(client, alice, "new conversation").status_code == 200
    # The WRITE_RATE_LIMIT step is part of the statement that stores the user
    # message: bind, store, window (one round trip), bind, store the reply (one).
    assert counts[0] == counts[1] == counts[2] == 5, counts
    assert len(sent) == 4
    with counting_statements(monkeypatch) as sent:
        assert chat(client, alice, "with a key", short, key="count-key").status_code == 200
    # With a key the step goes out with the binding (bind, step, its Retry-After),
    # then the claim, the message and its window; then bind and the reply.
    assert len(sent) == 3 + 5, sent


@pytest.mark.parametrize("method, suffix, body", [
    ("get", "", None),
    ("patch", "", {"title": "stolen"}),
    ("delete", "", None),
    ("get", "/messages", None),
])
def test_another_users_conversation_is_404_on_every_route(client, alice, bob, app_url, method, suffix, body):
    answer = chat(client, alice, "private").get_json()
    conversation_id = answer["conversation_id"]
    kwargs = {"headers": bob.headers, **({"json": body} if body else {})}
    response = getattr(client, method)(f"/api/{bob.id}/conversations/{conversation_id}{suffix}", **kwargs)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "conversation_not_found"
    assert len(stored_messages(app_url, alice.id, conversation_id)) == 2
    assert client.get(f"/api/{alice.id}/conversations/{conversation_id}",
                      headers=alice.headers).get_json()["title"] == "private"


def test_chat_into_another_users_conversation_is_404(client, alice, bob, app_url):
    conversation_id = chat(client, alice, "private").get_json()["conversation_id"]
    response = chat(client, bob, "intrusion", conversation_id)
    assert response.status_code == 404
    assert len(stored_messages(app_url, alice.id, conversation_id)) == 2
    assert client.get(f"/api/{bob.id}/conversations", headers=bob.headers).get_json()["data"] == []


def test_path_mismatch_is_403(client, alice, bob):
    response = client.post(f"/api/{bob.id}/chat", json={"message": "hi"}, headers=alice.headers)
    assert response.status_code == 403


@pytest.mark.parametrize("body, field", [
    ({}, "message"),
    ({"message": ""}, "message"),
    ({"message": "   \n\t"}, "message"),
    ({"message": 42}, "message"),
    ({"message": None}, "message"),
    ({"message": ["hi"]}, "message"),
    ({"message": "x" * 16001}, "message"),
    ({"message": "nul \u0000"}, "message"),
    ({"message": "\udfff"}, "message"),
    ({"message": "hi", "conversation_id": "not-a-uuid"}, "conversation_id"),
    ({"message": "hi", "conversation_id": 5}, "conversation_id"),
    ({"message": "hi", "role": "system"}, "role"),
])
def test_chat_validation(client, alice, body, field):
    response = client.post(f"/api/{alice.id}/chat", json=body, headers=alice.headers)
    assert response.status_code == 422, response.get_json()
    assert field in response.get_json()["error"]["fields"]
    assert client.get(f"/api/{alice.id}/conversations", headers=alice.headers).get_json()["data"] == []


def test_longest_message_is_accepted(client, alice):
    assert chat(client, alice, "x" * 16000).status_code == 200


def test_unknown_conversation_is_404(client, alice):
    response = chat(client, alice, "hi", str(uuid.uuid4()))
    assert response.status_code == 404
    assert client.get(f"/api/{alice.id}/conversations", headers=alice.headers).get_json()["data"] == []


def test_null_conversation_id_starts_a_new_conversation(client, alice):
    first = chat(client, alice, "a", None).get_json()
    second = client.post(f"/api/{alice.id}/chat", json={"message": "b", "conversation_id": None},
                         headers=alice.headers).get_json()
    assert first["conversation_id"] != second["conversation_id"]


@pytest.mark.parametrize("key", ["", "k" * 256, "bad\x01key"])
def test_bad_idempotency_key_is_422(client, alice, key):
    response = client.post(f"/api/{alice.id}/chat", json={"message": "hi"},
                           headers={**alice.headers, "Idempotency-Key": key})
    assert response.status_code == 422
    assert "Idempotency-Key" in response.get_json()["error"]["fields"]


def count_all_messages(app_url, user_id):
    with connect(app_url, user_id) as conn:
        return conn.execute("select count(*) from message").fetchone()[0]


def test_idempotent_replay_stores_nothing_new(client, alice, app_url):
    first = chat(client, alice, "once", key="key-1")
    again = chat(client, alice, "once", key="key-1")
    assert first.status_code == again.status_code == 200
    assert again.get_json() == first.get_json()
    assert count_all_messages(app_url, alice.id) == 2
    follow = chat(client, alice, "next", first.get_json()["conversation_id"], key="key-2").get_json()
    assert chat(client, alice, "next", first.get_json()["conversation_id"], key="key-2").get_json() == follow
    assert count_all_messages(app_url, alice.id) == 4


def test_same_key_with_another_body_is_422(client, alice, app_url):
    chat(client, alice, "first body", key="key-x")
    response = chat(client, alice, "second body", key="key-x")
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "idempotency_key_reused"
    assert count_all_messages(app_url, alice.id) == 2


def test_keys_belong_to_their_user(client, alice, bob):
    a = chat(client, alice, "same", key="shared-key").get_json()
    b = chat(client, bob, "same", key="shared-key").get_json()
    assert a["conversation_id"] != b["conversation_id"]


class BlockingAssistant(BuiltinAssistant):
    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def reply(self, history, turn, *, user_id=None):
        self.entered.set()
        assert self.release.wait(20)
        return super().reply(history, turn)


def test_in_flight_key_is_409_and_another_body_422(app, alice, app_url):
    blocking = BlockingAssistant()
    results = {}
    with assistant(app, blocking):
        first = threading.Thread(target=lambda: results.update(first=chat(app.test_client(), alice, "slow", key="k")))
        first.start()
        try:
            assert blocking.entered.wait(20)
            in_flight = chat(app.test_client(), alice, "slow", key="k")
            other_body = chat(app.test_client(), alice, "different", key="k")
        finally:
            blocking.release.set()
            first.join(20)
    assert in_flight.status_code == 409 and in_flight.get_json()["error"]["code"] == "idempotency_key_in_flight"
    assert other_body.status_code == 422
    assert results["first"].status_code == 200
    assert chat(app.test_client(), alice, "slow", key="k").get_json() == results["first"].get_json()
    assert count_all_messages(app_url, alice.id) == 2


@pytest.mark.parametrize("failure, status, code", [
    (AssistantError("upstream said no"), 502, "assistant_failed"),
    (AssistantTimeout("too slow"), 504, "assistant_timeout"),
    (RuntimeError("bug in a backend"), 502, "assistant_failed"),
])
def test_assistant_failure_keeps_the_message_and_a_retry_answers_it(client, app, alice, app_url, failure, status,
                                                                    code):
    with assistant(app, ScriptedAssistant([failure])) as scripted:
        failed = chat(client, alice, "are you there?", key="retry-key")
        assert failed.status_code == status
        error = failed.get_json()["error"]
        assert error["code"] == code
        conversation_id = error["conversation_id"]
        assert [row[1:3] for row in stored_messages(app_url, alice.id, conversation_id)] == [("user", "are you there?")]
        retried = chat(client, alice, "are you there?", key="retry-key")
        assert scripted.calls == 2
    assert retried.status_code == 200
    answer = retried.get_json()
    assert answer["conversation_id"] == conversation_id and "turn 1" in answer["response"]
    rows = stored_messages(app_url, alice.id, conversation_id)
    assert [(role, reply_to) for _, role, _, reply_to, _ in rows] == [("user", None), ("assistant", rows[0][0])]
    assert chat(client, alice, "are you there?", key="retry-key").get_json() == answer


def test_assistant_failure_without_a_key_keeps_the_message(client, app, alice, app_url):
    with assistant(app, ScriptedAssistant([AssistantError("down")])):
        failed = chat(client, alice, "hello?")
    conversation_id = failed.get_json()["error"]["conversation_id"]
    assert failed.status_code == 502
    assert [row[1] for row in stored_messages(app_url, alice.id, conversation_id)] == ["user"]
    follow = chat(client, alice, "anyone?", conversation_id).get_json()
    assert "turn 2" in follow["response"]


def test_a_key_whose_first_request_died_can_be_completed_later(client, app, alice, app_url):
    """A first request that stored its message and died leaves its key running;
    after ASSISTANT_TIMEOUT_S + 30 s a retry answers that message."""
    with assistant(app, ScriptedAssistant([AssistantError("down")])):
        conversation_id = chat(client, alice, "lost?", key="died").get_json()["error"]["conversation_id"]
    with connect(app_url, alice.id) as conn:
        conn.execute("update idempotency_key set status = 'running' where key = 'died'")
    assert chat(client, alice, "lost?", key="died").status_code == 409
    timeout = app.config["SETTINGS"].assistant_timeout_s
    with connect(app_url, alice.id) as conn:
        conn.execute("update idempotency_key set updated_at = now() - make_interval(secs => %s) where key = 'died'",
                     (timeout + 31,))
    answer = chat(client, alice, "lost?", key="died")
    assert answer.status_code == 200 and answer.get_json()["conversation_id"] == conversation_id
    assert [row[1] for row in stored_messages(app_url, alice.id, conversation_id)] == ["user", "assistant"]


def test_database_failure_mid_turn_is_503_and_leaves_no_half_turn(client, app, alice, app_url, superuser_url):
    def drop_app_connections():
        with psycopg.connect(superuser_url, autocommit=True) as conn:
            conn.execute("select pg_terminate_backend(pid) from pg_stat_activity"
                         " where usename = 'chat_app' and application_name = 'chat_blueprint'")

    with assistant(app, ScriptedAssistant(action=drop_app_connections)):
        failed = chat(client, alice, "mid-turn", key="mid")
    assert failed.status_code == 503 and failed.headers["Retry-After"].isdigit()
    with connect(app_url, alice.id) as conn:
        conversation_id, count = conn.execute("select id, message_count from conversation").fetchone()
    rows = stored_messages(app_url, alice.id, conversation_id)
    assert [row[1] for row in rows] == ["user"] and count == 1
    retried = chat(client, alice, "mid-turn", key="mid")
    assert retried.status_code == 200 and retried.get_json()["user_message_id"] == rows[0][0]
    assert [row[1] for row in stored_messages(app_url, alice.id, conversation_id)] == ["user", "assistant"]


def test_conversations_are_listed_most_recently_updated_first_in_pages(client, alice):
    ids = [chat(client, alice, f"conversation {n}").get_json()["conversation_id"] for n in range(5)]
    chat(client, alice, "bump", ids[1])
    expected = [ids[1], ids[4], ids[3], ids[2], ids[0]]
    seen, cursor = [], None
    while True:
        url = f"/api/{alice.id}/conversations?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = client.get(url, headers=alice.headers).get_json()
        assert len(page["data"]) <= 2
        seen += [c["id"] for c in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected
    default = client.get(f"/api/{alice.id}/conversations", headers=alice.headers).get_json()
    assert [c["id"] for c in default["data"]] == expected and default["next_cursor"] is None
    assert default["data"][0]["message_count"] == 4


def test_messages_are_paged_in_both_orders(client, alice):
    conversation_id = chat(client, alice, "m0").get_json()["conversation_id"]
    for n in range(1, 4):
        chat(client, alice, f"m{n}", conversation_id)
    everything = client.get(f"/api/{alice.id}/conversations/{conversation_id}/messages",
                            headers=alice.headers).get_json()
    assert everything["next_cursor"] is None and len(everything["data"]) == 8
    ids = [m["id"] for m in everything["data"]]
    assert ids == sorted(ids)
    assert [m["role"] for m in everything["data"]] == ["user", "assistant"] * 4
    assert all(m["reply_to"] == ids[i - 1] for i, m in enumerate(everything["data"]) if m["role"] == "assistant")
    for order, expected in (("asc", ids), ("desc", ids[::-1])):
        seen, cursor = [], None
        while True:
            url = f"/api/{alice.id}/conversations/{conversation_id}/messages?limit=3&order={order}"
            page = client.get(url + (f"&cursor={cursor}" if cursor else ""), headers=alice.headers).get_json()
            seen += [m["id"] for m in page["data"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == expected


@pytest.mark.parametrize("query", ["limit=0", "limit=101", "limit=abc", "cursor=%%%", "cursor=WzFd", "cursor=bnVsbA",
                                   "cursor=WyJ4IiwieSJd", "cursor=WyIyMDI2LTAxLTAxVDAwOjAwOjAwIiwiYWJjIl0"])
def test_bad_conversation_page_queries_are_422(client, alice, query):
    response = client.get(f"/api/{alice.id}/conversations?{query}", headers=alice.headers)
    assert response.status_code == 422, query


@pytest.mark.parametrize("query", ["order=sideways", "limit=0", "limit=101", "cursor=abc", "cursor=WyJ4Il0",
                                   "cursor=Wy0xXQ", "cursor=Wzk5OTk5OTk5OTk5OTk5OTk5OTk5XQ"])
def test_bad_message_page_queries_are_422(client, alice, query):
    conversation_id = chat(client, alice, "x").get_json()["conversation_id"]
    response = client.get(f"/api/{alice.id}/conversations/{conversation_id}/messages?{query}", headers=alice.headers)
    assert response.status_code == 422, query


def test_rename_keeps_the_order(client, alice):
    older = chat(client, alice, "older").get_json()["conversation_id"]
    newer = chat(client, alice, "newer").get_json()["conversation_id"]
    before = client.get(f"/api/{alice.id}/conversations/{older}", headers=alice.headers).get_json()
    renamed = client.patch(f"/api/{alice.id}/conversations/{older}", json={"title": "Groceries"},
                           headers=alice.headers)
    assert renamed.status_code == 200
    assert renamed.get_json() == {**before, "title": "Groceries"}
    listed = client.get(f"/api/{alice.id}/conversations", headers=alice.headers).get_json()["data"]
    assert [c["id"] for c in listed] == [newer, older]


@pytest.mark.parametrize("body", [{}, {"title": ""}, {"title": "  "}, {"title": "t" * 201}, {"title": 3},
                                  {"title": "ok", "colour": "red"}, {"title": "ok", "pinned": "yes"},
                                  {"title": "ok", "archived": 1}, {"title": "ok", "pinned": None}])
def test_rename_validation(client, alice, body):
    conversation_id = chat(client, alice, "keep my title").get_json()["conversation_id"]
    response = client.patch(f"/api/{alice.id}/conversations/{conversation_id}", json=body, headers=alice.headers)
    assert response.status_code == 422
    assert client.get(f"/api/{alice.id}/conversations/{conversation_id}",
                      headers=alice.headers).get_json()["title"] == "keep my title"


def test_delete_takes_the_messages(client, alice, app_url):
    conversation_id = chat(client, alice, "forget me").get_json()["conversation_id"]
    assert client.delete(f"/api/{alice.id}/conversations/{conversation_id}", headers=alice.headers).status_code == 204
    assert stored_messages(app_url, alice.id, conversation_id) == []
    assert client.get(f"/api/{alice.id}/conversations/{conversation_id}", headers=alice.headers).status_code == 404
    assert client.get(f"/api/{alice.id}/conversations/{conversation_id}/messages",
                      headers=alice.headers).status_code == 404
    assert chat(client, alice, "back?", conversation_id).status_code == 404


def test_non_uuid_conversation_path_is_404(client, alice):
    assert client.get(f"/api/{alice.id}/conversations/12345", headers=alice.headers).status_code == 404


def test_chat_body_errors(client, alice):
    url = f"/api/{alice.id}/chat"
    assert client.post(url, data=b"{", content_type="application/json", headers=alice.headers).status_code == 400
    assert client.post(url, data=b"[]", content_type="application/json", headers=alice.headers).status_code == 400
    assert client.post(url, data=b'{"message": "hi"}', content_type="text/plain",
                       headers=alice.headers).status_code == 415
    assert client.post(url, headers=alice.headers).status_code == 415


def test_the_builtin_reply_counts_the_messages_in_view_in_good_english(client, alice):
    """The finding: the first turn's reply said "(1 messages in view)"."""
    first = chat(client, alice, "one").get_json()
    assert first["response"] == 'turn 1: you said "one" (1 message in view)'
    second = chat(client, alice, "two", first["conversation_id"]).get_json()
    assert second["response"] == 'turn 2: you said "two" (3 messages in view)'


def test_a_replayed_answer_has_its_keys_in_the_order_of_the_first(client, alice):
    """The finding: the repeat came back from jsonb with its keys in PostgreSQL's order
    (`usage`, `model`, `response`, ... shortest first), unlike the first answer."""
    first = chat(client, alice, "once", key="order-key")
    again = chat(client, alice, "once", key="order-key")
    assert again.get_json() == first.get_json()
    assert list(again.get_json()) == list(first.get_json()) == [
        "conversation_id", "response", "tool_calls", "user_message_id", "assistant_message_id", "model",
        "finish_reason", "usage", "status"]
