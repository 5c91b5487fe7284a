"""Conversations and their messages: the queries behind the history API.

Lists are keyset-paginated: a cursor (pagination.py) is the base64url JSON of
the last row's sort key, so a page costs the same however deep it is.

A search (`q`) keeps the list's order and pages and only narrows it: to the
conversations whose title or messages hold every word of `q`, each word
anywhere in the conversation (the reading chat UIs give it). The words are
found by `search_hits` (policies/search.sql says why it is a function), one
word at a time, through the GIN indexes of the user's messages and titles.
"""
from __future__ import annotations

import uuid

from sqlalchemy import BigInteger, column, delete, func, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import UUID
from sqlalchemy.orm import Session

from ..db.models import SEARCH_CONFIG, SEARCHED_CHARS, Conversation, Message
from ..errors import ApiError
from ..runtime import metrics
from . import pagination

SNIPPET_CHARS = 200

# One tsquery per distinct word the user typed, read as the messages are
# (search_text) and then by plainto_tsquery, which takes text, never query
# syntax: a word's lexemes are ANDed ("foo-bar" needs foo and bar), and a word
# without any ("-", "&") is left out.
WORD_QUERIES = f"""
SELECT DISTINCT plainto_tsquery('{SEARCH_CONFIG}', search_text(word)) AS query
FROM unnest(CAST(:words AS text[])) AS word
WHERE numnode(plainto_tsquery('{SEARCH_CONFIG}', search_text(word))) > 0
"""

# The conversations holding every word, each with the message to take its
# snippet from: the one holding the most words, the latest of those (none
# when the words are only in the title).
MATCHES = f"""
WITH words AS MATERIALIZED ({WORD_QUERIES}),
hits AS MATERIALIZED (
    SELECT words.query, hit.conversation_id, hit.message_id
    FROM words CROSS JOIN LATERAL search_hits(words.query) AS hit
),
matched AS (
    SELECT conversation_id FROM hits GROUP BY conversation_id
    HAVING count(DISTINCT query) = (SELECT count(*) FROM words)
),
best AS (
    SELECT DISTINCT ON (conversation_id) conversation_id, message_id FROM hits
    WHERE message_id IS NOT NULL AND conversation_id IN (SELECT conversation_id FROM matched)
    GROUP BY conversation_id, message_id
    ORDER BY conversation_id, count(*) DESC, message_id DESC
)
SELECT matched.conversation_id, best.message_id FROM matched LEFT JOIN best USING (conversation_id)
"""

# An excerpt of each chosen message around any of the words, as plain text
# (no highlighting marks: a snippet is characters of the message).
SNIPPETS = f"""
SELECT message.id,
       left(ts_headline('{SEARCH_CONFIG}', left(message.content, {SEARCHED_CHARS}), any_word.query,
                        'StartSel="", StopSel=""'), {SNIPPET_CHARS})
FROM (SELECT string_agg(query::text, ' | ')::tsquery AS query FROM ({WORD_QUERIES}) AS words) AS any_word,
     unnest(CAST(:conversations AS uuid[]), CAST(:messages AS bigint[])) AS page(conversation_id, id)
JOIN message ON message.conversation_id = page.conversation_id AND message.id = page.id
WHERE message.user_id = :user_id
"""

LIST_ORDER = (Conversation.pinned.desc(), Conversation.updated_at.desc(), Conversation.id.desc())


class ConversationNotFound(ApiError):
    def __init__(self):
        super().__init__(404, "conversation_not_found", "no such conversation")


class MessageNotFound(ApiError):
    def __init__(self):
        super().__init__(404, "message_not_found", "no such message")


class NotAnAssistantMessage(ApiError):
    def __init__(self):
        super().__init__(422, "not_an_assistant_message", "feedback is given on assistant messages only")


def search_words(q: str) -> list[str]:
    """The words of a search, split at any whitespace (an ideographic space
    too), each once."""
    return list(dict.fromkeys(q.split()))


def list_conversations(session: Session, user_id: str, limit: int, cursor: str | None, archived: bool = False,
                       q: str | None = None) -> tuple[list[dict], str | None]:
    """A page of the user's conversations, the archived ones or the others:
    pinned first, each group most recently updated first, keyset-paginated on
    (pinned, updated_at, id) along ix_conversation_user_listed (or _archived:
    the condition is written as a literal so that the partial index applies).
    With `q`, only those holding every word of it, each with its `snippet`."""
    kept = Conversation.archived if archived else ~Conversation.archived
    query = select(*Conversation.__table__.columns).where(Conversation.user_id == user_id, kept)
    if cursor is not None:
        after = pagination.decode_conversation(cursor)
        query = query.where(tuple_(Conversation.pinned, Conversation.updated_at, Conversation.id) < tuple_(*after))
    words = search_words(q) if q is not None else None
    if words is not None:
        matches = text(MATCHES).bindparams(words=words).columns(
            column("conversation_id", UUID(as_uuid=True)), column("message_id", BigInteger)).subquery("matches")
        query = query.join(matches, matches.c.conversation_id == Conversation.id).add_columns(matches.c.message_id)
    query = query.order_by(*LIST_ORDER).limit(limit + 1)
    with session.begin():
        rows = [dict(row) for row in session.execute(query).mappings()]
        if words is not None:
            _add_snippets(session, user_id, words, rows[:limit])
    return pagination.keyset_page(
        rows, limit, lambda last: pagination.encode_conversation(last["pinned"], last["updated_at"], last["id"]))


