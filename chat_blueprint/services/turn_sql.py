"""The SQL of a chat turn, sent through psycopg pipelines by turns.py and
progress.py (and replayed by the benchmark's pgbench script, so both run the
same statements)."""
import json

from ..db.models import CURRENT_STATUS_SQL
from .rate_limit import WRITES

# Transaction 1. The user message goes in with the conversation's row lock
# taken by the UPDATE (or the conversation is created), numbered by the
# conversation's new turn_count, and with it the reply, `streaming` and empty,
# stale (read as interrupted) once its producer could no longer be alive;
# under a key the key row learns which message it stored. With
# WRITE_RATE_LIMIT, the request's step of the limit (services/rate_limit.py's
# GCRA step on write_rate_limit) opens the same statement and everything else
# depends on it, so a refused write stores nothing and the whole transaction
# still goes out in one round trip. The statement always answers one row:
# whether the write was admitted (and if not, the Retry-After its state asks
# for), then the stored messages' ids (NULL: no such conversation).
WRITE_STEP = "\nWITH step AS (" + WRITES.take_sql.rstrip() + "\n),"

WRITE_VERDICT = ("EXISTS (SELECT FROM step),\n       (" + WRITES.retry_after_sql.strip()
                 + " AND NOT EXISTS (SELECT FROM step))")

# Where the message goes: an existing conversation (row locked; no row: not the
# user's), a new one, or either (a client-chosen id: created when the user has
# no conversation with it). With the client's `ui_id`, a message the
# conversation already holds is not stored again (`duplicate`).
CONVERSATION_TARGETS = {
    "existing": """
counted AS (
    UPDATE conversation
    SET turn_count = turn_count + 1, message_count = message_count + 2, updated_at = now()
    WHERE id = %(conversation_id)s AND user_id = %(user_id)s {admitted}
    RETURNING id, turn_count
)""",
    "new": """
counted AS (
    INSERT INTO conversation (user_id, title, message_count, turn_count)
    SELECT %(user_id)s, %(title)s, 2, 1 WHERE true {admitted}
    RETURNING id, turn_count
)""",
    "existing_or_new": """
counted AS (
    INSERT INTO conversation AS c (user_id, id, title, message_count, turn_count)
    SELECT %(user_id)s, %(conversation_id)s, %(title)s, 2, 1 WHERE true {admitted}
    ON CONFLICT (user_id, id) DO UPDATE
    SET turn_count = c.turn_count + 1, message_count = c.message_count + 2, updated_at = now()
    RETURNING id, turn_count
)""",
}

NOT_SENT_BEFORE = """AND NOT EXISTS (
        SELECT FROM message WHERE user_id = %(user_id)s AND conversation_id = %(conversation_id)s
        AND ui_id = %(user_ui_id)s AND superseded_at IS NULL)"""

# The reply a turn is producing: empty and `streaming` until it is finished,
# stopped or discarded.
NEW_REPLY = """
    INSERT INTO message (conversation_id, user_id, role, content, reply_to, ui_id, status, stale_at)
    SELECT conversation_id, %(user_id)s, 'assistant', '', id, %(reply_ui_id)s, 'streaming', now() + %(stale_after)s
"""

STORE_USER_MESSAGE = """, stored AS (
    INSERT INTO message (conversation_id, user_id, role, content, turn, ui_id)
    SELECT id, %(user_id)s, 'user', %(content)s, turn_count, %(user_ui_id)s FROM counted
    RETURNING conversation_id, id, turn
), reply AS (""" + NEW_REPLY + """    FROM stored
    RETURNING id
), claimed AS (
    UPDATE idempotency_key SET conversation_id = stored.conversation_id, user_message_id = stored.id
    FROM stored WHERE idempotency_key.user_id = %(user_id)s AND idempotency_key.key = %(key)s
)
SELECT {verdict}, {duplicate}, stored.conversation_id, stored.id, stored.turn, (SELECT id FROM reply)
FROM (SELECT) AS one LEFT JOIN stored ON true
"""


def store_user_message(target: str, write_step: bool, client_ui_id: bool = False) -> str:
    """The statement that stores a user message and its reply-to-be, into the
    conversation `target` (CONVERSATION_TARGETS), with or without the
    write-limit step, and for a message with the client's own `ui_id`."""
    conditions = " ".join(filter(None, ["AND EXISTS (SELECT FROM step)" if write_step else "",
                                        NOT_SENT_BEFORE if client_ui_id else ""]))
    counted = CONVERSATION_TARGETS[target].format(admitted=conditions)
    head = WRITE_STEP + counted if write_step else "\nWITH" + counted
    duplicate = "NOT EXISTS (SELECT FROM counted)" if client_ui_id else "false"
    return head + STORE_USER_MESSAGE.format(verdict=WRITE_VERDICT if write_step else "true, NULL::int",
                                            duplicate=duplicate)


STORE_IN_CONVERSATION = store_user_message("existing", write_step=True)
STORE_IN_NEW_CONVERSATION = store_user_message("new", write_step=True)

# The window: the last current messages up to and including the user message,
# newest first, leaving out replies still being produced (this turn's own
# among them) and empty ones: a backward scan of the (user_id, conversation_id,
# id) primary key that stops after `limit` rows, so its cost does not grow with
# the conversation's length.
WINDOW_FILTER = """superseded_at IS NULL AND NOT (status = 'streaming' AND stale_at > now())
  AND (role = 'user' OR content <> '' OR tool_calls <> '[]'::jsonb)"""

