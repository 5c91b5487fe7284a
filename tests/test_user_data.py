"""The user's data: export (a copy of every row) and erasure (every row, in
every table with a user_id), on the real database with RLS in force, and the
export's memory bound measured on a real gunicorn worker."""
from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import requests
from psycopg import sql
from support import built_app, connect, gunicorn, make_user

from chat_blueprint.db.extensions import db
from chat_blueprint.services import export as exports
from chat_blueprint.services import user_data
from devtools.cluster import APP_ROLE
from devtools.ports import free_port


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
        spooled, size = exports.spool(db.engine, alice.id, max_bytes=1 << 20, batch_rows=2)
        with spooled:
            batched = json.loads(spooled.read())
            assert spooled.tell() == size
        assert db.engine.pool.checkedout() == 0
    assert without_exported_at(batched) == without_exported_at(whole)


def add_messages(url: str, user_id: str, count: int, chars: int = 10, conversations: int = 1) -> None:
    """`count` user messages of `chars` characters over `conversations` conversations, in SQL as the
    app role (the owner may not: outside a search it reads no conversation, policies/search.sql)."""
    with connect(url, user_id) as conn:
        for n in range(conversations):
            conversation_id = conn.execute("insert into conversation (user_id, title) values (%s, %s) returning id",
                                           (user_id, f"c{n}")).fetchone()[0]
            conn.execute("insert into message (conversation_id, user_id, role, content, turn)"
                         " select %s, %s, 'user', lpad(g::text, %s, 'x'), g from generate_series(1, %s) g",
                         (conversation_id, user_id, chars, count // conversations))


def test_the_connection_is_back_in_the_pool_before_the_first_byte(app, alice, app_url, monkeypatch):
    """The finding: an export held its pooled connection, in a REPEATABLE READ
    transaction, until its client had read the last byte. It is spooled now:
    while the client reads, no connection is checked out; once the response
    is closed (the client went away) the user may export again at once."""
    monkeypatch.setattr(exports, "SEND_CHUNK_BYTES", 16)
    add_messages(app_url, alice.id, 50)
    client = app.test_client()
    response = client.get(f"/api/{alice.id}/export", headers=alice.headers, buffered=False)
    assert response.status_code == 200
    chunks = iter(response.response)
    assert next(chunks).startswith(b'{"user_id"') and next(chunks)
    with app.app_context():
        assert db.engine.pool.checkedout() == 0
        response.close()
        assert db.engine.pool.checkedout() == 0
    again = client.get(f"/api/{alice.id}/export", headers=alice.headers)
    assert again.status_code == 200 and int(again.headers["Content-Length"]) == len(again.get_data())


def error_of(response) -> tuple[int, str]:
    return response.status_code, response.get_json()["error"]["code"]


def test_exports_are_limited_per_user_by_export_rate_limit(app_url, alice, bob):
    """Reads have a bound too: EXPORT_RATE_LIMIT (here 2/hour), shared by every
    instance in PostgreSQL, refuses a third export with 429 and Retry-After,
    and only for that user. A refused export reads nothing."""
    with built_app(app_url, EXPORT_RATE_LIMIT="2/hour") as app:
        client = app.test_client()
        assert [export(client, alice)["user_id"] for _ in range(2)] == [alice.id] * 2
        limited = client.get(f"/api/{alice.id}/export", headers=alice.headers)
        assert error_of(limited) == (429, "rate_limited")
        assert 1 <= int(limited.headers["Retry-After"]) <= 1800
        assert "exports" in limited.get_json()["error"]["message"]
        assert export(client, bob)["user_id"] == bob.id
    with built_app(app_url, EXPORT_RATE_LIMIT="off") as app:
        assert export(app.test_client(), alice)["user_id"] == alice.id


def test_exports_on_disk_are_bounded_per_process_and_per_user(app_url):
    """EXPORT_CONCURRENCY (here 2) exports may be spooled or being sent at once
    by one process: the next is a 503 with Retry-After, and a user whose export
    is still being sent gets a 429 for a second one. Both end with the first."""
    first, second, third = make_user("first"), make_user("second"), make_user("third")
    with built_app(app_url, EXPORT_CONCURRENCY=2) as app:
        client = app.test_client()
        open_exports = [client.get(f"/api/{user.id}/export", headers=user.headers, buffered=False)
                        for user in (first, second)]
        assert [response.status_code for response in open_exports] == [200, 200]
        busy = client.get(f"/api/{third.id}/export", headers=third.headers)
        assert error_of(busy) == (503, "exports_busy") and busy.headers["Retry-After"].isdigit()
        again = client.get(f"/api/{first.id}/export", headers=first.headers)
        assert error_of(again) == (429, "export_in_progress") and again.headers["Retry-After"].isdigit()
        for response in open_exports:
            response.close()
        assert [export(client, user)["user_id"] for user in (third, first)] == [third.id, first.id]


def test_an_export_over_export_max_bytes_is_refused_whole(app_url, alice, bob):
    """A document larger than EXPORT_MAX_BYTES is never cut: 507 with nothing
    sent, the snapshot's connection back in the pool, the slot free again."""
    add_messages(app_url, alice.id, 40, chars=100)
    with built_app(app_url, EXPORT_MAX_BYTES=2048) as app:
        client = app.test_client()
        for _ in range(2):
            refused = client.get(f"/api/{alice.id}/export", headers=alice.headers)
            assert error_of(refused) == (507, "export_too_large")
            assert "EXPORT_MAX_BYTES" in refused.get_json()["error"]["message"]
        with app.app_context():
            assert db.engine.pool.checkedout() == 0
        small = client.get(f"/api/{bob.id}/export", headers=bob.headers)
        assert small.status_code == 200 and int(small.headers["Content-Length"]) == len(small.get_data()) < 2048


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
    assert exported["200"]["headers"]["Content-Length"]["required"] is True
    assert {"401", "403", "429", "503", "507"} <= set(exported)
    assert "Retry-After" in exported["429"]["headers"] and "EXPORT_RATE_LIMIT" in exported["429"]["description"]
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
    for user in (alice, bob):
        seed_through_the_api(client, user, user.id)
        export(client, user)  # a row of export rate-limit state
        with connect(app_url, user.id) as conn:  # a stop noted while its reply was produced
            conn.execute("insert into reply_stop (user_id, ui_id) values (%s, 'msg-noted')", (user.id,))
            conn.commit()
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


BIG_CONVERSATION = 300_000


def test_a_user_with_many_messages_is_erased_in_batches(app_url, monkeypatch):
    """The finding: erasure was one statement under DATABASE_STATEMENT_TIMEOUT_S,
    so a user with enough messages got 503 with Retry-After forever. Here the
    timeout is 0.3 s, far below what deleting 300,000 messages of one
    conversation in one statement takes, and far above a batch of 1,000."""
    monkeypatch.setattr(user_data, "ERASE_BATCH_ROWS", 1_000)
    big, other = make_user("big"), make_user("other")
    add_messages(app_url, big.id, BIG_CONVERSATION)
    add_messages(app_url, big.id, 2_500, conversations=2_500)
    with connect(app_url, big.id) as conn:
        conn.execute("insert into task (user_id, title) select %s, 't' || g from generate_series(1, 2500) g",
                     (big.id,))
    add_messages(app_url, other.id, 10, conversations=2)
    tables = ("task", "conversation", "message")
    with built_app(app_url, DATABASE_STATEMENT_TIMEOUT_S=0.3) as app:
        client = app.test_client()
        response = client.delete(f"/api/{big.id}/data", headers=big.headers)
        assert response.status_code == 204, response.get_data(as_text=True)
        assert rows_per_table(app_url, big.id, tables) == dict.fromkeys(tables, 0)
        assert client.delete(f"/api/{big.id}/data", headers=big.headers).status_code == 204
        with app.app_context():
            assert db.engine.pool.checkedout() == 0
    assert rows_per_table(app_url, other.id, tables) == {"task": 0, "conversation": 2, "message": 10}


def test_an_erasure_cut_short_goes_on_where_it_stopped(client, app_url, alice, monkeypatch):
    """Each batch commits on its own: the database going away after the first
    batch of messages leaves a 503 with Retry-After and fewer rows, never an
    inconsistent user, and a repeat erases the rest."""
    monkeypatch.setattr(user_data, "ERASE_BATCH_ROWS", 10)
    add_messages(app_url, alice.id, 60, conversations=3)
    real_run, by_parent = user_data._run, []

    def failing_at_the_second_batch_of_messages(engine, user_id, statement, params):
        if "parents" in params:
            by_parent.append(statement)
            if len(by_parent) == 2:
                raise psycopg.OperationalError("the database went away")
        return real_run(engine, user_id, statement, params)

    monkeypatch.setattr(user_data, "_run", failing_at_the_second_batch_of_messages)
    cut = client.delete(f"/api/{alice.id}/data", headers=alice.headers)
    assert cut.status_code == 503 and cut.headers["Retry-After"].isdigit()
    assert rows_per_table(app_url, alice.id, ("conversation", "message")) == {"conversation": 3, "message": 50}
    monkeypatch.setattr(user_data, "_run", real_run)
    assert client.delete(f"/api/{alice.id}/data", headers=alice.headers).status_code == 204
    assert rows_per_table(app_url, alice.id, ("conversation", "message")) == {"conversation": 0, "message": 0}


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
    spools and sends about 55 MB of JSON: a server that built the document in
    memory would hold all of it at once. Peak RSS (VmHWM) is reset just before."""
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
            first_byte = time.monotonic() - started
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
        print(f"\nexport of {EXPORTED_MESSAGES} messages: {size / 1e6:.1f} MB in {elapsed:.1f} s (spooled in "
              f"{first_byte:.1f} s); worker RSS {before_kb / 1024:.1f} MB before, peak {peak_kb / 1024:.1f} MB "
              f"(+{growth_mb:.1f} MB)")
    assert size == int(answer.headers["Content-Length"]) > EXPORTED_MESSAGES * MESSAGE_CHARS
    assert growth_mb < MAX_GROWTH_MB


def test_the_export_is_as_documented(client, alice):
    """The streamed document loads with the schema the OpenAPI document is built from."""
    from chat_blueprint.schemas import ExportSchema

    seed_through_the_api(client, alice, "alice")
    document = export(client, alice)
    assert ExportSchema().dump(ExportSchema().load(document)) == document



# One user's exports cannot take what other users need


class SlowReader:
    """A client of GET /export that reads its answer a little at a time through
    a small receive buffer, as a phone on a bad line does: `chunk` bytes every
    `pause_s` seconds once the head is in, from a thread of its own."""

    def __init__(self, url: str, user, chunk: int = 512, pause_s: float = 0.5):
        address = urlsplit(url)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(120)
        self.sock.connect((address.hostname, address.port))
        self.sock.sendall(f"GET /api/{user.id}/export HTTP/1.1\r\nHost: {address.netloc}\r\n"
                          f"Authorization: Bearer {user.token}\r\n\r\n".encode())
        self.chunk, self.pause_s = chunk, pause_s
        self.received = b""
        self.head = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            while not self.stopped.is_set():
                data = self.sock.recv(self.chunk)
                if not data:
                    break
                self.received += data
                if b"\r\n\r\n" in self.received:
                    self.head.set()
                    self.stopped.wait(self.pause_s)
        except OSError:
            pass
        finally:
            self.head.set()

    def status(self, timeout_s: float = 60) -> int:
        assert self.head.wait(timeout_s), "no answer"
        return int(self.received.split(b" ", 2)[1])

    def content_length(self) -> int:
        head = self.received.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
        return int(head.split("content-length:")[1].split("\r\n")[0])

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()
        self.thread.join(10)


HELD = """
SELECT pid, state, backend_xmin IS NOT NULL FROM pg_stat_activity
WHERE usename = %s AND (state <> 'idle' OR backend_xmin IS NOT NULL)
"""


def test_slow_readers_of_several_users_hold_no_connection(app_url, superuser_url):
    """The finding: 12 slow readers of ~3 MB exports held all the connections
    of an instance, every other user got 503, and backend_xmin stayed pinned.
    Here three users' exports of about 2.5 MB trickle to clients reading 1 KiB
    a second through a 4 KiB receive buffer, on a worker with 2 connections:
    another user's writes and reads answer at once, and PostgreSQL shows no
    connection of the app open in a transaction or holding a snapshot."""
    slow_users = [make_user("slow") for _ in range(3)]
    for user in slow_users:
        add_messages(app_url, user.id, 2_500, chars=1_000)
    other = make_user("other")
    with gunicorn(app_url, workers=1, DATABASE_POOL_SIZE=2, DATABASE_POOL_TIMEOUT_S=2) as server:
        readers = [SlowReader(server.url, user) for user in slow_users]
        try:
            assert [reader.status() for reader in readers] == [200, 200, 200]
            time.sleep(1)
            for n in range(10):
                started = time.monotonic()
                created = requests.post(f"{server.url}/api/{other.id}/tasks", json={"title": f"task {n}"},
                                        headers=other.headers, timeout=30)
                listed = requests.get(f"{server.url}/api/{other.id}/tasks", headers=other.headers, timeout=30)
                assert (created.status_code, listed.status_code) == (201, 200), created.text + listed.text
                assert time.monotonic() - started < 2
            with psycopg.connect(superuser_url, autocommit=True) as admin:
                assert admin.execute(HELD, (APP_ROLE,)).fetchall() == []
            assert all(len(reader.received) < reader.content_length() for reader in readers), "read too fast"
        finally:
            for reader in readers:
                reader.close()


def test_the_export_settings_and_their_defaults():
    from chat_blueprint.config import ConfigError, load_settings

    url = {"DATABASE_URL": "postgresql://h/db"}
    settings = load_settings(url)
    assert (settings.export_rate_limit, settings.export_max_bytes, settings.export_concurrency) == (
        (6, 3600), 512 * 1024 * 1024, 4)
    assert load_settings({**url, "EXPORT_RATE_LIMIT": "off"}).export_rate_limit is None
    for name, value in (("EXPORT_RATE_LIMIT", "6 an hour"), ("EXPORT_MAX_BYTES", "100"),
                        ("EXPORT_CONCURRENCY", "0"), ("EXPORT_MAX_BYTES", "1GB")):
        with pytest.raises(ConfigError, match=name):
            load_settings({**url, name: value})
