"""The user's data: export (a copy of every row) and erasure (every row, in
every table with a user_id), on the real database with RLS in force, and the
export's memory bound measured on a real gunicorn worker."""
from __future__ import annotations

import json
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
import requests
from support import built_app, connect, gunicorn, make_user
from psycopg import sql

from chat_blueprint.services import user_data
from devtools.cluster import APP_ROLE
from devtools.ports import free_port
from chat_blueprint.db.extensions import db


def post_json(client, user, path, body, **headers):
    response = client.post(f"/api/{user.id}{path}", json=body, headers={**user.headers, **headers})
    assert response.status_code in (200, 201), response.get_data(as_text=True)
    return response.get_json()


def get_json(client, user, path):
    response = client.get(f"/api/{user.id}{path}", headers=user.headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def seed_through_the_api(client, user, tag: str) -> None:
    """Two tasks (one completed) and two conversations, the first with two turns."""
    post_json(client, user, "/tasks", {"title": f"{tag} milk", "description": "2 litres"})
    task = post_json(client, user, "/tasks", {"title": f"{tag} bread"})
    assert client.patch(f"/api/{user.id}/tasks/{task['id']}/complete", headers=user.headers).status_code == 200
    first = post_json(client, user, "/chat", {"message": f"{tag} plan my week"}, **{"Idempotency-Key": f"{tag}-1"})
    post_json(client, user, "/chat", {"message": f"{tag} and next week?", "conversation_id": first["conversation_id"]})
    post_json(client, user, "/chat", {"message": f"{tag} a second conversation"})


def what_the_api_lists(client, user) -> dict:
    """The user's rows as the other routes show them, in the export's shape."""
    conversations = get_json(client, user, "/conversations?limit=100")["data"]
    return {
        "user_id": user.id,
        "tasks": get_json(client, user, "/tasks"),
        "conversations": [
            {**conversation, "messages": get_json(client, user, f"/conversations/{conversation['id']}/messages"
                                                                 "?limit=100")["data"]}
            for conversation in conversations
        ],
    }


def export(client, user) -> dict:
    response = client.get(f"/api/{user.id}/export", headers=user.headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    assert response.headers["Content-Disposition"].startswith("attachment")
    return json.loads(response.get_data())


def without_exported_at(document: dict) -> dict:
    return {name: value for name, value in document.items() if name != "exported_at"}


def test_export_holds_exactly_the_users_rows(client, alice, bob, app_url):
    seed_through_the_api(client, alice, "alice")
    seed_through_the_api(client, bob, "bob")
    document = export(client, alice)
    assert list(document) == ["user_id", "exported_at", "tasks", "conversations"]
    assert without_exported_at(document) == what_the_api_lists(client, alice)
    exported_at = datetime.fromisoformat(document["exported_at"].replace("Z", "+00:00"))
    assert abs(datetime.now(timezone.utc) - exported_at) < timedelta(minutes=5)
    with connect(app_url, alice.id) as conn:
        stored = {table: conn.execute(f"select count(*) from {table}").fetchone()[0]
                  for table in ("task", "conversation", "message")}
    assert stored == {"task": 2, "conversation": 2, "message": 6}
    assert len(document["tasks"]) == 2 and len(document["conversations"]) == 2
    assert sum(len(conversation["messages"]) for conversation in document["conversations"]) == 6
    assert [len(conversation["messages"]) for conversation in document["conversations"]] == [2, 4]
    text = json.dumps(document)
    assert "bob" not in text and bob.id not in text


def test_archived_conversations_and_feedback_are_exported(client, alice):
    """The export holds every conversation, archived ones too (the list
    leaves them out), with archived, pinned and each message's feedback."""
    seed_through_the_api(client, alice, "alice")
    conversations = get_json(client, alice, "/conversations")["data"]
    archived, pinned = conversations[0]["id"], conversations[1]["id"]
    for conversation_id, change in ((archived, {"archived": True}), (pinned, {"pinned": True})):
        assert client.patch(f"/api/{alice.id}/conversations/{conversation_id}", json=change,
                            headers=alice.headers).status_code == 200
    reply = get_json(client, alice, f"/conversations/{pinned}/messages")["data"][1]
    rated = client.put(f"/api/{alice.id}/conversations/{pinned}/messages/{reply['id']}/feedback",
                       json={"rating": "down", "comment": "too long"}, headers=alice.headers)
    assert rated.status_code == 200
    document = export(client, alice)
    exported = {conversation["id"]: conversation for conversation in document["conversations"]}
    assert (exported[archived]["archived"], exported[archived]["pinned"]) == (True, False)
    assert (exported[pinned]["archived"], exported[pinned]["pinned"]) == (False, True)
    assert exported[pinned]["messages"][1]["feedback"] == rated.get_json()["feedback"]
    assert [message["feedback"] for message in exported[archived]["messages"]] == [None, None]


def test_export_of_a_user_with_nothing(client):
    nobody = make_user("nobody")
    document = export(client, nobody)
    assert without_exported_at(document) == {"user_id": nobody.id, "tasks": [], "conversations": []}


def test_a_conversation_without_messages_is_exported_with_an_empty_list(client, alice, app_url):
    with connect(app_url, alice.id) as conn:
        conn.execute("insert into conversation (user_id, title) values (%s, 'empty')", (alice.id,))
    [conversation] = export(client, alice)["conversations"]
    assert conversation["title"] == "empty" and conversation["messages"] == []


def test_export_reads_in_batches_and_writes_the_same_document(app, client, alice):
    """Batches of 2 rows: keyset pages inside a conversation (4 messages: two
    full pages and an empty one), server-side cursor pages for tasks."""
    seed_through_the_api(client, alice, "alice")
    post_json(client, alice, "/tasks", {"title": "a third task"})
    whole = export(client, alice)
    with app.app_context():
        batched = json.loads(b"".join(user_data.Export(db.engine, alice.id, batch_rows=2)))
        assert db.engine.pool.checkedout() == 0
    assert without_exported_at(batched) == without_exported_at(whole)


def test_a_client_that_goes_away_frees_the_connection(app, alice, app_url, monkeypatch):
    monkeypatch.setattr(user_data, "EXPORT_CHUNK_CHARS", 16)
    with connect(app_url, alice.id) as conn:
        conversation_id = conn.execute("insert into conversation (user_id, title) values (%s, 't') returning id",
                                       (alice.id,)).fetchone()[0]
        conn.execute("insert into message (conversation_id, user_id, role, content, turn)"
                     " select %s, %s, 'user', 'm' || g, g from generate_series(1, 50) g", (conversation_id, alice.id))
    client = app.test_client()
    response = client.get(f"/api/{alice.id}/export", headers=alice.headers, buffered=False)
    chunks = iter(response.response)
    assert next(chunks).startswith(b'{"user_id"') and next(chunks)
    with app.app_context():
        assert db.engine.pool.checkedout() == 1
        response.close()
        assert db.engine.pool.checkedout() == 0


def test_export_and_erase_of_another_users_path_are_403(client, alice, bob):
    seed_through_the_api(client, bob, "bob")
    before = export(client, bob)
    for method, path in (("get", "export"), ("delete", "data")):
        response = getattr(client, method)(f"/api/{bob.id}/{path}", headers=alice.headers)
        assert response.status_code == 403
        assert response.get_json()["error"]["code"] == "forbidden"
        assert getattr(client, method)(f"/api/{bob.id}/{path}").status_code == 401
    assert without_exported_at(export(client, bob)) == without_exported_at(before)


def test_the_openapi_document_has_both_routes(client):
    document = client.get("/api/openapi.json").get_json()
    exported = document["paths"]["/api/{user_id}/export"]["get"]["responses"]
    assert exported["200"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Export"
    assert exported["200"]["headers"]["Content-Disposition"]["required"] is True
    assert {"401", "403", "503"} <= set(exported)
    erased = document["paths"]["/api/{user_id}/data"]["delete"]["responses"]
    assert "content" not in erased["204"] and {"401", "403", "503"} <= set(erased)
    schemas = document["components"]["schemas"]
    assert list(schemas["Export"]["properties"]) == ["user_id", "exported_at", "tasks", "conversations"]
    assert set(schemas["ExportedConversation"]["properties"]) == {*schemas["Conversation"]["properties"], "messages"}


def unreachable_url() -> str:
    return f"postgresql://nobody:secret@127.0.0.1:{free_port()}/chat"


def test_export_and_erase_with_the_database_down_are_503():
    with built_app(unreachable_url()) as app:
        client = app.test_client()
        user = make_user()
        for response in (client.get(f"/api/{user.id}/export", headers=user.headers),
                         client.delete(f"/api/{user.id}/data", headers=user.headers)):
            assert response.status_code == 503
            assert response.headers["Retry-After"].isdigit()
            assert response.get_json()["error"]["code"] == "database_unavailable"


# The schema: what export and erase cover


def user_tables(app) -> list[str]:
    with app.app_context(), db.engine.connect() as connection:
        return user_data.user_tables(connection)


def test_every_table_with_a_user_id_is_exported_or_named_as_left_out(app):
    """A table added later with a user_id fails here until the export holds
    it or NOT_EXPORTED says why it does not."""
    tables = user_tables(app)
    assert {"conversation", "message", "task", "idempotency_key", "chat_rate_limit"} <= set(tables)
    with app.app_context(), db.engine.connect() as connection:
        assert user_data.unexported_tables(connection) == []
    assert set(user_data.NOT_EXPORTED) <= set(tables), "NOT_EXPORTED names a table that no longer exists"


def test_the_app_role_may_delete_from_every_table_with_a_user_id(app, app_url):
    """Erasure runs as the app role under the policies: a table it may not
    delete from would make DELETE /data fail."""
    with connect(app_url) as conn:
        missing = [table for table in user_tables(app)
                   if not conn.execute("select has_table_privilege(current_user, %s, 'DELETE')",
                                       (table,)).fetchone()[0]]
    assert missing == []


def test_messages_go_with_their_conversations(app):
    with app.app_context(), db.engine.connect() as connection:
        plan = user_data.erase_plan(connection)
    assert "message" in plan.cascaded and "message" not in plan.statements
    assert plan.order.index("message") < plan.order.index("conversation")
    assert set(plan.order) == set(user_tables(app))


def rows_per_table(app_url: str, user_id: str, tables) -> dict:
    with connect(app_url, user_id) as conn:
        return {table: conn.execute(sql.SQL("select count(*) from {}").format(sql.Identifier(table))).fetchone()[0]
                for table in tables}


@pytest.fixture(scope="module")
def limited_app(app_url):
    """An app with CHAT_RATE_LIMIT set, so turns leave rate-limit state too."""
    with built_app(app_url, CHAT_RATE_LIMIT="100/minute") as app:
        yield app


def test_erase_removes_every_row_of_the_user_in_every_table(limited_app, alice, bob, app_url):
    client = limited_app.test_client()
    seed_through_the_api(client, alice, "alice")
    seed_through_the_api(client, bob, "bob")
    tables = user_tables(limited_app)
    before = {user.id: rows_per_table(app_url, user.id, tables) for user in (alice, bob)}
    for user in (alice, bob):
        empty = [table for table, count in before[user.id].items() if count == 0]
        assert empty == [], f"seed a row of {user.id} in {empty}, so that this test proves their erasure"
    response = client.delete(f"/api/{alice.id}/data", headers=alice.headers)
    assert response.status_code == 204 and response.get_data() == b""
    assert rows_per_table(app_url, alice.id, tables) == dict.fromkeys(tables, 0)
    assert rows_per_table(app_url, bob.id, tables) == before[bob.id]
    assert client.delete(f"/api/{alice.id}/data", headers=alice.headers).status_code == 204
    assert without_exported_at(export(client, alice)) == {"user_id": alice.id, "tasks": [], "conversations": []}
    assert len(export(client, bob)["conversations"]) == 2


def test_erase_of_a_user_with_nothing_is_204(client):
    nobody = make_user("nobody")
    assert client.delete(f"/api/{nobody.id}/data", headers=nobody.headers).status_code == 204


LATER_TABLE = """
CREATE TABLE later_note (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id text NOT NULL,
    conversation_id uuid NOT NULL,
    body text NOT NULL,
    FOREIGN KEY (conversation_id, user_id) REFERENCES conversation (id, user_id)
);
ALTER TABLE later_note ENABLE ROW LEVEL SECURITY;
ALTER TABLE later_note FORCE ROW LEVEL SECURITY;
CREATE POLICY later_note_isolation ON later_note
    USING (user_id = (SELECT nullif(current_setting('app.user_id', true), '')))
    WITH CHECK (user_id = (SELECT nullif(current_setting('app.user_id', true), '')));
"""


@pytest.fixture
def later_table(owner_url):
    """A table added after this code was written: a user_id, and a foreign
    key to conversation without ON DELETE CASCADE (so its rows must go first)."""
    with psycopg.connect(owner_url, autocommit=True) as conn:
        conn.execute(LATER_TABLE)
        conn.execute(sql.SQL("GRANT SELECT, INSERT, DELETE ON later_note TO {}").format(sql.Identifier(APP_ROLE)))
    try:
        yield "later_note"
    finally:
        with psycopg.connect(owner_url, autocommit=True) as conn:
            conn.execute("DROP TABLE later_note")


def test_a_table_added_later_is_erased_and_flagged_for_the_export(app, client, alice, bob, app_url, later_table):
    for user in (alice, bob):
        conversation = post_json(client, user, "/chat", {"message": "hello"})
        with connect(app_url, user.id) as conn:
            conn.execute("insert into later_note (user_id, conversation_id, body) values (%s, %s, 'note')",
                         (user.id, conversation["conversation_id"]))
    with app.app_context(), db.engine.connect() as connection:
        assert user_data.unexported_tables(connection) == [later_table]
        plan = user_data.erase_plan(connection)
    assert plan.statements.index(later_table) < plan.statements.index("conversation")
    assert client.delete(f"/api/{alice.id}/data", headers=alice.headers).status_code == 204
    assert rows_per_table(app_url, alice.id, [later_table, "conversation"]) == {later_table: 0, "conversation": 0}
    assert rows_per_table(app_url, bob.id, [later_table, "conversation"]) == {later_table: 1, "conversation": 1}


# The memory bound, on a real gunicorn worker

EXPORTED_MESSAGES = 50_000
MESSAGE_CHARS = 1_000
CONVERSATIONS = 5
MAX_GROWTH_MB = 50


def seed_many_messages(app_url: str, user_id: str) -> None:
    """EXPORTED_MESSAGES messages of MESSAGE_CHARS characters in CONVERSATIONS
    conversations, written in SQL as the app role, bound to the user (the
    owner may not: outside a search it reads no conversation, policies/search.sql)."""
    per_conversation = EXPORTED_MESSAGES // CONVERSATIONS
    with connect(app_url, user_id) as conn:
        for n in range(CONVERSATIONS):
            conversation_id = conn.execute(
                "insert into conversation (user_id, title, message_count, turn_count) values (%s, %s, %s, %s)"
                " returning id", (user_id, f"big {n}", per_conversation, per_conversation)).fetchone()[0]
            conn.execute(
                "insert into message (conversation_id, user_id, role, content, turn)"
                " select %s, %s, 'user', lpad(g::text, %s, 'x'), g from generate_series(1, %s) g",
                (conversation_id, user_id, MESSAGE_CHARS, per_conversation))


def worker_pid(master_pid: int) -> int:
    children = Path(f"/proc/{master_pid}/task/{master_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_an_export_of_50000_messages_keeps_the_workers_memory_bounded(app_url, capsys):
    """The worker's resident set may grow by less than MAX_GROWTH_MB while it
    writes about 55 MB of JSON: a server that built the document in memory
    would hold all of it at once. Peak RSS (VmHWM) is reset just before."""
    big, small = make_user("big"), make_user("small")
    seed_many_messages(app_url, big.id)
    with gunicorn(app_url, workers=1, threads=4) as server:
        pid = worker_pid(server.process.pid)
        for _ in range(3):  # warm up: imports, pools, first-request caches
            assert requests.get(f"{server.url}/api/{small.id}/export", headers=small.headers, timeout=30).ok
        before_kb = memory_kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        started = time.monotonic()
        with tempfile.TemporaryFile() as body, requests.get(f"{server.url}/api/{big.id}/export",
                                                            headers=big.headers, stream=True, timeout=120) as answer:
            assert answer.status_code == 200
            assert "Content-Length" not in answer.headers and answer.headers["Transfer-Encoding"] == "chunked"
            for chunk in answer.iter_content(1 << 16):
                body.write(chunk)
            size = body.tell()
            body.seek(0)
            document = json.load(body)
        elapsed = time.monotonic() - started
        peak_kb = memory_kb(pid, "VmHWM")
        after = requests.delete(f"{server.url}/api/{big.id}/data", headers=big.headers, timeout=60)
        assert after.status_code == 204
    messages = [message for conversation in document["conversations"] for message in conversation["messages"]]
    assert len(messages) == EXPORTED_MESSAGES and len(document["conversations"]) == CONVERSATIONS
    assert all(len(message["content"]) == MESSAGE_CHARS for message in messages)
    growth_mb = (peak_kb - before_kb) / 1024
    with capsys.disabled():
        print(f"\nexport of {EXPORTED_MESSAGES} messages: {size / 1e6:.1f} MB in {elapsed:.1f} s; worker RSS "
              f"{before_kb / 1024:.1f} MB before, peak {peak_kb / 1024:.1f} MB (+{growth_mb:.1f} MB)")
    assert size > EXPORTED_MESSAGES * MESSAGE_CHARS
    assert growth_mb < MAX_GROWTH_MB


def test_the_export_is_as_documented(client, alice):
    """The streamed document loads with the schema the OpenAPI document is built from."""
    from chat_blueprint.schemas import ExportSchema

    seed_through_the_api(client, alice, "alice")
    document = export(client, alice)
    assert ExportSchema().dump(ExportSchema().load(document)) == document