HISTORY_WINDOW = f"""
SELECT role, content, tool_calls FROM message
WHERE user_id = %(user_id)s AND conversation_id = %(conversation_id)s AND id <= %(up_to)s AND {WINDOW_FILTER}
ORDER BY id DESC LIMIT %(limit)s
"""

LATEST_WINDOW = f"""
SELECT role, content, tool_calls FROM message
WHERE user_id = %(user_id)s AND conversation_id = %(conversation_id)s AND {WINDOW_FILTER}
ORDER BY id DESC LIMIT %(limit)s
"""

USER_MESSAGE_TURN = """
SELECT turn FROM message
WHERE conversation_id = %(conversation_id)s AND id = %(id)s AND user_id = %(user_id)s AND superseded_at IS NULL
"""

# A retry that answers a stored user message again (its key failed, or its
# first request died): the reply it had, if any, is superseded, then a new one
# begun (two statements: the new reply's unique index must see the old one gone).
SUPERSEDE_REPLY = """
WITH superseded AS (
    UPDATE message SET superseded_at = now()
    WHERE conversation_id = %(conversation_id)s AND user_id = %(user_id)s AND reply_to = %(user_message_id)s
      AND superseded_at IS NULL
    RETURNING id
)
UPDATE conversation SET message_count = message_count + 1 - (SELECT count(*) FROM superseded)
WHERE id = %(conversation_id)s AND user_id = %(user_id)s
"""

ANSWER_AGAIN = """
WITH stored AS (
    SELECT conversation_id, id FROM message
    WHERE conversation_id = %(conversation_id)s AND id = %(user_message_id)s AND user_id = %(user_id)s
), reply AS (""" + NEW_REPLY + """    FROM stored
    RETURNING id
)
SELECT id FROM reply
"""

# Transaction 2: the reply, whole, and under a key the whole answer (with the
# reply's id) in the same commit. No row: the reply is no longer `streaming`
# (stopped meanwhile, superseded or gone).
FINISH_REPLY = """
WITH reply AS (
    UPDATE message
    SET content = %(content)s, tool_calls = %(tool_calls)s, model = %(model)s, finish_reason = %(finish_reason)s,
        usage = %(usage)s, status = 'complete', stale_at = NULL
    WHERE conversation_id = %(conversation_id)s AND id = %(reply_id)s AND user_id = %(user_id)s
      AND status = 'streaming' AND superseded_at IS NULL
    RETURNING id
), answered AS (
    UPDATE idempotency_key SET status = 'done', updated_at = now(), response = %(response)s
    FROM reply WHERE idempotency_key.user_id = %(user_id)s AND idempotency_key.key = %(key)s
)
SELECT id FROM reply
"""

# A stopped reply keeps the text its producer had when it saw the stop; the
# stop's note has served.
FINISH_STOPPED = """
WITH reply AS (
    UPDATE message SET content = %(content)s, tool_calls = %(tool_calls)s, model = %(model)s, usage = %(usage)s
    WHERE conversation_id = %(conversation_id)s AND id = %(reply_id)s AND user_id = %(user_id)s
      AND status = 'stopped' AND superseded_at IS NULL
    RETURNING id
), noted AS (
    DELETE FROM reply_stop WHERE user_id = %(user_id)s AND ui_id = %(reply_ui_id)s
), answered AS (
    UPDATE idempotency_key SET status = 'done', updated_at = now(), response = %(response)s
    FROM reply WHERE idempotency_key.user_id = %(user_id)s AND idempotency_key.key = %(key)s
)
SELECT id FROM reply
"""

# A failed turn keeps no reply.
DISCARD_REPLY = """
WITH discarded AS (
    DELETE FROM message
    WHERE conversation_id = %(conversation_id)s AND id = %(reply_id)s AND user_id = %(user_id)s
      AND status = 'streaming'
    RETURNING id
)
UPDATE conversation SET message_count = message_count - (SELECT count(*) FROM discarded)
WHERE id = %(conversation_id)s AND user_id = %(user_id)s
"""

# The current reply to a user message, as an answer.
CURRENT_REPLY = f"""
SELECT id, content, tool_calls, model, finish_reason, usage, {CURRENT_STATUS_SQL} FROM message
WHERE conversation_id = %(conversation_id)s AND reply_to = %(user_message_id)s AND user_id = %(user_id)s
  AND superseded_at IS NULL
"""

# While a reply is produced: the text since the last flush appended (no row:
# it was stopped meanwhile), or, when there is none, only whether it still runs.
APPEND_TEXT = """
UPDATE message SET content = content || %(more)s
WHERE conversation_id = %(conversation_id)s AND id = %(reply_id)s AND user_id = %(user_id)s AND status = 'streaming'
RETURNING id
"""

# Which of a process's replies (by ui_id) were stopped, for every user at once
# (policies/reply_stop.sql).
STOPPED_REPLIES = "SELECT stopped_replies(%(ui_ids)s)"


def message_chars(content: str, tool_calls: list) -> int:
    """A message's size as the window and the storage count it: its text and its tool calls' JSON."""
    return len(content) + (len(json.dumps(tool_calls)) if tool_calls else 0)
