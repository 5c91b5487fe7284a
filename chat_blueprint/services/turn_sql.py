"""The SQL of a chat turn, sent through psycopg pipelines by turns.py (and
replayed by the benchmark's pgbench script, so both run the same statements)."""
from .rate_limit import WRITES

# Transaction 1. The user message goes in with the conversation's row lock
# taken by the UPDATE (or the conversation is created), numbered by the
# conversation's new turn_count, and under a key the key row learns which
# message it stored. With WRITE_RATE_LIMIT, the request's step of the limit
# (services/rate_limit.py's GCRA step on write_rate_limit) opens the same
# statement and everything else depends on it, so a refused write stores
# nothing and the whole transaction still goes out in one round trip. The
# statement always answers one row: whether the write was admitted (and if not,
# the Retry-After its state asks for), then the stored message's ids (NULL:
# no such conversation).
WRITE_STEP = "\nWITH step AS (" + WRITES.take_sql.rstrip() + "\n),"

WRITE_VERDICT = ("EXISTS (SELECT FROM step),\n       (" + WRITES.retry_after_sql.strip()
                 + " AND NOT EXISTS (SELECT FROM step))")

IN_CONVERSATION = """
counted AS (
    UPDATE conversation
    SET turn_count = turn_count + 1, message_count = message_count + 1, updated_at = now()
    WHERE id = %(conversation_id)s AND user_id = %(user_id)s {admitted}
    RETURNING id, turn_count
)"""

IN_NEW_CONVERSATION = """
counted AS (
    INSERT INTO conversation (user_id, title, message_count, turn_count)
    SELECT %(user_id)s, %(title)s, 1, 1 {admitted_where}
    RETURNING id, turn_count
)"""

STORE_USER_MESSAGE = """, stored AS (
    INSERT INTO message (conversation_id, user_id, role, content, turn)
    SELECT id, %(user_id)s, 'user', %(content)s, turn_count FROM counted
    RETURNING conversation_id, id, turn
), claimed AS (
    UPDATE idempotency_key SET conversation_id = stored.conversation_id, user_message_id = stored.id
    FROM stored WHERE idempotency_key.user_id = %(user_id)s AND idempotency_key.key = %(key)s
)
SELECT {verdict}, stored.conversation_id, stored.id, stored.turn
FROM (SELECT) AS one LEFT JOIN stored ON true
"""


def store_user_message(new_conversation: bool, write_step: bool) -> str:
    """The statement that stores a user message: into a new conversation or an
    existing one, with or without the request's write-limit step."""
    if new_conversation:
        counted = IN_NEW_CONVERSATION.format(admitted_where="WHERE EXISTS (SELECT FROM step)" if write_step else "")
    else:
        counted = IN_CONVERSATION.format(admitted="AND EXISTS (SELECT FROM step)" if write_step else "")
    head = WRITE_STEP + counted if write_step else "\nWITH" + counted
    return head + STORE_USER_MESSAGE.format(verdict=WRITE_VERDICT if write_step else "true, NULL::int")


STORE_IN_CONVERSATION = store_user_message(new_conversation=False, write_step=True)
STORE_IN_NEW_CONVERSATION = store_user_message(new_conversation=True, write_step=True)
UNLIMITED_STORE_IN_CONVERSATION = store_user_message(new_conversation=False, write_step=False)
UNLIMITED_STORE_IN_NEW_CONVERSATION = store_user_message(new_conversation=True, write_step=False)

# The last messages up to and including the user message, newest first: a
# backward scan of the (conversation_id, id) primary key that stops after
# `limit` rows, so its cost does not grow with the conversation's length
# (migration 0002 says why no index is led by `id` alone).
HISTORY_WINDOW = """
SELECT role, content, tool_calls FROM message
WHERE conversation_id = %(conversation_id)s AND id <= %(up_to)s
ORDER BY id DESC LIMIT %(limit)s
"""

LATEST_WINDOW = """
SELECT role, content, tool_calls FROM message
WHERE conversation_id = %(conversation_id)s
ORDER BY id DESC LIMIT %(limit)s
"""

USER_MESSAGE_TURN = """
SELECT turn FROM message WHERE conversation_id = %(conversation_id)s AND id = %(id)s AND user_id = %(user_id)s
"""

# Transaction 2: lock the conversation again, store the reply, and under a
# key record the whole answer (with the new message's id) in the same commit.
STORE_REPLY = """
WITH locked AS (
    UPDATE conversation SET message_count = message_count + 1, updated_at = now()
    WHERE id = %(conversation_id)s AND user_id = %(user_id)s
    RETURNING id
), reply AS (
    INSERT INTO message (conversation_id, user_id, role, content, tool_calls, reply_to, model, finish_reason, usage)
    SELECT id, %(user_id)s, 'assistant', %(content)s, %(tool_calls)s, %(reply_to)s, %(model)s, %(finish_reason)s,
           %(usage)s
    FROM locked
    RETURNING id
), answered AS (
    UPDATE idempotency_key
    SET status = 'done', updated_at = now(),
        response = jsonb_set(%(response)s, '{assistant_message_id}', to_jsonb(reply.id))
    FROM reply WHERE idempotency_key.user_id = %(user_id)s AND idempotency_key.key = %(key)s
)
SELECT id FROM reply
"""

STORED_REPLY = """
SELECT id, content, tool_calls, model, finish_reason, usage FROM message
WHERE conversation_id = %(conversation_id)s AND reply_to = %(reply_to)s AND user_id = %(user_id)s
"""
