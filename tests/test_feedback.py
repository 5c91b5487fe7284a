"""Feedback on assistant messages (PUT .../messages/{id}/feedback) on the real
database: the message shape, what is refused, the export, and the counter
in /metrics, in-process and merged over gunicorn workers."""
from __future__ import annotations

import pytest
import requests
from prometheus_client import REGISTRY
from support import connect, make_user


def turn(client, user, message="how do I plan my week?", conversation_id=None) -> dict:
    body = {"message": message, **({"conversation_id": conversation_id} if conversation_id else {})}
    response = client.post(f"/api/{user.id}/chat", json=body, headers=user.headers)
    assert response.status_code == 200
    return response.get_json()


def put_feedback(client, user, conversation_id, message_id, body):
    return client.put(f"/api/{user.id}/conversations/{conversation_id}/messages/{message_id}/feedback", json=body,
                      headers=user.headers)


def messages(client, user, conversation_id) -> list[dict]:
    return client.get(f"/api/{user.id}/conversations/{conversation_id}/messages",
                      headers=user.headers).get_json()["data"]


def counted(rating: str, model: str = "builtin") -> float:
    return REGISTRY.get_sample_value("assistant_feedback_total", {"rating": rating, "model": model}) or 0.0


def test_a_rating_is_part_of_the_message(client, alice):
    answer = turn(client, alice)
    reply = answer["assistant_message_id"]
    assert [m["feedback"] for m in messages(client, alice, answer["conversation_id"])] == [None, None]
    response = put_feedback(client, alice, answer["conversation_id"], reply, {"rating": "down", "comment": "vague"})
    assert response.status_code == 200
    given = response.get_json()
    assert given["id"] == reply and given["role"] == "assistant" and given["content"] == answer["response"]
    assert {**given["feedback"], "updated_at": None} == {"rating": "down", "comment": "vague", "updated_at": None}
    assert given["feedback"]["updated_at"].endswith("Z")
    listed = messages(client, alice, answer["conversation_id"])
    assert listed[1] == given and listed[0]["feedback"] is None


def test_a_put_replaces_the_feedback_and_null_clears_it(client, alice):
    answer = turn(client, alice)
    where = (answer["conversation_id"], answer["assistant_message_id"])
    cases = [({"rating": "up", "comment": "great"}, {"rating": "up", "comment": "great"}),
             ({"rating": "down"}, {"rating": "down", "comment": None}),  # no comment: the old one goes
             ({"rating": None, "comment": "cut off mid-sentence"}, {"rating": None, "comment": "cut off mid-sentence"}),
             ({"rating": "up", "comment": ""}, {"rating": "up", "comment": None}),
             ({"rating": None}, None), ({"rating": None, "comment": None}, None)]
    for body, expected in cases:
        feedback = put_feedback(client, alice, *where, body).get_json()["feedback"]
        if expected is None:
            assert feedback is None, body
        else:
            assert {key: feedback[key] for key in ("rating", "comment")} == expected, body


def test_feedback_does_not_move_the_conversation(client, alice):
    answer = turn(client, alice)
    url = f"/api/{alice.id}/conversations/{answer['conversation_id']}"
    before = client.get(url, headers=alice.headers).get_json()
    assert put_feedback(client, alice, answer["conversation_id"], answer["assistant_message_id"],
                        {"rating": "up"}).status_code == 200
    assert client.get(url, headers=alice.headers).get_json() == before


def test_feedback_on_a_user_message_is_422_and_changes_nothing(client, alice, app_url):
    answer = turn(client, alice)
    response = put_feedback(client, alice, answer["conversation_id"], answer["user_message_id"], {"rating": "up"})
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "not_an_assistant_message"
    with connect(app_url, alice.id) as conn:
        assert conn.execute("SELECT count(*) FROM message WHERE feedback_updated_at IS NOT NULL").fetchone()[0] == 0


