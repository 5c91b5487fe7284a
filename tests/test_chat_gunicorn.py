"""Two gunicorn instances on one database: the chat endpoint keeps no state
of its own, and concurrent turns on one conversation lose nothing."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from support import assert_burst_stored, gunicorn, make_user

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
    assert_burst_stored(app_url, user, conversation_id, [r.json() for r in responses], SIMULTANEOUS)


def test_users_stay_isolated_across_instances(two_instances):
    alice, bob = make_user("alice"), make_user("bob")
    conversation_id = post_chat(two_instances[0], alice, "secret").json()["conversation_id"]
    intrusion = post_chat(two_instances[1], bob, "let me in", conversation_id)
    assert intrusion.status_code == 404
    listed = requests.get(f"{two_instances[1].url}/api/{bob.id}/conversations", headers=bob.headers, timeout=30)
    assert listed.json()["data"] == []
