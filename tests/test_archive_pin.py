"""Archiving and pinning conversations (PATCH), and the list they change:
archived ones apart, pinned ones first, keyset pages exact in that order,
cursors written before pinning existed still read."""
from __future__ import annotations

import base64
import json
import re
import uuid
from datetime import datetime

import pytest
from psycopg import sql
from sqlalchemy import event
from support import connect

from chat_blueprint.db.extensions import db


def chat(client, user, message, conversation_id=None) -> str:
    body = {"message": message, **({"conversation_id": conversation_id} if conversation_id else {})}
    response = client.post(f"/api/{user.id}/chat", json=body, headers=user.headers)
    assert response.status_code == 200
    return response.get_json()["conversation_id"]


def patch(client, user, conversation_id, **changes) -> dict:
    response = client.patch(f"/api/{user.id}/conversations/{conversation_id}", json=changes, headers=user.headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def listed(client, user, limit=100, **query) -> list[str]:
    """Every id of the list, read `limit` at a time through the cursors."""
    seen, cursor = [], None
    while True:
        page = client.get(f"/api/{user.id}/conversations", headers=user.headers,
                          query_string={"limit": limit, **query, **({"cursor": cursor} if cursor else {})}).get_json()
        assert len(page["data"]) <= limit
        seen += [conversation["id"] for conversation in page["data"]]
        if (cursor := page["next_cursor"]) is None:
            return seen


def test_new_conversations_are_neither_archived_nor_pinned(client, alice):
    conversation_id = chat(client, alice, "hello")
    shown = client.get(f"/api/{alice.id}/conversations/{conversation_id}", headers=alice.headers).get_json()
    assert shown["archived"] is False and shown["pinned"] is False


def test_archived_conversations_leave_the_list_and_come_back(client, alice):
    kept, archived = chat(client, alice, "kept"), chat(client, alice, "put away")
    before = client.get(f"/api/{alice.id}/conversations/{archived}", headers=alice.headers).get_json()
    assert patch(client, alice, archived, archived=True) == {**before, "archived": True}  # updated_at stays
    assert listed(client, alice) == [kept]
    assert listed(client, alice, archived="true") == [archived]
    assert listed(client, alice, archived="false") == [kept]
    chat(client, alice, "a turn leaves it archived", archived)
    assert listed(client, alice, archived="true") == [archived]
    patch(client, alice, archived, archived=False)
    assert listed(client, alice) == [archived, kept]


def test_pinned_first_then_most_recently_updated_in_exact_pages(client, alice):
    ids = [chat(client, alice, f"conversation {n}") for n in range(9)]
    for n in (1, 4, 6):
        patch(client, alice, ids[n], pinned=True)
    patch(client, alice, ids[7], archived=True, pinned=True)
    chat(client, alice, "bump", ids[2])
    chat(client, alice, "bump", ids[4])
    expected = [ids[4], ids[6], ids[1], ids[2], ids[8], ids[5], ids[3], ids[0]]
    for limit in (1, 2, 3, 8, 100):
        assert listed(client, alice, limit) == expected, limit
    assert listed(client, alice, 1, archived="true") == [ids[7]]
    patch(client, alice, ids[4], pinned=False)
    assert listed(client, alice, 2)[:3] == [ids[6], ids[1], ids[4]]


def test_one_patch_can_rename_archive_and_pin(client, alice):
    conversation_id = chat(client, alice, "first words")
    changed = patch(client, alice, conversation_id, title="Trip", archived=True, pinned=True)
    assert (changed["title"], changed["archived"], changed["pinned"]) == ("Trip", True, True)
    assert patch(client, alice, conversation_id, pinned=False)["title"] == "Trip"


def test_another_users_conversation_cannot_be_archived_or_pinned(client, alice, bob):
    conversation_id = chat(client, alice, "mine")
    for change in ({"archived": True}, {"pinned": True}):
        response = client.patch(f"/api/{bob.id}/conversations/{conversation_id}", json=change, headers=bob.headers)
        assert response.status_code == 404
    assert listed(client, alice) == [conversation_id]


def cursor_of(*values) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def test_a_cursor_written_before_pinning_is_a_position_among_the_unpinned(client, alice):
    ids = [chat(client, alice, f"older list {n}") for n in range(4)]
    patch(client, alice, ids[0], pinned=True)
    page = client.get(f"/api/{alice.id}/conversations?limit=2", headers=alice.headers).get_json()
    assert [c["id"] for c in page["data"]] == [ids[0], ids[3]]
    last = page["data"][-1]
    old = cursor_of(last["updated_at"].replace("Z", "+00:00"), last["id"])  # [updated_at, id]
    rest = client.get(f"/api/{alice.id}/conversations", query_string={"cursor": old}, headers=alice.headers)
    assert [c["id"] for c in rest.get_json()["data"]] == [ids[2], ids[1]]


@pytest.mark.parametrize("values", [
    ("true", "2026-01-01T00:00:00+00:00", "00000000-0000-0000-0000-000000000000"),
    (1, "2026-01-01T00:00:00+00:00", "00000000-0000-0000-0000-000000000000"),
    (None, "2026-01-01T00:00:00+00:00", "00000000-0000-0000-0000-000000000000"),
    (True, "2026-01-01T00:00:00+00:00", "00000000-0000-0000-0000-000000000000", 1),
    (True, "2026-01-01T00:00:00", "00000000-0000-0000-0000-000000000000"),
])
def test_a_cursor_with_a_bad_pinned_flag_is_422(client, alice, values):
    response = client.get(f"/api/{alice.id}/conversations", query_string={"cursor": cursor_of(*values)},
                          headers=alice.headers)
    assert response.status_code == 422 and list(response.get_json()["error"]["fields"]) == ["cursor"]


SQL_TYPES = {str: "text", bool: "boolean", int: "bigint", datetime: "timestamptz", uuid.UUID: "uuid"}


@pytest.mark.parametrize("archived, index", [("false", "ix_conversation_user_listed"),
                                             ("true", "ix_conversation_user_archived")])
def test_the_list_reads_its_page_off_an_index(app, app_url, alice, archived, index):
    """The list's statement, as the app sends it (a cursor too), as a generic
    plan (what a prepared statement may use): an index scan of the partial
    index for that side, in the list's order, that stops after the page."""
    client = app.test_client()
    ids = [chat(client, alice, f"indexed {n}") for n in range(3)]
    for conversation_id in ids:
        patch(client, alice, conversation_id, archived=archived == "true")
    sent = []

    def record(conn, cursor, statement, parameters, context, executemany):
        sent.append((statement, parameters))

    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", record)
        try:
            first = client.get(f"/api/{alice.id}/conversations?limit=1&archived={archived}", headers=alice.headers)
            client.get(f"/api/{alice.id}/conversations?limit=1&archived={archived}&cursor="
                       f"{first.get_json()['next_cursor']}", headers=alice.headers)
        finally:
            event.remove(db.engine, "before_cursor_execute", record)
    statements = [(statement, parameters) for statement, parameters in sent if "ORDER BY" in statement]
    assert len(statements) == 2
    with connect(app_url, alice.id) as conn:
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        for n, (statement, parameters) in enumerate(statements):
            names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", statement)))
            for position, name in enumerate(names, 1):
                statement = statement.replace(f"%({name})s", f"${position}")
            types = [SQL_TYPES[type(parameters[name])] for name in names]
            conn.execute(f"PREPARE page_{n} ({', '.join(types)}) AS {statement}")
            values = sql.SQL(", ").join(sql.Literal(parameters[name]) for name in names)  # a utility statement
            plan = "\n".join(row[0] for row in conn.execute(                                # takes no parameters
                sql.SQL("EXPLAIN EXECUTE {}({})").format(sql.Identifier(f"page_{n}"), values)))
            assert "$1" in plan  # a generic plan: the values are not in it
            assert f"Index Scan using {index} on conversation" in plan and "Sort" not in plan, plan
