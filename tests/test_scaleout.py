"""The chat endpoint scaled out as a deployment would run it:

    client ─> nginx (round robin) ─> gunicorn × 2 ─> PgBouncer (transaction pooling) ─> PostgreSQL

nginx and PgBouncer come from the distribution's packages (see tests/stack.py);
the app runs with DATABASE_PREPARED_STATEMENTS=off, as PgBouncer's transaction
pooling requires before 1.21. Turns continue across instances, a burst on one
conversation loses nothing, users stay isolated, and a transaction-local
`app.user_id` does not outlive its transaction on a shared server connection.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests

from chat_blueprint.auth import MAX_TOKEN_BYTES, mint_token
from support import SECRET, assert_burst_stored, connect, make_user
from stack import scaled_out

SIMULTANEOUS = 24


@pytest.fixture(scope="module")
def deployment(cluster):
    with scaled_out(cluster, instances=2, workers=1, threads=16) as deployment:
        print(f"\nPgBouncer {'.'.join(map(str, deployment.pooler.version))} in transaction mode, "
              f"nginx over {len(deployment.instances)} gunicorn instances")
        yield deployment


def post_chat(url, user, message, conversation_id=None):
    body = {"message": message, **({"conversation_id": conversation_id} if conversation_id else {})}
    return requests.post(f"{url}/api/{user.id}/chat", json=body, headers=user.headers, timeout=30)


def upstreams(deployment) -> set[str]:
    return {server.url.removeprefix("http://") for server in deployment.instances}


def test_a_conversation_continues_across_instances(deployment):
    user = make_user()
    conversation_id, served_by = None, []
    for turn in range(1, 7):
        response = post_chat(deployment.url, user, f"message {turn}", conversation_id)
        assert response.status_code == 200, response.text
        answer = response.json()
        conversation_id = answer["conversation_id"]
        assert f"turn {turn}:" in answer["response"]
        served_by.append(response.headers["X-Upstream"])
    assert set(served_by) == upstreams(deployment), served_by
    history = requests.get(f"{deployment.url}/api/{user.id}/conversations/{conversation_id}/messages",
                           headers=user.headers, timeout=30).json()["data"]
    assert [m["content"] for m in history if m["role"] == "user"] == [f"message {n}" for n in range(1, 7)]


def test_simultaneous_posts_through_the_balancer_lose_nothing(deployment, app_url):
    user = make_user()
    conversation_id = post_chat(deployment.url, user, "start").json()["conversation_id"]

    with ThreadPoolExecutor(SIMULTANEOUS) as pool:
        responses = list(pool.map(lambda n: post_chat(deployment.url, user, f"burst {n}", conversation_id),
                                  range(SIMULTANEOUS)))
    failed = [r.text for r in responses if r.status_code != 200]
    assert failed == []
    assert {r.headers["X-Upstream"] for r in responses} == upstreams(deployment)
    assert_burst_stored(app_url, user, conversation_id, [r.json() for r in responses], SIMULTANEOUS)


def test_users_stay_isolated_behind_the_balancer(deployment):
    alice, bob = make_user("alice"), make_user("bob")
    conversation_id = post_chat(deployment.url, alice, "secret").json()["conversation_id"]
    for _ in range(2):  # one attempt per instance, round robin
        assert post_chat(deployment.url, bob, "let me in", conversation_id).status_code == 404
        listed = requests.get(f"{deployment.url}/api/{bob.id}/conversations", headers=bob.headers, timeout=30)
        assert listed.status_code == 200 and listed.json()["data"] == []
        read = requests.get(f"{deployment.url}/api/{bob.id}/conversations/{conversation_id}/messages",
                            headers=bob.headers, timeout=30)
        assert read.status_code == 404
    mine = requests.get(f"{deployment.url}/api/{alice.id}/conversations/{conversation_id}/messages",
                        headers=alice.headers, timeout=30).json()["data"]
    assert [m["content"] for m in mine] == ["secret", mine[1]["content"]] and mine[1]["role"] == "assistant"


def test_the_app_goes_through_transaction_pooling(deployment):
    with psycopg.connect(deployment.pooler.admin_url(), autocommit=True, cursor_factory=psycopg.ClientCursor) as admin:
        def pool():
            cursor = admin.execute("SHOW POOLS")
            names = [column.name for column in cursor.description]
            return next(dict(zip(names, row)) for row in cursor.fetchall() if row[0] == "chat")

        def transactions():
            cursor = admin.execute("SHOW STATS")
            names = [column.name for column in cursor.description]
            return next(dict(zip(names, row)) for row in cursor.fetchall() if row[0] == "chat")["total_xact_count"]

        before = transactions()
        user = make_user()
        assert post_chat(deployment.url, user, "counted").status_code == 200
        assert pool()["pool_mode"] == "transaction"
        assert transactions() >= before + 2  # a turn is two transactions


def test_a_user_setting_ends_with_its_transaction_on_a_shared_server_connection(deployment, app_url,
                                                                                superuser_url):
    """Two clients of PgBouncer take turns on one server connection (it reuses
    the most recently released one): what the first bound with
    set_config(..., true) is gone for the second. The control shows the test
    would see a leak: a session-level setting does reach the next client."""
    alice = make_user("alice")
    url = deployment.pooler.url()
    with psycopg.connect(url) as first:
        first.execute("select set_config('app.user_id', %s, true)", (alice.id,))
        backend = first.execute("select pg_backend_pid()").fetchone()[0]
        first.execute("insert into task (user_id, title) values (%s, 'pooled')", (alice.id,))
        first.commit()
    with psycopg.connect(url) as second:
        row = second.execute("select pg_backend_pid(), current_setting('app.user_id', true),"
                             " (select count(*) from task)").fetchone()
        second.commit()
    assert row[0] == backend, "PgBouncer did not hand the second client the same server connection"
    assert row[1:] == ("", 0)

    with psycopg.connect(url) as first, psycopg.connect(url) as second:
        leaky = first.execute("select pg_backend_pid(), set_config('app.user_id', %s, false)",
                              (alice.id,)).fetchone()[0]
        first.commit()
        try:
            leaked = second.execute("select pg_backend_pid(), current_setting('app.user_id', true)").fetchone()
            second.commit()
            assert leaked == (leaky, alice.id)
        finally:
            with psycopg.connect(superuser_url, autocommit=True) as admin:
                admin.execute("select pg_terminate_backend(%s)", (leaky,))
    with connect(app_url, alice.id) as conn:
        assert conn.execute("select count(*) from task where title = 'pooled'").fetchone()[0] == 1


def test_prepared_statements_do_not_survive_transaction_pooling(deployment):
    """Why the app runs with DATABASE_PREPARED_STATEMENTS=off here: psycopg
    names its prepared statements per client connection (_pg3_0, _pg3_1, ...),
    while PgBouncer (before 1.21, or with max_prepared_statements = 0) hands
    each transaction any server connection, where that name may be missing or
    taken by another client's statement."""
    url = deployment.pooler.url()
    with psycopg.connect(url, prepare_threshold=0) as first, psycopg.connect(url, prepare_threshold=0) as second:
        assert first.execute("select %s::int + 1", (1,)).fetchone() == (2,)
        first.commit()
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            second.execute("select %s::text", ("another statement",))
        second.rollback()
    with psycopg.connect(url, prepare_threshold=None) as first, psycopg.connect(url, prepare_threshold=None) as second:
        for _ in range(3):
            assert first.execute("select %s::int + 1", (1,)).fetchone() == (2,)
            first.commit()
            assert second.execute("select %s::text", ("another statement",)).fetchone() == ("another statement",)
            second.commit()


