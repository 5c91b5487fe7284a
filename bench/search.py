"""What the search phase starts from: its own database of many users with many
conversations, a copy of it without the text-search indexes, the searches
wrk sends, and the plan of one search at that scale.

Conversation n (1..SEARCH_USERS * SEARCH_CONVERSATIONS) has the id
md5('conv-' || n) and belongs to 'bench-' || n % SEARCH_USERS, as in the main
seed, so pgbench_script() can run the chat turn on it too.
"""
from __future__ import annotations

import os
import random
from urllib.parse import quote_plus

import psycopg

from bench.settings import (
    SEARCH_CONVERSATIONS,
    SEARCH_DATABASE,
    SEARCH_MESSAGES,
    SEARCH_NOINDEX_DATABASE,
    SEARCH_USERS,
    SEARCH_VOCABULARY,
    SECRET,
    log,
)
from bench.tools import conversation_uuid
from devtools.cluster import APP_ROLE, OWNER_ROLE, SUPERUSER, Cluster, migrate

SEARCH_INDEXES = ("ix_message_search", "ix_conversation_search")
SENTENCES = 100_000
TOTAL_CONVERSATIONS = SEARCH_USERS * SEARCH_CONVERSATIONS

# Sentences of 20 words, word wN drawn with probability about 1/N (log-uniform
# ranks); each message takes one, by a hash of its place.
SEED_SQL = f"""
CREATE TEMP TABLE sentence AS
SELECT place, string_agg('w' || floor(exp(random() * ln({SEARCH_VOCABULARY})))::int, ' ') AS words
FROM generate_series(0, {SENTENCES - 1}) AS place, generate_series(1, 20) AS k GROUP BY place;

INSERT INTO conversation (id, user_id, title, message_count, turn_count, updated_at)
SELECT md5('conv-' || n)::uuid, 'bench-' || (n % {SEARCH_USERS}), left(sentence.words, 80), {SEARCH_MESSAGES},
       {SEARCH_MESSAGES // 2}, now() - n * interval '1 second'
FROM generate_series(1, {TOTAL_CONVERSATIONS}) AS n, sentence
WHERE sentence.place = (n::bigint * {SEARCH_MESSAGES // 2} + 1) * 7919 % {SENTENCES};

INSERT INTO message (conversation_id, user_id, role, content, turn)
SELECT md5('conv-' || n)::uuid, 'bench-' || (n % {SEARCH_USERS}), 'user', sentence.words, t
FROM generate_series(1, {TOTAL_CONVERSATIONS}) AS n, generate_series(1, {SEARCH_MESSAGES // 2}) AS t, sentence
WHERE sentence.place = (n::bigint * {SEARCH_MESSAGES // 2} + t) * 7919 % {SENTENCES};

INSERT INTO message (conversation_id, user_id, role, content, reply_to)
SELECT message.conversation_id, message.user_id, 'assistant', sentence.words, message.id
FROM message, sentence
WHERE message.role = 'user' AND sentence.place = message.id * 104729 % {SENTENCES}
"""

# What users search for, by the rank of the words in the vocabulary: the
# commonest words are in nearly every message, so they are the dearest.
QUERY_KINDS = {
    "rare": ((2_000, SEARCH_VOCABULARY),),
    "mid": ((50, 500),),
    "common": ((1, 3),),
    "two words": ((50, 500), (500, 5_000)),
}


