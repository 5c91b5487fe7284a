"""The Basic Level todo API through the Flask test client, with real commits
on the real database as the app role."""
from __future__ import annotations

import re

import pytest
from support import connect


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


def test_a_listed_task_is_the_task_its_own_route_answers(client, alice, app_url):
    """The list builds its items without TaskSchema (task_fields, for speed);
    each item equals what GET /tasks/{id} answers through TaskSchema, for a
    timestamp with microseconds and one on a whole second alike."""
    plain = add(client, alice, title="plain")
    other = add(client, alice, title="é ✓ \u2028 \"quoted\"", description="tab\there")
    with connect(app_url, alice.id) as conn:
        conn.execute("update task set created_at = date_trunc('second', created_at), completed = true "
                     "where id = %s", (plain["id"],))
        conn.commit()
    listed = {task["id"]: task for task in client.get(f"/api/{alice.id}/tasks", headers=alice.headers).get_json()}
    for task_id in (plain["id"], other["id"]):
        single = client.get(f"/api/{alice.id}/tasks/{task_id}", headers=alice.headers).get_json()
        assert listed[task_id] == single
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", listed[plain["id"]]["created_at"])


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


@pytest.mark.parametrize("path", ["tasks/abc", "tasks/-1", "tasks/1.5/complete", "conversations/not-a-uuid",
                                  "conversations/12345/messages"])
def test_a_malformed_id_in_the_path_is_a_short_404_that_says_what_an_id_is(client, alice, path):
    """The finding: Werkzeug's paragraph ("...If you entered the URL manually please check your
    spelling and try again.") was the JSON error's message."""
    response = client.get(f"/api/{alice.id}/{path}", headers=alice.headers)
    assert response.status_code == 404
    error = response.get_json()["error"]
    assert error["code"] == "not_found" and len(error["message"]) < 100
    assert "integer" in error["message"] and "UUID" in error["message"]


def insert_tasks(app_url, user, count: int, *, completed_every: int = 0) -> None:
    """`count` tasks straight into the table as the app role (faster than the API)."""
    with connect(app_url, user.id) as conn:
        conn.execute("insert into task (user_id, title, completed)"
                     " select %s, 'task ' || n, %s > 0 and n %% greatest(%s, 1) = 0 from generate_series(1, %s) n",
                     (user.id, completed_every, completed_every, count))
        conn.commit()


def next_link(response) -> str | None:
    """The URL of `Link: <URL>; rel="next"`, or None without one."""
    link = response.headers.get("Link")
    if link is None:
        return None
    match = re.fullmatch(r'<([^>]+)>; rel="next"', link)
    assert match, link
    return match.group(1)


def follow(client, user, url):
    """Every page from `url` on, by the Link headers: (ids in order, page sizes)."""
    ids, sizes = [], []
    while url:
        response = client.get(url, headers=user.headers)
        assert response.status_code == 200 and isinstance(response.get_json(), list)
        ids += [task["id"] for task in response.get_json()]
        sizes.append(len(response.get_json()))
        url = next_link(response)
        assert url is None or url.startswith(f"/api/{user.id}/tasks?")
    return ids, sizes


def all_ids_newest_first(app_url, user, where: str = "true") -> list[int]:
    with connect(app_url, user.id) as conn:
        return [row[0] for row in conn.execute(f"select id from task where {where} order by created_at desc, id desc")]


def test_the_task_list_is_paged_by_link_headers(client, alice, app_url):
    insert_tasks(app_url, alice, 7)
    add(client, alice, title="newest")
    ids, sizes = follow(client, alice, f"/api/{alice.id}/tasks?limit=3")
    assert ids == all_ids_newest_first(app_url, alice) and sizes == [3, 3, 2]


def test_a_page_keeps_the_status_filter(client, alice, app_url):
    insert_tasks(app_url, alice, 10, completed_every=3)
    ids, sizes = follow(client, alice, f"/api/{alice.id}/tasks?status=completed&limit=2")
    assert ids == all_ids_newest_first(app_url, alice, "completed") and sizes == [2, 1]
    ids, _ = follow(client, alice, f"/api/{alice.id}/tasks?status=pending&limit=4")
    assert ids == all_ids_newest_first(app_url, alice, "not completed")


def test_the_default_page_is_a_thousand_tasks(client, alice, app_url):
    insert_tasks(app_url, alice, 1001)
    first = client.get(f"/api/{alice.id}/tasks", headers=alice.headers)
    assert len(first.get_json()) == 1000 and "limit=1000" in next_link(first)
    ids, sizes = follow(client, alice, f"/api/{alice.id}/tasks")
    assert sizes == [1000, 1] and len(set(ids)) == 1001


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8443", "localhost@evil.example"])
def test_the_next_page_link_is_relative_whatever_the_host_header(client, alice, app_url, host):
    """The finding: the link was absolute, built from the request's Host
    header, so a client or proxy that set it sent the next page elsewhere."""
    insert_tasks(app_url, alice, 2)
    response = client.get(f"/api/{alice.id}/tasks?limit=1", headers={**alice.headers, "Host": host})
    assert response.status_code == 200
    assert next_link(response).startswith(f"/api/{alice.id}/tasks?") and "evil" not in response.headers["Link"]


def test_a_full_last_page_has_no_link(client, alice, app_url):
    insert_tasks(app_url, alice, 4)
    response = client.get(f"/api/{alice.id}/tasks?limit=4", headers=alice.headers)
    assert len(response.get_json()) == 4 and "Link" not in response.headers


@pytest.mark.parametrize("query", ["limit=0", "limit=1001", "limit=x", "cursor=abc", "cursor=WzFd",
                                   "cursor=WyIyMDI2LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwiYSJd"])
def test_bad_task_page_queries_are_422(client, alice, query):
    response = client.get(f"/api/{alice.id}/tasks?{query}", headers=alice.headers)
    assert response.status_code == 422
    assert set(response.get_json()["error"]["fields"]) <= {"limit", "cursor"}


def test_a_cursor_pages_only_its_users_tasks(client, alice, bob, app_url):
    insert_tasks(app_url, alice, 3)
    insert_tasks(app_url, bob, 3)
    cursor = next_link(client.get(f"/api/{alice.id}/tasks?limit=1", headers=alice.headers)).split("cursor=")[1]
    page = client.get(f"/api/{bob.id}/tasks?cursor={cursor}", headers=bob.headers).get_json()
    assert {task["user_id"] for task in page} <= {bob.id}
