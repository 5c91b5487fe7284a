"""Turns that rewrite a conversation's end, and a message sent twice (no Flask here).

- Regenerate: the conversation's last current user message (or the one a given
  reply answered) is answered again; its reply and every message after it are
  superseded: kept, with `superseded_at`, but out of the window, the count and
  the list.
- Edit: a user message and every message after it are superseded, and the new
  text is stored as a new user message (keeping the old one's `ui_id`) and answered.
- A message whose `ui_id` the conversation already holds (a client sending it
  twice) stores nothing new: its turn is replayed, or answered again when its
  reply was lost (interrupted, or failed).

Each runs in the turn's first transaction, under the conversation's row lock,
so it cannot interleave with another turn of the conversation; a reply still
being produced makes a rewrite a 409.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ..db.models import current_status_sql
from ..errors import ApiError
from .conversations import ConversationNotFound
from .turn_sql import ANSWER_AGAIN, HISTORY_WINDOW, NEW_REPLY, SUPERSEDE_REPLY

KINDS = ("regenerate", "edit")


@dataclass(frozen=True)
class Rewrite:
    """What to rewrite: `regenerate` (a reply: by `ui_id`, else the last) or
    `edit` (a user message: by `message_id` or `ui_id`)."""

    kind: str
    message_id: int | None = None
    ui_id: str | None = None


class ReplyInProgress(ApiError):
    def __init__(self):
        super().__init__(409, "reply_in_progress", "a reply of this conversation is being produced; stop it or "
                                                   "wait for it first", headers={"Retry-After": "1"})


class NothingToRegenerate(ApiError):
    def __init__(self):
        super().__init__(422, "validation_failed", "the request has invalid fields",
                         fields={"regenerate": ["The conversation has no user message to answer again."]})


class MessageNotFound(ApiError):
    def __init__(self, what: str = "user message"):
        super().__init__(404, "message_not_found", f"no such current {what} in this conversation")


# The conversation locked (as a turn locks it) and whether a reply is being produced.
LOCK = """
UPDATE conversation SET updated_at = updated_at
WHERE user_id = %(user_id)s AND id = %(conversation_id)s
RETURNING (SELECT EXISTS (SELECT FROM message WHERE user_id = %(user_id)s AND conversation_id = %(conversation_id)s
                          AND status = 'streaming' AND stale_at > now() AND superseded_at IS NULL))
"""

CURRENT = "user_id = %(user_id)s AND conversation_id = %(conversation_id)s AND superseded_at IS NULL"

# The user message a rewrite starts from: (id, turn, role, ui_id, reply_to) of the message it names.
LAST_USER_MESSAGE = f"SELECT id, turn, role, ui_id, reply_to FROM message WHERE {CURRENT} AND role = 'user' " \
                    "ORDER BY id DESC LIMIT 1"
MESSAGE_BY_ID = f"SELECT id, turn, role, ui_id, reply_to FROM message WHERE {CURRENT} AND id = %(target_id)s"
MESSAGE_BY_UI_ID = f"SELECT id, turn, role, ui_id, reply_to FROM message WHERE {CURRENT} AND ui_id = %(target_ui_id)s"

# Everything from `from_id` on is superseded; the count keeps to current messages.
SUPERSEDE_FROM = f"""
WITH superseded AS (
    UPDATE message SET superseded_at = now() WHERE {CURRENT} AND id >= %(from_id)s RETURNING id
)
UPDATE conversation
SET message_count = message_count - (SELECT count(*) FROM superseded) + %(added)s,
    turn_count = turn_count + %(new_turns)s, updated_at = now()
WHERE user_id = %(user_id)s AND id = %(conversation_id)s
RETURNING turn_count
"""

# The edited text, as the conversation's newest user message, and its reply-to-be.
STORE_EDIT = f"""
WITH stored AS (
    INSERT INTO message (conversation_id, user_id, role, content, turn, ui_id)
    SELECT id, %(user_id)s, 'user', %(content)s, turn_count, %(user_ui_id)s FROM conversation
    WHERE user_id = %(user_id)s AND id = %(conversation_id)s
    RETURNING conversation_id, id, turn
), reply AS ({NEW_REPLY}    FROM stored
    RETURNING id
)
SELECT stored.id, stored.turn, reply.id FROM stored, reply
"""

# A user message sent again: it and its current reply.
SENT_BEFORE = f"""
SELECT u.id, u.turn, r.id, r.ui_id, {current_status_sql("r")},
       r.content, r.tool_calls, r.model, r.finish_reason, r.usage