def seed(cluster: Cluster) -> None:
    """SEARCH_DATABASE, migrated and seeded (the indexes are built after the
    rows, which is far faster than keeping them up to date row by row), then
    SEARCH_NOINDEX_DATABASE: a copy of it without the text-search indexes."""
    with psycopg.connect(cluster.url(SUPERUSER, "postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {SEARCH_DATABASE} OWNER {OWNER_ROLE}")
    migrate(cluster, {**os.environ, "BETTER_AUTH_SECRET": SECRET}, database=SEARCH_DATABASE, quiet=True)
    log(f"search: seeding {SEARCH_USERS} users x {SEARCH_CONVERSATIONS} conversations x {SEARCH_MESSAGES} messages")
    with psycopg.connect(cluster.url(SUPERUSER, SEARCH_DATABASE), autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("SET work_mem = '256MB'")  # the sentences' hash table, in memory
        definitions = [row[0] for row in conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = ANY(%s)", (list(SEARCH_INDEXES),))]
        conn.execute("DROP INDEX " + ", ".join(SEARCH_INDEXES))
        # The rows are consistent by construction; checking 8 million foreign
        # keys one row at a time took most of an hour, so the load skips them.
        conn.execute("SET session_replication_role = replica")
        for statement in SEED_SQL.split(";\n\n"):
            conn.execute(statement)
        conn.execute("RESET session_replication_role")
        log("search: building the text-search indexes")
        for definition in definitions:
            conn.execute(definition)
        conn.execute("VACUUM ANALYZE")
        conn.execute(f"GRANT SELECT ON SEQUENCE message_id_seq TO {APP_ROLE}")  # pgbench reads currval()
    with psycopg.connect(cluster.url(SUPERUSER, "postgres"), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {SEARCH_NOINDEX_DATABASE} TEMPLATE {SEARCH_DATABASE} OWNER {OWNER_ROLE}")
    with psycopg.connect(cluster.url(SUPERUSER, SEARCH_NOINDEX_DATABASE), autocommit=True) as conn:
        conn.execute("DROP INDEX " + ", ".join(SEARCH_INDEXES))


def sizes(cluster: Cluster) -> dict:
    """Megabytes of the message table and of each search index."""
    with psycopg.connect(cluster.url(SUPERUSER, SEARCH_DATABASE)) as conn:
        return {name: round(conn.execute("SELECT pg_relation_size(%s::regclass)", (name,)).fetchone()[0] / 2**20, 1)
                for name in ("message", *SEARCH_INDEXES)}


def search_targets(kind: str, count: int = 500, seed: int = 23) -> list[tuple[str, str]]:
    """(user, URL-encoded q) pairs of one kind of search, users at random."""
    chosen = random.Random(f"{seed}-{kind}")
    targets = []
    for _ in range(count):
        words = [f"w{chosen.randint(low, high)}" for low, high in QUERY_KINDS[kind]]
        targets.append((f"bench-{chosen.randrange(SEARCH_USERS)}", quote_plus(" ".join(words))))
    return targets


def turn_targets() -> list[tuple[str, str]]:
    """(user, conversation id) of conversations of the search database."""
    return [(f"bench-{n % SEARCH_USERS}", conversation_uuid(f"conv-{n}"))
            for n in range(1, min(TOTAL_CONVERSATIONS, 4000) + 1)]


def turn_message(words: int = 100) -> str:
    """A chat message of `words` vocabulary words (about 600 characters): the
    builtin assistant's reply repeats it, so both messages of a turn carry it
    into the index."""
    chosen = random.Random(7)
    return " ".join(f"w{int(SEARCH_VOCABULARY ** chosen.random())}" for _ in range(words))


# wrk's request: a search by a random target (user, token, q).
SEARCH_REQUEST = """
request = function()
  local t = targets[math.random(1, #targets)]
  return wrk.format("GET", "/api/" .. t[1] .. "/conversations?q=" .. t[3],
    {["Authorization"] = "Bearer " .. t[2]})
end
"""


# The statements search_hits (policies/search.sql) runs: keep them the same.
SEARCHED = {
    "messages": "SELECT found.conversation_id, found.id FROM message AS found "
                "WHERE found.superseded_at IS NULL AND found.status <> 'streaming'",
    "titles": "SELECT found.id, NULL::bigint FROM conversation AS found",
}


def plan(cluster: Cluster, user: str, word: str) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the statements search_hits runs, as the
    owner it runs as, for `user` and `word`."""
    with psycopg.connect(cluster.url(OWNER_ROLE, SEARCH_DATABASE)) as conn:
        conn.execute("SELECT set_config('app.user_id', %s, true), set_config('chat.search_query', "
                     "plainto_tsquery('simple', search_text(%s))::text, true)", (user, word))
        return "\n".join(f"-- {what}\n" + "\n".join(row[0] for row in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql))
                         for what, sql in SEARCHED.items())
