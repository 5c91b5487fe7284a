"""The per-user rate limits, chat turns and writes, shared by every instance
through PostgreSQL."""
from __future__ import annotations

import time
import uuid

import pytest
import requests
from support import built_app, connect, gunicorn, make_user

from chat_blueprint.config import ConfigError, load_settings

LIMIT = 3
WRITE_LIMIT = 6


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


def test_a_turn_refused_with_404_is_not_counted(two_limited_instances, app_url):
    """The finding: a turn into an unknown conversation was charged to the chat limit."""
    user = make_user()
    for n in range(LIMIT + 2):
        missing = requests.post(f"{two_limited_instances[n % 2].url}/api/{user.id}/chat", timeout=30,
                                json={"message": "into nothing", "conversation_id": str(uuid.uuid4())},
                                headers={**user.headers, **({"Idempotency-Key": f"k{n}"} if n % 2 else {})})
        assert missing.status_code == 404, missing.text
    answers = [post(two_limited_instances[n % 2], user, f"turn {n}") for n in range(LIMIT)]
    assert [a.status_code for a in answers] == [200] * LIMIT
    assert post(two_limited_instances[0], user, "one too many").status_code == 429
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


@pytest.fixture(scope="module")
def two_write_limited_instances(app_url):
    with gunicorn(app_url, WRITE_RATE_LIMIT=f"{WRITE_LIMIT}/minute") as first, \
            gunicorn(app_url, WRITE_RATE_LIMIT=f"{WRITE_LIMIT}/minute") as second:
        yield first, second


def stored_tasks(app_url, user_id) -> int:
    with connect(app_url, user_id) as conn:
        return conn.execute("select count(*) from task").fetchone()[0]


def test_the_write_limit_is_shared_by_every_instance(two_write_limited_instances, app_url):
    """The finding: with no write limit one user created 20,000 tasks in 63 s."""
    user = make_user()
    for n in range(WRITE_LIMIT):
        created = requests.post(f"{two_write_limited_instances[n % 2].url}/api/{user.id}/tasks",
                                json={"title": f"t{n}"}, headers=user.headers, timeout=10)
        assert created.status_code == 201, created.text
    for server in two_write_limited_instances:
        limited = requests.post(f"{server.url}/api/{user.id}/tasks", json={"title": "over"}, headers=user.headers,
                                timeout=10)
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "rate_limited" and "writes" in limited.json()["error"]["message"]
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert requests.get(f"{server.url}/api/{user.id}/tasks", headers=user.headers, timeout=10).status_code == 200
    assert stored_tasks(app_url, user.id) == WRITE_LIMIT


def test_every_write_method_counts_even_when_refused(two_write_limited_instances, app_url):
    user = make_user()
    first, second = two_write_limited_instances
    tasks = f"/api/{user.id}/tasks"
    task = requests.post(first.url + tasks, json={"title": "t"}, headers=user.headers, timeout=10).json()
    writes = [
        requests.put(f"{second.url}{tasks}/{task['id']}", json={"title": "u"}, headers=user.headers, timeout=10),
        requests.patch(f"{first.url}{tasks}/{task['id']}/complete", headers=user.headers, timeout=10),
        requests.delete(f"{second.url}{tasks}/999999999", headers=user.headers, timeout=10),
        requests.post(first.url + tasks, json={"title": ""}, headers=user.headers, timeout=10),
        requests.post(f"{second.url}/api/{user.id}/chat", json={"message": "hi"}, headers=user.headers, timeout=30),
    ]
    assert [w.status_code for w in writes] == [200, 200, 404, 422, 200]
    refused = requests.delete(f"{first.url}{tasks}/{task['id']}", headers=user.headers, timeout=10)
    assert refused.status_code == 429
    assert stored_tasks(app_url, user.id) == 1


def test_writes_of_one_user_do_not_limit_another(two_write_limited_instances):
    alice, bob = make_user("alice"), make_user("bob")
    server = two_write_limited_instances[0]
    for n in range(WRITE_LIMIT + 1):
        requests.post(f"{server.url}/api/{alice.id}/tasks", json={"title": f"{n}"}, headers=alice.headers, timeout=10)
    assert requests.post(f"{server.url}/api/{bob.id}/tasks", json={"title": "mine"}, headers=bob.headers,
                         timeout=10).status_code == 201


def test_the_default_write_limit_is_600_a_minute(app_url):
    """A burst of 600, then one write per 0.1 s: with the user's state set one
    second short of a full budget, 10 writes pass (plus what refills while
    they run), then 429."""
    user = make_user()
    with built_app(app_url) as app:
        client = app.test_client()
        started = time.monotonic()
        with connect(app_url, user.id) as conn:
            conn.execute("insert into write_rate_limit (user_id, tat) values (%s, now() + interval '59 seconds')",
                         (user.id,))
            conn.commit()
        statuses = []
        while 429 not in statuses and len(statuses) < 1000:
            statuses.append(client.delete(f"/api/{user.id}/tasks/1", headers=user.headers).status_code)
        elapsed = time.monotonic() - started
    admitted = statuses.count(404)
    assert statuses[-1] == 429 and set(statuses[:-1]) == {404}
    assert 10 <= admitted <= 10 + int(elapsed * 10) + 1, (admitted, elapsed)


def test_off_disables_the_write_limit(app_url):
    assert load_settings({"DATABASE_URL": "postgresql://h/db"}).write_rate_limit == (600, 60)
    assert load_settings({"DATABASE_URL": "postgresql://h/db", "WRITE_RATE_LIMIT": "off"}).write_rate_limit is None
    with pytest.raises(ConfigError, match="^WRITE_RATE_LIMIT"):
        load_settings({"DATABASE_URL": "postgresql://h/db", "WRITE_RATE_LIMIT": "many"})
    user = make_user()
    for setting, expected in (("2/minute", [201, 201, 429]), ("off", [201, 201, 201])):
        with built_app(app_url, WRITE_RATE_LIMIT=setting) as app:
            client = app.test_client()
            assert [client.post(f"/api/{user.id}/tasks", json={"title": "x"},
                                headers=user.headers).status_code for _ in range(3)] == expected
        user = make_user()


@pytest.mark.parametrize("key", [None, "over-the-limit"])
def test_a_chat_turn_over_the_write_limit_stores_nothing(app_url, key):
    """The write's step is part of the statement that stores the message (or,
    with a key, goes out with the binding): refused, it stores nothing, in a
    new conversation or an existing one."""
    user = make_user()
    with built_app(app_url, WRITE_RATE_LIMIT="2/minute") as app:
        client = app.test_client()
        first = client.post(f"/api/{user.id}/chat", json={"message": "one"}, headers=user.headers)
        conversation_id = first.get_json()["conversation_id"]
        assert client.post(f"/api/{user.id}/chat", json={"message": "two", "conversation_id": conversation_id},
                           headers=user.headers).status_code == 200
        headers = {**user.headers, **({"Idempotency-Key": key} if key else {})}
        for body in ({"message": "three", "conversation_id": conversation_id}, {"message": "elsewhere"}):
            refused = client.post(f"/api/{user.id}/chat", json=body, headers=headers)
            assert refused.status_code == 429, refused.get_json()
            assert "writes" in refused.get_json()["error"]["message"] and int(refused.headers["Retry-After"]) >= 1
    assert stored_messages(app_url, user.id) == 4
    with connect(app_url, user.id) as conn:
        assert conn.execute("select count(*) from conversation").fetchone()[0] == 1
