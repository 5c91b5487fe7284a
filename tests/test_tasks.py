"""The Basic Level todo API through the Flask test client, with real commits
on the real database as the app role."""
from __future__ import annotations

import pytest
from conftest import connect


def add(client, user, **body):
    response = client.post(f"/api/{user.id}/tasks", json=body, headers=user.headers)
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_add_returns_the_stored_task(client, alice, app_url):
    task = add(client, alice, title="buy milk", description="two litres")
    assert task["title"] == "buy milk" and task["description"] == "two litres"
    assert task["completed"] is False and task["user_id"] == alice.id
    assert task["created_at"].endswith("Z") and task["updated_at"] == task["created_at"]
    with connect(app_url, alice.id) as conn:
        assert conn.execute("select title, description from task where id = %s",
                            (task["id"],)).fetchone() == ("buy milk", "two litres")


def test_description_is_optional(client, alice):
    assert add(client, alice, title="x")["description"] == ""
    assert add(client, alice, title="y", description=None)["description"] == ""


def test_list_is_newest_first_and_filters_by_status(client, alice):
    first, second, third = (add(client, alice, title=title) for title in ("one", "two", "three"))
    client.patch(f"/api/{alice.id}/tasks/{second['id']}/complete", headers=alice.headers)
    listed = client.get(f"/api/{alice.id}/tasks", headers=alice.headers).get_json()
    assert [task["id"] for task in listed] == [third["id"], second["id"], first["id"]]
    pending = client.get(f"/api/{alice.id}/tasks?status=pending", headers=alice.headers).get_json()
    completed = client.get(f"/api/{alice.id}/tasks?status=completed", headers=alice.headers).get_json()
    assert [task["id"] for task in pending] == [third["id"], first["id"]]
    assert [task["id"] for task in completed] == [second["id"]]


def test_view(client, alice):
    task = add(client, alice, title="view me")
    response = client.get(f"/api/{alice.id}/tasks/{task['id']}", headers=alice.headers)
    assert response.status_code == 200 and response.get_json() == task


def test_update_either_or_both(client, alice):
    task = add(client, alice, title="old", description="old text")
    url = f"/api/{alice.id}/tasks/{task['id']}"
    updated = client.put(url, json={"title": "new"}, headers=alice.headers).get_json()
    assert (updated["title"], updated["description"]) == ("new", "old text")
    updated = client.put(url, json={"description": "new text"}, headers=alice.headers).get_json()
    assert (updated["title"], updated["description"]) == ("new", "new text")
    updated = client.put(url, json={"title": "both", "description": ""}, headers=alice.headers).get_json()
    assert (updated["title"], updated["description"]) == ("both", "")
    assert updated["updated_at"] > task["updated_at"]
    assert client.get(url, headers=alice.headers).get_json() == updated


def test_complete_toggles(client, alice):
    task = add(client, alice, title="toggle")
    url = f"/api/{alice.id}/tasks/{task['id']}/complete"
    assert client.patch(url, headers=alice.headers).get_json()["completed"] is True
    assert client.patch(url, headers=alice.headers).get_json()["completed"] is False


def test_delete(client, alice):
    task = add(client, alice, title="bye")
    url = f"/api/{alice.id}/tasks/{task['id']}"
    response = client.delete(url, headers=alice.headers)
    assert response.status_code == 204 and response.data == b""
    assert client.get(url, headers=alice.headers).status_code == 404
    assert client.delete(url, headers=alice.headers).status_code == 404


@pytest.mark.parametrize("method, suffix, body", [
    ("get", "", None),
    ("put", "", {"title": "stolen"}),
    ("delete", "", None),
    ("patch", "/complete", None),
])
def test_another_users_task_is_404_and_untouched(client, alice, bob, method, suffix, body):
    task = add(client, alice, title="alice's")
    kwargs = {"headers": bob.headers, **({"json": body} if body else {})}
    response = getattr(client, method)(f"/api/{bob.id}/tasks/{task['id']}{suffix}", **kwargs)
    assert response.status_code == 404
    assert response.get_json()["error"]["code"] == "task_not_found"
    assert client.get(f"/api/{alice.id}/tasks/{task['id']}", headers=alice.headers).get_json() == task
    assert client.get(f"/api/{bob.id}/tasks", headers=bob.headers).get_json() == []