def test_a_stream_arrives_through_nginx_and_pgbouncer_as_it_is_produced(cluster):
    """nginx buffers responses by default; the stream's X-Accel-Buffering: no turns that off for it."""
    import json
    import time

    from fake_llm import FakeChatCompletions, streamed

    pieces = [f"p{n} " for n in range(6)]
    with FakeChatCompletions(default=streamed(pieces, interval_s=0.4)) as llm, \
            scaled_out(cluster, instances=1, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url,
                       ASSISTANT_MODEL="fake-model") as stream_deployment:
        user = make_user()
        started = time.monotonic()
        response = requests.post(f"{stream_deployment.url}/api/{user.id}/chat",
                                 json={"message": "through the proxy", "stream": True}, headers=user.headers,
                                 stream=True, timeout=30)
        assert response.status_code == 200 and response.headers["Content-Type"] == "text/event-stream"
        arrivals = []
        for line in response.iter_lines(chunk_size=1, decode_unicode=True):
            if line.startswith("data: {"):
                arrivals.append((json.loads(line.removeprefix("data: "))["type"], time.monotonic() - started))
    kinds = [kind for kind, _ in arrivals]
    first_delta = next(at for kind, at in arrivals if kind == "text-delta")
    finished = next(at for kind, at in arrivals if kind == "finish")
    assert kinds[-1] == "finish" and kinds.count("text-delta") == len(pieces)
    assert finished - first_delta > 1.5, arrivals  # the upstream spreads its pieces over 2.4 s


