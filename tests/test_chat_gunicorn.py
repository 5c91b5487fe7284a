"""Two gunicorn instances on one database: the chat endpoint keeps no state
of its own, and concurrent turns on one conversation lose nothing."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import connect, gunicorn, make_user

SIMULTANEOUS = 24


@pytest.fixture(scope="module")
def two_instances(app_url):
    with gunicorn(app_url, workers=2, threads=8) as first, gunicorn(app_url, workers=2, threads=8) as second:
        yield first, second


def post_chat(server, user, message, conversation_id=None):
    body = {"message": message, **({"conversation_id": conversation_id} if conversation_id else {})}
    return requests.post(f"{server.url}/api/{user.id}/chat", json=body, headers=user.headers, timeout=60)


def test_a_conversation_continues_across_instances(two_instances):
    user = make_user()
    conversation_id = None
    for turn in range(1, 7):
        server = two_instances[turn % 2]
        response = post_chat(server, user, f"message {turn}", conversation_id)
        assert response.status_code == 200, response.text
        answer = response.json()
        conversation_id = answer["conversation_id"]
        assert f"turn {turn}:" in answer["response"]
    history = requests.get(f"{two_instances[0].url}/api/{user.id}/conversations/{conversation_id}/messages",
                           headers=user.headers, timeout=30).json()["data"]
    assert [m["content"] for m in history if m["role"] == "user"] == [f"message {n}" for n in range(1, 7)]


def test_simultaneous_posts_to_one_conversation_lose_nothing(two_instances, app_url):
    user = make_user()
    conversation_id = post_chat(two_instances[0], user, "start").json()["conversation_id"]

    def post(n):
        return post_chat(two_instances[n % 2], user, f"burst {n}", conversation_id)

    with ThreadPoolExecutor(SIMULTANEOUS) as pool:
        responses = list(pool.map(post, range(SIMULTANEOUS)))
    failures = [r.text for r in responses if r.status_code != 200]
    assert [r.status_code for r in responses] == [200] * SIMULTANEOUS, failures
    answers = [r.json() for r in responses]

    with connect(app_url, user.id) as conn:
        rows = conn.execute("select id, role, content, reply_to, turn from message where conversation_id = %s"
                            " order by id", (conversation_id,)).fetchall()
        message_count = conn.execute("select message_count from conversation where id = %s",
                                     (conversation_id,)).fetchone()[0]
    users = {row[0]: row for row in rows if row[1] == "user"}
    assistants = [row for row in rows if row[1] == "assistant"]
    assert len(rows) == message_count == 2 * (SIMULTANEOUS + 1)
    assert sorted(row[2] for row in users.values()) == sorted(["start"] + [f"burst {n}" for n in range(SIMULTANEOUS)])
    assert sorted(row[4] for row in users.values()) == list(range(1, SIMULTANEOUS + 2))
    replied = [row[3] for row in assistants]
    assert len(set(replied)) == len(replied) == SIMULTANEOUS + 1
    assert all(row[3] in users and row[3] < row[0] for row in assistants)
    assert {a["user_message_id"] for a in answers} == {users[r][0] for r in users if users[r][2] != "start"}
    turns = sorted(int(a["response"].split(":")[0].removeprefix("turn ")) for a in answers)
    assert turns == list(range(2, SIMULTANEOUS + 2))


def test_users_stay_isolated_across_instances(two_instances):
    alice, bob = make_user("alice"), make_user("bob")
    conversation_id = post_chat(two_instances[0], alice, "secret").json()["conversation_id"]
    intrusion = post_chat(two_instances[1], bob, "let me in", conversation_id)
    assert intrusion.status_code == 404
    listed = requests.get(f"{two_instances[1].url}/api/{bob.id}/conversations", headers=bob.headers, timeout=30)
    assert listed.json()["data"] == []
