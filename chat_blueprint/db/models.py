"""Typed models of the tables. Every row carries `user_id`; the
row-level-security policies in `policies/` filter on it, and every primary
key, foreign key and unique index of a table with `user_id` leads with it
(per-user conversation ids; a schema a database distributed by user can hold)."""
from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Text,
    func,
    literal_column,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import Mapped, column_property, mapped_column

from .extensions import db

NOT_BLANK_USER = "user_id <> ''"
BIGINT_MAX = 2**63 - 1  # the largest id a bigint column holds
# Text search reads search_text(...) (migration 0007: the first SEARCHED_CHARS
# characters, lowercased by ICU) with the `simple`
# configuration (no stemming, any language); policies/search.sql and the
# indexes below must say the same, or the index is not used.
SEARCH_CONFIG = "simple"
SEARCHED_CHARS = 50_000
RATINGS = ("up", "down")
FEEDBACK_COMMENT_MAX_CHARS = 2000


class Task(db.Model):
    __tablename__ = "task"
    __table_args__ = (
        CheckConstraint(NOT_BLANK_USER, name="user_id_not_blank"),
        PrimaryKeyConstraint("user_id", "id"),
        Index("ix_task_user_created", "user_id", text("created_at DESC"), text("id DESC")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    user_id: Mapped[str] = mapped_column(Text)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(String(1000), server_default="")
    completed: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Conversation(db.Model):
    __tablename__ = "conversation"
    __table_args__ = (
        CheckConstraint(NOT_BLANK_USER, name="user_id_not_blank"),
        PrimaryKeyConstraint("id", "user_id"),  # no btree led by user_id: see migration 0010
        # The list always names archived or not (a literal, so these partial
        # indexes apply); a search's titles, which do not, take the GIN index.
        Index("ix_conversation_user_listed", "user_id", text("pinned DESC"), text("updated_at DESC"), text("id DESC"),
              postgresql_where=text("NOT archived")),
        Index("ix_conversation_user_archived", "user_id", text("pinned DESC"), text("updated_at DESC"),
              text("id DESC"), postgresql_where=text("archived")),
        Index("ix_conversation_search", "user_id",
              text(f"to_tsvector('{SEARCH_CONFIG}'::regconfig, search_text(title))"), postgresql_using="gin"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), server_default=func.gen_random_uuid())
    user_id: Mapped[str] = mapped_column(Text)
    title: Mapped[str] = mapped_column(String(200))
    message_count: Mapped[int] = mapped_column(Integer, server_default="0")
    turn_count: Mapped[int] = mapped_column(Integer, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    archived: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    pinned: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))


# What a message's status reads as now: a reply still `streaming` after its
# `stale_at` (its producer died) is `interrupted`. The one definition, used by
# the ORM (`Message.current_status`) and by the raw SQL of turns and exports.
def current_status_sql(alias: str = "") -> str:
    """The status expression for the message table (or its alias `alias`)."""
    of = f"{alias}." if alias else ""
    return f"CASE WHEN {of}status = 'streaming' AND {of}stale_at <= now() THEN 'interrupted' ELSE {of}status END"


CURRENT_STATUS_SQL = current_status_sql()


class Message(db.Model):
    """One chat message, keyed by (user_id, conversation_id, id): every query names
    its user and conversation. `turn` is the ordinal of a user message within its
    conversation (1, 2, 3...), assigned under the conversation's row lock.

    A reply exists from the moment it is produced: `streaming` (its content
    the text so far), then `complete` or `stopped`; `ui_id` is the id a chat
    UI keys it by; a superseded message is kept, out of the conversation's
    current messages.
    Feedback (a rating, a comment, when) is given on assistant messages only;
    the app role may update those three columns, and those a reply's progress,
    end and supersession change, and no other."""

    __tablename__ = "message"
    __table_args__ = (
        CheckConstraint("role IN ('user', 'assistant')", name="role_known"),
        CheckConstraint("(role = 'assistant') = (reply_to IS NOT NULL)", name="assistant_replies"),
        CheckConstraint("(role = 'user') = (turn IS NOT NULL)", name="user_has_turn"),
        PrimaryKeyConstraint("conversation_id", "id", "user_id"),
        ForeignKeyConstraint(
            ["user_id", "conversation_id"],
            ["conversation.user_id", "conversation.id"],
            ondelete="CASCADE",
        ),
        ForeignKeyConstraint(
            ["user_id", "conversation_id", "reply_to"],
            ["message.user_id", "message.conversation_id", "message.id"],
            ondelete="CASCADE",
        ),
        CheckConstraint("length(ui_id) BETWEEN 1 AND 255", name="ui_id_length"),
        CheckConstraint("status IN ('streaming', 'complete', 'stopped')", name="status_known"),
        CheckConstraint("(status = 'streaming') = (stale_at IS NOT NULL)", name="streaming_goes_stale"),
        Index("uq_message_reply_to", "conversation_id", "reply_to", "user_id", unique=True,
              postgresql_where=text("reply_to IS NOT NULL AND superseded_at IS NULL")),
        Index("ix_message_reply_to", "conversation_id", "reply_to", "user_id",
              postgresql_where=text("reply_to IS NOT NULL")),
        Index("uq_message_ui_id", "conversation_id", "ui_id", "user_id", unique=True,
              postgresql_where=text("superseded_at IS NULL")),
        Index("ix_message_streaming", "conversation_id", "user_id", postgresql_where=text("status = 'streaming'")),
        CheckConstraint(f"feedback_rating IN {RATINGS!r}", name="feedback_rating_known"),
        CheckConstraint(f"char_length(feedback_comment) <= {FEEDBACK_COMMENT_MAX_CHARS}",
                        name="feedback_comment_length"),
        CheckConstraint("feedback_updated_at IS NULL OR role = 'assistant'", name="feedback_on_replies"),
        CheckConstraint("feedback_updated_at IS NOT NULL OR (feedback_rating IS NULL AND feedback_comment IS NULL)",
                        name="feedback_dated"),
        Index("ix_message_search", "user_id", text(f"to_tsvector('{SEARCH_CONFIG}'::regconfig, search_text(content))"),
              postgresql_using="gin",
              postgresql_where=text("superseded_at IS NULL AND status <> 'streaming'")),
    )

    conversation_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True))
    user_id: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(Text)
    content: Mapped[str] = mapped_column(Text)
    tool_calls: Mapped[list] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    reply_to: Mapped[int | None] = mapped_column(BigInteger)
    turn: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    model: Mapped[str | None] = mapped_column(Text)  # what the assistant backend reported (replies only)
    finish_reason: Mapped[str | None] = mapped_column(Text)
    usage: Mapped[dict | None] = mapped_column(JSONB)
    ui_id: Mapped[str] = mapped_column(Text, server_default=text("'msg-' || replace(gen_random_uuid()::text, '-', '')"))
    status: Mapped[str] = mapped_column(Text, server_default="complete")
    stale_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    superseded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    current_status: Mapped[str] = column_property(literal_column(CURRENT_STATUS_SQL))
    feedback_rating: Mapped[str | None] = mapped_column(Text)
    feedback_comment: Mapped[str | None] = mapped_column(Text)
    feedback_updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class IdempotencyKey(db.Model):
    """The first request and answer under one user's `Idempotency-Key`."""

    __tablename__ = "idempotency_key"
    __table_args__ = (
        CheckConstraint(NOT_BLANK_USER, name="user_id_not_blank"),
        CheckConstraint("status IN ('running', 'done', 'failed')", name="status_known"),
        Index("ix_idempotency_key_created", "created_at"),  # the purge of expired keys
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    conversation_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    user_message_id: Mapped[int | None] = mapped_column(BigInteger)
    response: Mapped[dict | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ChatRateLimit(db.Model):
    """A user's chat rate state: the GCRA theoretical arrival time."""

    __tablename__ = "chat_rate_limit"
    __table_args__ = (CheckConstraint(NOT_BLANK_USER, name="user_id_not_blank"),)

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tat: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WriteRateLimit(db.Model):
    """A user's write rate state (WRITE_RATE_LIMIT): the GCRA theoretical arrival time."""

    __tablename__ = "write_rate_limit"
    __table_args__ = (CheckConstraint(NOT_BLANK_USER, name="user_id_not_blank"),)

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tat: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ExportRateLimit(db.Model):
    """A user's export rate state (EXPORT_RATE_LIMIT): the GCRA theoretical arrival time."""

    __tablename__ = "export_rate_limit"
    __table_args__ = (CheckConstraint(NOT_BLANK_USER, name="user_id_not_blank"),)

    user_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tat: Mapped[datetime] = mapped_column(DateTime(timezone=True))



class ReplyStop(db.Model):
    """A stop asked for a reply being produced, until its producer has ended it."""

    __tablename__ = "reply_stop"
    __table_args__ = (
        CheckConstraint(NOT_BLANK_USER, name="user_id_not_blank"),
        PrimaryKeyConstraint("ui_id", "user_id"),
    )

    user_id: Mapped[str] = mapped_column(Text)
    ui_id: Mapped[str] = mapped_column(Text)
    stopped_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


ISOLATED_TABLES = ("conversation", "message", "task", "idempotency_key", "chat_rate_limit", "write_rate_limit",
                   "export_rate_limit", "reply_stop")
