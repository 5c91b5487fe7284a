"""A turn's lifecycle: a reply is stored from the moment it is produced.

- `ui_id`: the id a chat UI keys the message by (the AI SDK's message id):
  the `start` event's `messageId` for replies; one per current message of a
  conversation. Existing messages get one made from their id; a message
  inserted without one gets a random one.
- `status`: `streaming` while the reply is produced (its `content` the text so
  far), then `complete` or `stopped`; a `streaming` reply whose `stale_at`
  has passed (its producer died) reads as `interrupted`.
- `superseded_at`: set when a newer reply (or message) replaces it; a user
  message is answered by at most one current reply. The unique index that
  says so leaves superseded replies out, so it can no longer serve the
  `reply_to` foreign key's lookups (a delete would scan the table for each
  row): `ix_message_reply_to` does.
- The app role may now UPDATE the columns a reply's progress, end and
  supersession change (policies/message.sql, applied again), and a search
  reads current messages only (policies/search.sql, applied again).

Revision ID: 0009_turn_lifecycle
Revises: 0008_search_and_feedback
Create Date: 2026-12-06
"""
from pathlib import Path

from alembic import op
from flask import current_app
from psycopg import sql

revision = "0009_turn_lifecycle"
down_revision = "0008_search_and_feedback"
branch_labels = None
depends_on = None

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def _cursor():
    return op.get_bind().connection.dbapi_connection.cursor()


def upgrade():
    cursor = _cursor()
    cursor.execute("""
        ALTER TABLE message
            ADD COLUMN ui_id text,
            ADD COLUMN status text NOT NULL DEFAULT 'complete',
            ADD COLUMN stale_at timestamptz,
            ADD COLUMN superseded_at timestamptz;
        -- The owner is bound by the forced policies too: lift FORCE for this
        -- transaction's backfill (policies/message.sql, applied below, forces it again).
        ALTER TABLE message NO FORCE ROW LEVEL SECURITY;
        UPDATE message SET ui_id = 'msg-' || id;
        ALTER TABLE message
            ALTER COLUMN ui_id SET NOT NULL,
            ALTER COLUMN ui_id SET DEFAULT 'msg-' || replace(gen_random_uuid()::text, '-', ''),
            ADD CONSTRAINT ck_message_ui_id_length CHECK (length(ui_id) BETWEEN 1 AND 255),
            ADD CONSTRAINT ck_message_status_known CHECK (status IN ('streaming', 'complete', 'stopped')),
            ADD CONSTRAINT ck_message_streaming_goes_stale CHECK ((status = 'streaming') = (stale_at IS NOT NULL));
        DROP INDEX uq_message_reply_to;
        CREATE UNIQUE INDEX uq_message_reply_to ON message (reply_to)
            WHERE reply_to IS NOT NULL AND superseded_at IS NULL;
        CREATE INDEX ix_message_reply_to ON message (reply_to) WHERE reply_to IS NOT NULL;
        CREATE UNIQUE INDEX uq_message_ui_id ON message (conversation_id, ui_id) WHERE superseded_at IS NULL;
        CREATE INDEX ix_message_streaming ON message (conversation_id) WHERE status = 'streaming';
        -- A search reads current messages whose text is final: a reply being produced is
        -- rewritten at every flush, which would recompute its text-search vector each time.
        DROP INDEX ix_message_search;
        CREATE INDEX ix_message_search ON message USING gin (user_id, to_tsvector('simple'::regconfig,
            search_text(content))) WHERE superseded_at IS NULL AND status <> 'streaming';
    """)
    cursor.execute("SELECT set_config('chat.app_role', %s, true)", (current_app.config["SETTINGS"].app_db_role,))
    cursor.execute((POLICIES / "message.sql").read_text())
    cursor.execute((POLICIES / "search.sql").read_text())  # searches leave superseded messages out


def downgrade():
    cursor = _cursor()
    cursor.execute("""
        DROP INDEX ix_message_streaming;
        DROP INDEX ix_message_search;
        CREATE INDEX ix_message_search
            ON message USING gin (user_id, to_tsvector('simple'::regconfig, search_text(content)));
        DROP INDEX uq_message_ui_id;
        DROP INDEX uq_message_reply_to;
        DROP INDEX ix_message_reply_to;
        DELETE FROM message WHERE superseded_at IS NOT NULL;
        CREATE UNIQUE INDEX uq_message_reply_to ON message (reply_to) WHERE reply_to IS NOT NULL;
        ALTER TABLE message DROP COLUMN ui_id, DROP COLUMN status, DROP COLUMN stale_at, DROP COLUMN superseded_at;
    """)
    cursor.execute(sql.SQL("REVOKE UPDATE ON message FROM {}").format(
        sql.Identifier(current_app.config["SETTINGS"].app_db_role)))