def test_a_token_of_nearly_16_kib_passes_the_balancer(deployment):
    """Better Auth puts the whole user row in its claims; nginx's default header
    buffers (8 KiB) would refuse such a token with an HTML 400."""
    user = make_user("big-token")
    token = mint_token(SECRET, user.id, profile="x" * 11_800)
    assert MAX_TOKEN_BYTES - 500 < len(token) <= MAX_TOKEN_BYTES
    answer = requests.get(f"{deployment.url}/api/{user.id}/tasks", headers={"Authorization": f"Bearer {token}"},
                          timeout=10)
    assert answer.status_code == 200, answer.text[:300]


def test_stop_and_resume_through_nginx_and_pgbouncer(cluster):
    """Two instances behind the balancer and transaction pooling: a resumption
    through nginx follows the reply, and a stop through nginx ends both streams,
    whichever instance each request reaches."""
    import json
    import threading
    import time

    from fake_llm import FakeChatCompletions, streamed

    pieces = [f"q{n} " for n in range(20)]

    def events(response) -> list[dict]:
        lines = response.iter_lines(chunk_size=1, decode_unicode=True)
        return [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]

    with FakeChatCompletions(default=streamed(pieces, interval_s=0.25)) as llm, \
            scaled_out(cluster, instances=2, ASSISTANT="openai", ASSISTANT_BASE_URL=llm.base_url,
                       ASSISTANT_MODEL="fake-model", CHAT_STREAM_FLUSH_S="0.5") as stream_deployment:
        user, url = make_user(), stream_deployment.url
        original = requests.post(f"{url}/api/{user.id}/chat", json={"message": "via the proxy", "stream": True},
                                 headers=user.headers, stream=True, timeout=30)
        lines = original.iter_lines(chunk_size=1, decode_unicode=True)
        start = json.loads(next(line for line in lines if line.startswith("data: {")).removeprefix("data: "))
        conversation_id = start["messageMetadata"]["conversation_id"]
        rest = []
        reader = threading.Thread(target=lambda: rest.extend(
            json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")))
        reader.start()
        time.sleep(1.5)
        resumed = requests.get(f"{url}/api/{user.id}/chat/{conversation_id}/stream", headers=user.headers,
                               stream=True, timeout=30)
        assert resumed.status_code == 200
        followed = []
        follower = threading.Thread(target=lambda: followed.extend(events(resumed)))
        follower.start()
        time.sleep(1.5)
        stopped = requests.post(f"{url}/api/{user.id}/conversations/{conversation_id}/stop", headers=user.headers,
                                timeout=30)
        assert stopped.status_code == 200 and stopped.json()["stopped"] is True
        reader.join(15)
        follower.join(15)
    assert rest[-1]["type"] == "abort" and followed[-1]["type"] == "abort", (rest[-3:], followed[-3:])
    assert followed[0] == start
    sent = "".join(event["delta"] for event in rest if event["type"] == "text-delta")
    assert "".join(event["delta"] for event in followed if event["type"] == "text-delta") == sent
    assert sent and sent != "".join(pieces)