FROM message u LEFT JOIN message r
  ON r.user_id = u.user_id AND r.conversation_id = u.conversation_id AND r.reply_to = u.id AND r.superseded_at IS NULL
WHERE u.user_id = %(user_id)s AND u.conversation_id = %(conversation_id)s AND u.ui_id = %(user_ui_id)s
  AND u.role = 'user' AND u.superseded_at IS NULL
"""


def _one(connection, statement: str, params: dict):
    cursor = connection.cursor()
    cursor.execute(statement, params)
    return cursor.fetchone()


def rewrite(turns, connection, request, new_ui_id) -> tuple:
    """Supersede what the rewrite replaces and begin its reply: the user message
    answered (id, turn), the window rows (newest first) and the reply's (id, ui_id)."""
    params = {"user_id": request.user_id, "conversation_id": request.conversation_id,
              "target_id": request.rewrite.message_id, "target_ui_id": request.rewrite.ui_id,
              "stale_after": timedelta(seconds=turns.stale_after_s), "limit": turns.history_limit,
              "reply_ui_id": new_ui_id()}
    locked = _one(connection, LOCK, params)
    if locked is None:
        raise ConversationNotFound()
    if locked[0]:
        raise ReplyInProgress()
    target = _target(connection, request.rewrite, params)
    message_id, turn, role, ui_id, reply_to = target
    if request.rewrite.kind == "regenerate":
        if role == "assistant":
            message_id, turn = _one(connection, MESSAGE_BY_ID, {**params, "target_id": reply_to})[:2]
        _one(connection, SUPERSEDE_FROM, {**params, "from_id": message_id + 1, "added": 1, "new_turns": 0})
        reply_id = _one(connection, ANSWER_AGAIN, {**params, "user_message_id": message_id})[0]
    else:
        params.update(content=request.message, user_ui_id=ui_id)
        _one(connection, SUPERSEDE_FROM, {**params, "from_id": message_id, "added": 2, "new_turns": 1})
        message_id, turn, reply_id = _one(connection, STORE_EDIT, params)
    window = connection.cursor()
    window.execute(HISTORY_WINDOW, {**params, "up_to": message_id})
    return message_id, turn, window.fetchall(), reply_id, params["reply_ui_id"]


def _target(connection, rewrite_: Rewrite, params: dict):
    if rewrite_.kind == "regenerate" and rewrite_.ui_id is None:
        found = _one(connection, LAST_USER_MESSAGE, params)
        if found is None:
            raise NothingToRegenerate()
        return found
    found = _one(connection, MESSAGE_BY_UI_ID if rewrite_.message_id is None else MESSAGE_BY_ID, params)
    if found is None or (rewrite_.kind == "edit" and found[2] != "user"):
        raise MessageNotFound("user message" if rewrite_.kind == "edit" else "message")
    return found


def sent_before(turns, connection, request, new_ui_id):
    """A message whose ui_id the conversation holds: its stored answer (a dict, and
    the reply's ui_id), or, its reply lost, the user message answered again as
    `rewrite` does (a tuple)."""
    params = {"user_id": request.user_id, "conversation_id": request.conversation_id,
              "user_ui_id": request.user_ui_id, "stale_after": timedelta(seconds=turns.stale_after_s),
              "limit": turns.history_limit, "reply_ui_id": new_ui_id()}
    found = _one(connection, SENT_BEFORE, params)
    if found is None:
        raise ReplyInProgress()  # sent twice at once: the other request stores and answers it
    user_message_id, turn, reply_id, reply_ui_id, status, content, tool_calls, model, finish_reason, usage = found
    if status in ("complete", "stopped"):
        answer = {"conversation_id": str(request.conversation_id), "response": content, "tool_calls": tool_calls,
                  "user_message_id": user_message_id, "assistant_message_id": reply_id, "model": model,
                  "finish_reason": finish_reason, "usage": usage, "status": status}
        return answer, reply_ui_id
    if status == "streaming":
        raise ReplyInProgress()
    params.update(user_message_id=user_message_id, up_to=user_message_id)
    _one(connection, SUPERSEDE_REPLY.rstrip() + "\nRETURNING id", params)
    reply_id = _one(connection, ANSWER_AGAIN, params)[0]
    window = connection.cursor()
    window.execute(HISTORY_WINDOW, params)
    return user_message_id, turn, window.fetchall(), reply_id, params["reply_ui_id"]
