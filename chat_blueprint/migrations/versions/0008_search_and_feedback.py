"""Finding and keeping conversations: search, archive, pin, feedback.

- conversation.archived and conversation.pinned (false). The list's index
  becomes two, (user_id, pinned DESC, updated_at DESC, id DESC) for the
  conversations kept and the same for the archived ones: the list always
  names which, and a query that does not (a search's titles) cannot use
  them, so it takes the title's GIN index however few conversations the
  planner expects the user to have (it cannot know whose rows the policy asks
  for: an InitPlan parameter, estimated as the average user).
- message.feedback_rating ('up', 'down'), feedback_comment and
  feedback_updated_at, on assistant messages only. The app role may UPDATE
  these three columns and no other: what was said stays append-only.
- Text search: the btree_gin extension (trusted: the owner of the database
  may create it; elsewhere a superuser creates it first) so that one GIN index
  holds the user's id beside the words, over message content and over titles,
  with the `simple` configuration (no stemming, any language); policies/
  search.sql for the function and policies that let a search use them under RLS.
- search_text(), what both sides of a search read: the first 50,000
  characters (which bounds a tsvector far below PostgreSQL's 1 MB), lowercased
  by ICU, so that a search ignores the case of every letter whatever the
  database's locale (with LC_CTYPE C, PostgreSQL lowercases ASCII only).
  A downgrade leaves btree_gin installed: it may have been there before, for
  other indexes.

Revision ID: 0008_search_and_feedback
Revises: 0007_export_rate_limit
Create Date: 2026-12-09
"""
from pathlib import Path

from alembic import op
from flask import current_app
from psycopg import sql

revision = "0008_search_and_feedback"
down_revision = "0007_export_rate_limit"
branch_labels = None
depends_on = None

POLICY = Path(__file__).resolve().parents[2] / "policies" / "search.sql"
FEEDBACK_COLUMNS = ("feedback_rating", "feedback_comment", "feedback_updated_at")


def _cursor():
    return op.get_bind().connection.dbapi_connection.cursor()


def _feedback_grant(verb: str, preposition: str) -> sql.Composed:
    return sql.SQL("{} UPDATE ({}) ON message {} {}").format(
        sql.SQL(verb), sql.SQL(", ").join(map(sql.Identifier, FEEDBACK_COLUMNS)), sql.SQL(preposition),
        sql.Identifier(current_app.config["SETTINGS"].app_db_role))


def upgrade():
    cursor = _cursor()
    cursor.execute("""
        CREATE EXTENSION IF NOT EXISTS btree_gin;
        CREATE FUNCTION search_text(document text) RETURNS text
            LANGUAGE sql IMMUTABLE PARALLEL SAFE
            RETURN lower(left(document, 50000) COLLATE "und-x-icu");

        ALTER TABLE conversation
            ADD COLUMN archived boolean NOT NULL DEFAULT false,
            ADD COLUMN pinned boolean NOT NULL DEFAULT false;
        DROP INDEX ix_conversation_user_updated;
        CREATE INDEX ix_conversation_user_listed
            ON conversation (user_id, pinned DESC, updated_at DESC, id DESC) WHERE NOT archived;
        CREATE INDEX ix_conversation_user_archived
            ON conversation (user_id, pinned DESC, updated_at DESC, id DESC) WHERE archived;
        CREATE INDEX ix_conversation_search
            ON conversation USING gin (user_id, to_tsvector('simple'::regconfig, search_text(title)));

        ALTER TABLE message
            ADD COLUMN feedback_rating text,
            ADD COLUMN feedback_comment text,
            ADD COLUMN feedback_updated_at timestamptz,
            ADD CONSTRAINT ck_message_feedback_rating_known CHECK (feedback_rating IN ('up', 'down')),
            ADD CONSTRAINT ck_message_feedback_comment_length CHECK (char_length(feedback_comment) <= 2000),
            ADD CONSTRAINT ck_message_feedback_on_replies CHECK (feedback_updated_at IS NULL OR role = 'assistant'),
            ADD CONSTRAINT ck_message_feedback_dated
                CHECK (feedback_updated_at IS NOT NULL OR (feedback_rating IS NULL AND feedback_comment IS NULL));
        CREATE INDEX ix_message_search
            ON message USING gin (user_id, to_tsvector('simple'::regconfig, search_text(content)));
    """)
    cursor.execute(_feedback_grant("GRANT", "TO"))
    cursor.execute("SELECT set_config('chat.app_role', %s, true)", (current_app.config["SETTINGS"].app_db_role,))
    cursor.execute(POLICY.read_text())


def downgrade():
    cursor = _cursor()
    cursor.execute("""
        DROP FUNCTION search_hits(tsquery);
        DROP POLICY message_search ON message;
        DROP POLICY conversation_search ON conversation;
        DROP INDEX ix_message_search;
        DROP INDEX ix_conversation_search;
    """)
    cursor.execute(_feedback_grant("REVOKE", "FROM"))
    cursor.execute("""
        ALTER TABLE message
            DROP COLUMN feedback_rating, DROP COLUMN feedback_comment, DROP COLUMN feedback_updated_at;
        DROP INDEX ix_conversation_user_listed;
        DROP INDEX ix_conversation_user_archived;
        CREATE INDEX ix_conversation_user_updated ON conversation (user_id, updated_at DESC, id DESC);
        ALTER TABLE conversation DROP COLUMN archived, DROP COLUMN pinned;
        DROP FUNCTION search_text(text);
    """)
