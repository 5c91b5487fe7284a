"""Searching conversations (GET /conversations?q=) on the real database: what
matches, the snippet, what users type that looks like query syntax, pages,
isolation, and the plan: the text-search indexes are used, led by the user."""
from __future__ import annotations

import re

import psycopg
import pytest
from sqlalchemy import event
from support import connect, make_user

from chat_blueprint.db.extensions import db
from devtools.cluster import APP_ROLE


def chat(client, user, message, conversation_id=None):
    body = {"message": message, **({"conversation_id": conversation_id} if conversation_id else {})}
    response = client.post(f"/api/{user.id}/chat", json=body, headers=user.headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["conversation_id"]


def search(client, user, q, **query):
    response = client.get(f"/api/{user.id}/conversations", query_string={"q": q, **query}, headers=user.headers)
    assert response.status_code == 200, (q, response.get_data(as_text=True))
    return response.get_json()


def found(client, user, q, **query) -> list[str]:
    return [conversation["id"] for conversation in search(client, user, q, **query)["data"]]


def rename(client, user, conversation_id, **changes):
    response = client.patch(f"/api/{user.id}/conversations/{conversation_id}", json=changes, headers=user.headers)
    assert response.status_code == 200, response.get_data(as_text=True)


def test_every_word_must_be_somewhere_in_the_conversation(client, alice):
    both = chat(client, alice, "buy oat milk on Monday")
    chat(client, alice, "and bread for the weekend", both)
    one = chat(client, alice, "oat cookies recipe")
    assert found(client, alice, "oat") == [one, both]
    assert found(client, alice, "oat bread") == [both]  # two messages of one conversation
    assert found(client, alice, "OAT Weekend monday") == [both]  # any case
    assert found(client, alice, "oat bread cheese") == []
    assert found(client, alice, "milk milk oat") == [both]


def test_the_title_counts_and_a_title_match_shows_the_title(client, alice):
    conversation_id = chat(client, alice, "what should I cook tonight")
    rename(client, alice, conversation_id, title="Dinner ideas")
    hit = search(client, alice, "dinner")["data"]
    assert [c["id"] for c in hit] == [conversation_id] and hit[0]["snippet"] == "Dinner ideas"
    assert found(client, alice, "dinner cook") == [conversation_id]  # title and message together


def test_a_snippet_is_plain_text_around_a_matching_message(client, alice):
    filler = " ".join(f"filler{n}" for n in range(60))
    conversation_id = chat(client, alice, f"{filler} the dentist appointment is on Friday {filler}")
    hit = search(client, alice, "dentist")["data"][0]
    assert hit["id"] == conversation_id
    assert len(hit["snippet"]) <= 200 and "dentist appointment" in hit["snippet"]
    assert "<b>" not in hit["snippet"]
    stored = client.get(f"/api/{alice.id}/conversations/{conversation_id}/messages", headers=alice.headers)
    assert any(hit["snippet"] in message["content"] for message in stored.get_json()["data"])
    listed = client.get(f"/api/{alice.id}/conversations", headers=alice.headers).get_json()["data"]
    assert "snippet" not in listed[0]  # only search results carry one


def test_the_snippet_comes_from_the_message_holding_the_most_words(client, alice):
    """The builtin assistant repeats each message in its reply: the latest
    message holding both words is the reply to the second."""
    conversation_id = chat(client, alice, "tickets for the train")
    chat(client, alice, "the train to Lyon leaves at nine, tickets booked", conversation_id)
    chat(client, alice, "Lyon weather", conversation_id)
    hit = search(client, alice, "lyon tickets")["data"][0]
    assert hit["snippet"] == 'turn 2: you said "the train to Lyon leaves at nine, tickets booked" (3 messages in view)'



def test_accents_and_cjk_are_words_too(client, alice):
    cafe = chat(client, alice, "rendez-vous au café à midi")
    tokyo = chat(client, alice, "東京 タワー に 行く")
    assert found(client, alice, "café") == [cafe]
    assert found(client, alice, "CAFÉ midi") == [cafe]
    assert found(client, alice, "cafe") == []  # accents are kept: no unaccenting
    assert found(client, alice, "東京") == [tokyo]
    assert found(client, alice, "東京 行く") == [tokyo]


# What people type into a search box. None is query syntax: each is read as
# text, its words (if any) must all match, and the punctuation is ignored.
TYPED = {
    '"oat milk"': "both", "oat & milk": "both", "oat | zebra": "none", "!oat": "both", "(oat)": "both",
    "oat\\milk": "both", "oat:*": "both", "oa:*": "none", "oat <-> milk": "both", "oat & !milk": "both",
    "-": "none", "'": "none", "''": "none", "\\": "none", "&|!()": "none", "oat -milk": "both",
    "o'at": "none", "milk's": "none", "%": "none", "_": "none", "*": "none", ":": "none", "<->": "none",
    "a:b": "none", "$9": "none", "%(words)s": "none", "{oat}": "both", "oat;drop table message": "none",
    "   ": "none", "\t": "none", "OAT\u3000MILK": "both",
}


@pytest.mark.parametrize("q", TYPED)
def test_what_users_type_is_never_query_syntax(client, alice, q):
    conversation_id = chat(client, alice, "oat milk")
    chat(client, alice, "nothing in common")
    expected = {"both": [conversation_id], "none": []}[TYPED[q]]
    assert found(client, alice, q) == expected


@pytest.mark.parametrize("query, field", [
    ({"q": ""}, "q"), ({"q": "x" * 201}, "q"), ({"q": "oat\x00milk"}, "q"), ({"archived": "yes"}, "archived"),
    ({"archived": "1"}, "archived"), ({"q": "oat", "limit": "0"}, "limit"),
])
def test_bad_search_queries_are_422(client, alice, query, field):
    response = client.get(f"/api/{alice.id}/conversations", query_string=query, headers=alice.headers)
    assert response.status_code == 422
    assert list(response.get_json()["error"]["fields"]) == [field]


def test_the_longest_searches_are_answered(client, alice):
    chat(client, alice, "oat")
    many = "0123456789abcdefghijklmnopqrstuvwxyzαβγδεζηθικλμνξοπρστυφχψωабвгдежзийклмнопрстуфхцчшщъыьэюя"
    assert found(client, alice, "oat " + "x" * 196) == []
    assert found(client, alice, " ".join(["oat"] * 49) + " x") == []
    assert len(found(client, alice, " ".join(["oat"] * 50))) == 1
    assert found(client, alice, " ".join(many)) == []  # 92 words, each looked up


def test_another_users_conversations_are_never_found(client, alice, bob):
    mine = chat(client, alice, "secret recipe for soup")
    chat(client, bob, "secret recipe for soup")
    assert found(client, alice, "secret soup") == [mine]
    assert found(client, make_user("carol"), "secret") == []


def test_search_pages_keep_the_lists_order_and_filters(client, alice):
    ids = [chat(client, alice, f"garden note {n}") for n in range(7)]
    chat(client, alice, "unrelated")
    rename(client, alice, ids[2], pinned=True)
    rename(client, alice, ids[5], archived=True)
    expected = [ids[2], ids[6], ids[4], ids[3], ids[1], ids[0]]
    seen, cursor = [], None
    while True:
        page = search(client, alice, "garden", limit=2, **({"cursor": cursor} if cursor else {}))
        assert len(page["data"]) <= 2 and all("garden note" in hit["snippet"] for hit in page["data"])
        seen += [hit["id"] for hit in page["data"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == expected
    assert found(client, alice, "garden", archived="true") == [ids[5]]
    plain = client.get(f"/api/{alice.id}/conversations?limit=100", headers=alice.headers).get_json()["data"]
    assert [c["id"] for c in plain if c["id"] in ids] == expected


def seed(app_url: str, user_id: str, conversations: int, messages: int) -> None:
    """`conversations` conversations of `messages` messages each, in SQL as the user,
    with words that repeat (common) or not (rare) across them."""
    with connect(app_url, user_id) as conn:
        conn.execute("""
            WITH made AS (
                INSERT INTO conversation (user_id, title, message_count, turn_count)
                SELECT %(user)s, 'seeded ' || n, %(messages)s, %(messages)s FROM generate_series(1, %(conversations)s) n
                RETURNING id
            )
            INSERT INTO message (conversation_id, user_id, role, content, turn)
            SELECT made.id, %(user)s, 'user', 'common words and rare' || (random() * 1e9)::bigint, t
            FROM made, generate_series(1, %(messages)s) t
        """, {"user": user_id, "conversations": conversations, "messages": messages})


def search_statement(app, user, q):
    """The SQL and parameters the search route sends, as the app sends them."""
    sent = []

    def record(conn, cursor, statement, parameters, context, executemany):
        sent.append((statement, parameters))

    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", record)
        try:
            found(app.test_client(), user, q)
        finally:
            event.remove(db.engine, "before_cursor_execute", record)
    return next((statement, parameters) for statement, parameters in sent if "search_hits" in statement)


def plans_of(superuser_url: str, user_id: str, statement: str, parameters: dict) -> list[str]:
    """The plan of every statement run for `statement` (those inside search_hits
    too), as the app role with the user bound, from auto_explain."""
    plans = []
    with psycopg.connect(superuser_url) as conn:
        conn.add_notice_handler(lambda notice: plans.append(notice.message_primary))
        conn.execute("LOAD 'auto_explain'")
        for setting, value in (("log_min_duration", "0"), ("log_nested_statements", "on"),
                               ("log_analyze", "on"), ("log_buffers", "on"), ("log_level", "notice")):
            conn.execute(f"SET auto_explain.{setting} = {value}")
        conn.execute(f"SET ROLE {APP_ROLE}")
        conn.execute("SELECT set_config('app.user_id', %s, true)", (user_id,))
        conn.execute(statement, parameters).fetchall()
    return plans


def test_a_search_uses_the_text_search_indexes_led_by_the_user(app, app_url, superuser_url, capsys):
    """After ANALYZE, both words find their rows through the GIN indexes,
    whose scan takes the user's id and the word together: no other user's row
    and no row without the word is read, whatever the planner believes the
    user has. The plans are printed (pytest -s) for the record."""
    user, other = make_user("planned"), make_user("other")
    seed(app_url, user.id, 300, 10)
    seed(app_url, other.id, 300, 10)
    with connect(app_url, user.id) as conn:
        rare = conn.execute("SELECT content FROM message ORDER BY id LIMIT 1").fetchone()[0].split()[-1]
        conn.execute("UPDATE conversation SET title = 'common title' WHERE title = 'seeded 7'")
    with psycopg.connect(superuser_url, autocommit=True) as conn:
        # A crowd of users with a conversation each: the planner, which cannot
        # know whose rows the policy asks for, then expects a user to have one or
        # two, the case where reading them all through the list's index looks cheap.
        conn.execute("INSERT INTO conversation (user_id, title) SELECT 'crowd-' || n, 'crowd'"
                     " FROM generate_series(1, 5000) AS n")
        conn.execute("ANALYZE message")
        conn.execute("ANALYZE conversation")
    statement, parameters = search_statement(app, user, f"common {rare}")
    plans = plans_of(superuser_url, user.id, statement, parameters)
    inner = {name: [plan for plan in plans if f"FROM {name} AS found" in plan] for name in ("message", "conversation")}
    with capsys.disabled():
        print("\n" + "\n\n".join(inner["message"][:1] + inner["conversation"][:1]))
    for name, searched in inner.items():
        assert len(searched) == 2, plans  # one statement per word
        for plan in searched:
            assert f"Bitmap Index Scan on ix_{name}_search" in plan and "Seq Scan" not in plan, plan
            condition = re.search(r"Index Cond: \((.*)\)", plan).group(1)
            assert condition.startswith("(user_id = ") and " @@ " in condition, plan
    assert "rows=1 " in next(plan for plan in inner["message"] if "Bitmap Index Scan" in plan and "rows=1 " in plan)


def test_an_ordinary_query_cannot_use_a_text_search_index_under_rls(app_url):
    """Why search_hits exists: under row-level security a `@@` written in a
    query is a filter evaluated after the policy, on every row of the user
    (no text-search operator is LEAKPROOF), however large the table. If this
    fails, PostgreSQL has changed and the function could go."""
    user = make_user("naive")
    seed(app_url, user.id, 100, 10)
    with connect(app_url, user.id) as conn:
        conn.execute("SET LOCAL enable_seqscan = off")
        plan = "\n".join(row[0] for row in conn.execute(
            "EXPLAIN SELECT id FROM message WHERE user_id = %s"
            " AND to_tsvector('simple'::regconfig, search_text(content)) @@ plainto_tsquery('simple', 'common')",
            (user.id,)))
    assert re.search(r"Filter: .*@@", plan), plan
    assert not re.search(r"Index Cond: .*@@", plan), plan


def test_search_hits_sees_only_the_bound_users_rows(app_url, client, alice, bob):
    """The function runs as the owner, whom the isolation policies bind to
    the caller's app.user_id: no user bound, nothing found."""
    chat(client, alice, "shared word marmalade")
    chat(client, bob, "shared word marmalade")
    hits = "SELECT count(DISTINCT conversation_id) FROM search_hits(plainto_tsquery('simple', 'marmalade'))"
    with connect(app_url, alice.id) as conn:
        assert conn.execute(hits).fetchone()[0] == 1
    with connect(app_url) as conn:
        assert conn.execute(hits).fetchone()[0] == 0


def test_the_search_setting_gives_the_app_role_nothing_and_the_owner_no_rows(app_url, owner_url, client, alice, bob):
    chat(client, alice, "marmalade")
    chat(client, bob, "marmalade")
    search_for = "SELECT set_config('chat.search_query', plainto_tsquery('simple', 'marmalade')::text, true)"
    with connect(app_url, alice.id) as conn:
        conn.execute(search_for)
        assert conn.execute("SELECT count(*) FROM message").fetchone()[0] == 2
        assert {row[0] for row in conn.execute("SELECT user_id FROM conversation")} == {alice.id}
    with connect(owner_url, alice.id) as conn:  # outside a search, the owner reads no message and no title
        assert conn.execute("SELECT count(*) FROM message").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM conversation").fetchone()[0] == 0


def test_search_hits_refuses_to_run_unbound_by_rls(superuser_url, alice):
    """Owned by a superuser, no policy would apply and every row of every
    user would be a hit: it raises instead."""
    with psycopg.connect(superuser_url) as conn:
        conn.execute("ALTER FUNCTION search_hits(tsquery) OWNER TO postgres")  # rolled back at the end
        conn.execute(f"SET ROLE {APP_ROLE}")
        conn.execute("SELECT set_config('app.user_id', %s, true)", (alice.id,))
        with pytest.raises(psycopg.errors.RaiseException, match="bound by row-level security"):
            conn.execute("SELECT * FROM search_hits(plainto_tsquery('simple', 'x'))")
        conn.rollback()


def test_a_message_too_long_for_one_tsvector_is_stored_and_found_by_its_start(app_url, client, alice):
    """A tsvector holds at most 1 MB, and an assistant's answer may be 8 MiB:
    indexing all of it would refuse to store such a reply. The first 50,000
    characters are indexed."""
    conversation_id = chat(client, alice, "a long answer follows")
    with connect(app_url, alice.id) as conn:
        conn.execute("INSERT INTO message (conversation_id, user_id, role, content, turn)"
                     " SELECT %s, %s, 'user', 'lighthouse ' || string_agg(md5(n::text), ' ') || ' endmark', 2"
                     " FROM generate_series(1, 40000) AS n", (conversation_id, alice.id))
    assert found(client, alice, "lighthouse") == [conversation_id]
    assert found(client, alice, "endmark") == []  # past the first 50,000 characters
