"""The per-user chat rate limit, shared by every instance through PostgreSQL."""
from __future__ import annotations

import time

import pytest
import requests
from conftest import built_app, connect, gunicorn, make_user

LIMIT = 3


@pytest.fixture(scope="module")
def two_limited_instances(app_url):
    with gunicorn(app_url, CHAT_RATE_LIMIT=f"{LIMIT}/minute") as first, \
            gunicorn(app_url, CHAT_RATE_LIMIT=f"{LIMIT}/minute") as second:
        yield first, second


def post(server, user, message, key=None):
    headers = {**user.headers, **({"Idempotency-Key": key} if key else {})}
    return requests.post(f"{server.url}/api/{user.id}/chat", json={"message": message}, headers=headers, timeout=30)


def stored_messages(app_url, user_id) -> int:
    with connect(app_url, user_id) as conn:
        return conn.execute("select count(*) from message").fetchone()[0]


def test_the_limit_is_shared_by_every_instance(two_limited_instances, app_url):
    user = make_user()
    answers = [post(two_limited_instances[n % 2], user, f"turn {n}") for n in range(LIMIT)]
    assert [a.status_code for a in answers] == [200] * LIMIT
    for server in two_limited_instances:
        limited = post(server, user, "one too many")
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited"
        retry_after = int(limited.headers["Retry-After"])
        assert 1 <= retry_after <= 60
    assert stored_messages(app_url, user.id) == 2 * LIMIT


def test_users_have_their_own_budget(two_limited_instances):
    alice, bob = make_user("alice"), make_user("bob")
    for n in range(LIMIT):
        assert post(two_limited_instances[0], alice, f"a{n}").status_code == 200
    assert post(two_limited_instances[1], alice, "over").status_code == 429
    assert post(two_limited_instances[1], bob, "fresh").status_code == 200


def test_an_idempotent_replay_does_not_count(two_limited_instances, app_url):
    user = make_user()
    first = post(two_limited_instances[0], user, "once", key="same")
    for server in two_limited_instances * 3:
        replay = post(server, user, "once", key="same")
        assert replay.status_code == 200 and replay.json() == first.json()
    for n in range(LIMIT - 1):
        assert post(two_limited_instances[1], user, f"more {n}").status_code == 200
    assert post(two_limited_instances[0], user, "over").status_code == 429


def test_without_the_setting_there_is_no_limit(client, alice):
    for n in range(LIMIT + 3):
        assert client.post(f"/api/{alice.id}/chat", json={"message": f"m{n}"}, headers=alice.headers).status_code == 200


def test_the_budget_refills(app_url):
    user = make_user()
    with built_app(app_url, CHAT_RATE_LIMIT="2/second") as app:
        client = app.test_client()
        statuses = [client.post(f"/api/{user.id}/chat", json={"message": f"m{n}"}, headers=user.headers).status_code
                    for n in range(3)]
        assert statuses == [200, 200, 429]
        time.sleep(0.6)
        assert client.post(f"/api/{user.id}/chat", json={"message": "later"}, headers=user.headers).status_code == 200