def test_a_message_outside_the_conversation_or_the_user_is_404(client, alice, bob):
    first, second = turn(client, alice), turn(client, alice, "another")
    theirs = turn(client, bob)
    for conversation_id, message_id, user in (
            (second["conversation_id"], first["assistant_message_id"], alice),  # another conversation's
            (theirs["conversation_id"], theirs["assistant_message_id"], alice),  # another user's
            (first["conversation_id"], 9_000_000_000, alice),  # none
            (first["conversation_id"], 2**63, alice),  # beyond bigint
            ("00000000-0000-0000-0000-000000000000", first["assistant_message_id"], alice)):
        response = put_feedback(client, user, conversation_id, message_id, {"rating": "up"})
        assert response.status_code == 404, (conversation_id, message_id)
        assert response.get_json()["error"]["code"] == "message_not_found"
    assert messages(client, bob, theirs["conversation_id"])[1]["feedback"] is None


@pytest.mark.parametrize("body, field", [
    ({}, "rating"), ({"rating": "meh"}, "rating"), ({"rating": 1}, "rating"), ({"rating": True}, "rating"),
    ({"rating": "up", "comment": "x" * 2001}, "comment"), ({"rating": "up", "comment": "a\x00b"}, "comment"),
    ({"rating": "up", "comment": 5}, "comment"), ({"rating": "up", "stars": 5}, "stars"),
])
def test_bad_feedback_is_422_and_changes_nothing(client, alice, body, field):
    answer = turn(client, alice)
    response = put_feedback(client, alice, answer["conversation_id"], answer["assistant_message_id"], body)
    assert response.status_code == 422 and field in response.get_json()["error"]["fields"]
    assert messages(client, alice, answer["conversation_id"])[1]["feedback"] is None


def test_the_longest_comment_is_kept(client, alice):
    answer = turn(client, alice)
    comment = "é" * 2000
    response = put_feedback(client, alice, answer["conversation_id"], answer["assistant_message_id"],
                            {"rating": "down", "comment": comment})
    assert response.status_code == 200 and response.get_json()["feedback"]["comment"] == comment


def test_changes_of_rating_are_counted_by_model(client, alice):
    answer = turn(client, alice)
    where = (answer["conversation_id"], answer["assistant_message_id"])
    before = {rating: counted(rating) for rating in ("up", "down", "none")}
    for body in ({"rating": "down"}, {"rating": "down", "comment": "again, with a comment"}, {"rating": "up"},
                 {"rating": None}, {"rating": None, "comment": "no rating"}):
        assert put_feedback(client, alice, *where, body).status_code == 200
    assert {rating: counted(rating) - before[rating] for rating in before} == {"up": 1, "down": 1, "none": 1}


def test_the_counter_is_served_over_gunicorn(shared_server):
    """Multiprocess mode: the count made in a worker shows at /metrics."""
    user = make_user("rater")
    api = f"{shared_server.url}/api/{user.id}"
    answer = requests.post(f"{api}/chat", json={"message": "hello"}, headers=user.headers, timeout=10).json()
    rated = requests.put(f"{api}/conversations/{answer['conversation_id']}/messages/"
                         f"{answer['assistant_message_id']}/feedback", json={"rating": "down"}, headers=user.headers,
                         timeout=10)
    assert rated.status_code == 200
    metrics = requests.get(f"{shared_server.url}/metrics", timeout=10).text
    assert 'assistant_feedback_total{model="builtin",rating="down"}' in metrics


def test_the_export_holds_the_feedback(client, alice):
    answer = turn(client, alice)
    given = put_feedback(client, alice, answer["conversation_id"], answer["assistant_message_id"],
                         {"rating": "up", "comment": "thanks"}).get_json()
    exported = client.get(f"/api/{alice.id}/export", headers=alice.headers).get_json()
    stored = exported["conversations"][0]["messages"]
    assert stored[1]["feedback"] == given["feedback"] and stored[0]["feedback"] is None