def _add_snippets(session: Session, user_id: str, words: list[str], page: list[dict]) -> None:
    """Each row's snippet, computed for the page's rows only (ts_headline
    reads the whole message): an excerpt of its chosen message, else its title."""
    chosen = [row for row in page if row["message_id"] is not None]
    excerpts = {}
    if chosen:
        excerpts = dict(session.execute(text(SNIPPETS), {
            "words": words, "user_id": user_id, "conversations": [row["id"] for row in chosen],
            "messages": [row["message_id"] for row in chosen]}).all())
    for row in page:
        row["snippet"] = excerpts.get(row["message_id"], row["title"][:SNIPPET_CHARS])


def get_conversation(session: Session, user_id: str, conversation_id: uuid.UUID) -> Conversation:
    with session.begin():
        conversation = session.scalar(
            select(Conversation).where(Conversation.id == conversation_id, Conversation.user_id == user_id))
    if conversation is None:
        raise ConversationNotFound()
    return conversation


def update_conversation(session: Session, user_id: str, conversation_id: uuid.UUID, changes: dict) -> Conversation:
    """Set any of `title`, `archived` and `pinned`. None of them moves
    `updated_at`: the list's order within each group follows messages only."""
    with session.begin():
        conversation = session.scalar(
            update(Conversation)
            .where(Conversation.id == conversation_id, Conversation.user_id == user_id)
            .values(**changes)
            .returning(Conversation)
            .execution_options(synchronize_session=False)
        )
    if conversation is None:
        raise ConversationNotFound()
    return conversation


def delete_conversation(session: Session, user_id: str, conversation_id: uuid.UUID) -> None:
    """Its messages go with it (ON DELETE CASCADE)."""
    with session.begin():
        deleted = session.scalar(
            delete(Conversation)
            .where(Conversation.id == conversation_id, Conversation.user_id == user_id)
            .returning(Conversation.id)
        )
    if deleted is None:
        raise ConversationNotFound()


def list_messages(session: Session, user_id: str, conversation_id: uuid.UUID, limit: int, cursor: str | None,
                  order: str, superseded: bool = False) -> tuple[list, str | None]:
    """A page of a conversation's current messages (with `superseded`, also the
    ones a newer message replaced) in id order, keyset-paginated on id."""
    query = select(Message).where(Message.conversation_id == conversation_id, Message.user_id == user_id)
    if not superseded:
        query = query.where(Message.superseded_at.is_(None))
    if cursor is not None:
        after_id = pagination.decode_message(cursor)
        query = query.where(Message.id > after_id if order == "asc" else Message.id < after_id)
    query = query.order_by(Message.id.asc() if order == "asc" else Message.id.desc()).limit(limit + 1)
    with session.begin():
        exists = session.scalar(
            select(Conversation.id).where(Conversation.id == conversation_id, Conversation.user_id == user_id))
        if exists is None:
            raise ConversationNotFound()
        rows = list(session.scalars(query))
    return pagination.keyset_page(rows, limit, lambda last: pagination.encode_message(last.id))


# The conversation (to tell a 404), and its reply being produced made `stopped`
# and noted in reply_stop (its producer, on any instance, sees it at its next
# flush, or its process's next look at reply_stop: services/progress.py).
STOP = text("""
WITH conversation AS (
    SELECT id FROM conversation WHERE id = :conversation_id AND user_id = :user_id
), stopped AS (
    UPDATE message SET status = 'stopped', stale_at = NULL
    WHERE conversation_id = :conversation_id AND user_id = :user_id AND status = 'streaming'
      AND stale_at > now() AND superseded_at IS NULL
    RETURNING id, ui_id
), noted AS (
    INSERT INTO reply_stop (user_id, ui_id) SELECT :user_id, ui_id FROM stopped ON CONFLICT DO NOTHING
)
SELECT EXISTS (SELECT FROM conversation), (SELECT max(id) FROM stopped)
""")


def stop(session: Session, user_id: str, conversation_id: uuid.UUID) -> int | None:
    """Stop the reply the conversation is producing, on whichever instance: the
    id of the reply stopped, or None when none was being produced."""
    with session.begin():
        exists, stopped = session.execute(STOP, {"conversation_id": conversation_id, "user_id": user_id}).one()
    if not exists:
        raise ConversationNotFound()
    return stopped


def give_feedback(session: Session, user_id: str, conversation_id: uuid.UUID, message_id: int, rating: str | None,
                  comment: str | None) -> Message:
    """Replace the user's feedback on an assistant message (a PUT): its
    rating and comment are exactly those given, and with neither (or an
    empty comment) the message has no feedback. The row is locked while it
    is read and written, so of two changes at once each sees the other's
    result. A change of rating counts once in `assistant_feedback_total`,
    under the new rating (`none` when cleared) and the model of the reply;
    the same rating again, or a new comment alone, counts nothing."""
    where = (Message.conversation_id == conversation_id, Message.id == message_id, Message.user_id == user_id)
    comment = comment or None
    given = rating is not None or comment is not None
    with session.begin():
        found = session.execute(
            select(Message.role, Message.model, Message.feedback_rating).where(*where).with_for_update()).first()
        if found is None:
            raise MessageNotFound()
        if found.role != "assistant":
            raise NotAnAssistantMessage()
        message = session.scalar(
            update(Message)
            .where(*where)
            .values(feedback_rating=rating, feedback_comment=comment,
                    feedback_updated_at=func.now() if given else None)
            .returning(Message)
            .execution_options(synchronize_session=False)
        )
    if found.feedback_rating != rating:
        metrics.count_feedback(rating, found.model)
    return message