def test_unknown_and_out_of_range_ids_are_404(client, alice):
    for task_id in ("999999999", "9223372036854775807", "9223372036854775808", "99999999999999999999", "0", "-1",
                    "abc"):
        response = client.get(f"/api/{alice.id}/tasks/{task_id}", headers=alice.headers)
        assert response.status_code == 404, task_id
        assert "error" in response.get_json()


@pytest.mark.parametrize("body, field", [
    ({}, "title"),
    ({"title": ""}, "title"),
    ({"title": "   "}, "title"),
    ({"title": "x" * 201}, "title"),
    ({"title": 7}, "title"),
    ({"title": None}, "title"),
    ({"title": ["a"]}, "title"),
    ({"title": "ok", "description": "d" * 1001}, "description"),
    ({"title": "ok", "description": 5}, "description"),
    ({"title": "ok", "completed": True}, "completed"),
    ({"title": "nul\u0000byte"}, "title"),
    ({"title": "\ud800"}, "title"),
])
def test_add_validation(client, alice, body, field):
    response = client.post(f"/api/{alice.id}/tasks", json=body, headers=alice.headers)
    assert response.status_code == 422, body
    error = response.get_json()["error"]
    assert error["code"] == "validation_failed" and field in error["fields"]
    assert client.get(f"/api/{alice.id}/tasks", headers=alice.headers).get_json() == []


def test_title_limits_are_inclusive(client, alice):
    assert len(add(client, alice, title="x" * 200, description="d" * 1000)["title"]) == 200


@pytest.mark.parametrize("body", [{}, {"title": ""}, {"title": None}, {"user_id": "someone"}, {"completed": True}])
def test_update_validation(client, alice, body):
    task = add(client, alice, title="keep")
    response = client.put(f"/api/{alice.id}/tasks/{task['id']}", json=body, headers=alice.headers)
    assert response.status_code == 422
    assert client.get(f"/api/{alice.id}/tasks/{task['id']}", headers=alice.headers).get_json() == task


def test_bad_status_filter_is_422(client, alice):
    response = client.get(f"/api/{alice.id}/tasks?status=done", headers=alice.headers)
    assert response.status_code == 422
    assert "status" in response.get_json()["error"]["fields"]


@pytest.mark.parametrize("data", [b"{", b"not json", b"\xff\xfe", b"[1, 2]", b'"text"', b"null", b"[" * 100_000])
def test_bad_json_is_400(client, alice, data):
    response = client.post(f"/api/{alice.id}/tasks", data=data, content_type="application/json",
                           headers=alice.headers)
    assert response.status_code == 400
    assert response.get_json()["error"]["code"] == "invalid_json"


def test_body_over_one_mib_is_413(client, alice):
    body = b'{"title": "' + b"x" * (1024 * 1024) + b'"}'
    response = client.post(f"/api/{alice.id}/tasks", data=body, content_type="application/json",
                           headers=alice.headers)
    assert response.status_code == 413
    assert response.get_json()["error"]["code"] == "request_entity_too_large"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_non_json_body_is_415(client, alice, content_type):
    kwargs = {"content_type": content_type} if content_type else {}
    response = client.post(f"/api/{alice.id}/tasks", data=b'{"title": "x"}', headers=alice.headers, **kwargs)
    assert response.status_code == 415
    assert response.get_json()["error"]["code"] == "unsupported_media_type"


def test_json_with_charset_is_accepted(client, alice):
    response = client.post(f"/api/{alice.id}/tasks", data=b'{"title": "x"}',
                           content_type="application/json; charset=utf-8", headers=alice.headers)
    assert response.status_code == 201


def test_wrong_method_is_405_json(client, alice):
    response = client.post(f"/api/{alice.id}/tasks/1/complete", headers=alice.headers)
    assert response.status_code == 405
    assert response.get_json()["error"]["code"] == "method_not_allowed"
    assert "PATCH" in response.headers["Allow"]


def test_unknown_route_is_404_json(client):
    response = client.get("/nowhere")
    assert response.status_code == 404 and response.is_json
