"""Keys include user_id: conversation ids are per user.

A conversation is identified by (user_id, id), so a client may choose the id
of a new conversation (the AI SDK's chat id) without learning anything about
other users' ids, and every primary key, foreign key and unique index of a
table with user_id includes it, which is also what a database distributed by
user_id (Citus) requires. Existing rows keep their ids: an upgrade in place.

On conversation and message, user_id comes after the narrower columns of
each btree key: a search's only condition on the user is the isolation
policy's, and a btree led by user_id would lure the planner, which cannot
know whose rows the policy asks for, into reading every row of the user
instead of the text-search index (tests/test_search.py holds the plan).

Revision ID: 0010_per_user_keys
Revises: 0009_turn_lifecycle
Create Date: 2026-12-06
"""
from alembic import op

revision = "0010_per_user_keys"
down_revision = "0009_turn_lifecycle"
branch_labels = None
depends_on = None


def _cursor():
    return op.get_bind().connection.dbapi_connection.cursor()


def upgrade():
    _cursor().execute("""
        ALTER TABLE message DROP CONSTRAINT fk_message_conversation_id_user_id_conversation;
        ALTER TABLE message DROP CONSTRAINT fk_message_reply_to_conversation_id_message;
        ALTER TABLE conversation DROP CONSTRAINT uq_conversation_id_user_id;
        ALTER TABLE conversation DROP CONSTRAINT pk_conversation;
        ALTER TABLE conversation ADD CONSTRAINT pk_conversation PRIMARY KEY (id, user_id);
        ALTER TABLE message DROP CONSTRAINT pk_message;
        ALTER TABLE message ADD CONSTRAINT pk_message PRIMARY KEY (conversation_id, id, user_id);
        ALTER TABLE message ADD CONSTRAINT fk_message_user_id_conversation_id_conversation
            FOREIGN KEY (user_id, conversation_id) REFERENCES conversation (user_id, id) ON DELETE CASCADE;
        ALTER TABLE message ADD CONSTRAINT fk_message_user_id_conversation_id_reply_to_message
            FOREIGN KEY (user_id, conversation_id, reply_to) REFERENCES message (user_id, conversation_id, id)
            ON DELETE CASCADE;
        DROP INDEX uq_message_reply_to;
        CREATE UNIQUE INDEX uq_message_reply_to ON message (conversation_id, reply_to, user_id)
            WHERE reply_to IS NOT NULL AND superseded_at IS NULL;
        DROP INDEX ix_message_reply_to;
        CREATE INDEX ix_message_reply_to ON message (conversation_id, reply_to, user_id) WHERE reply_to IS NOT NULL;
        DROP INDEX uq_message_ui_id;
        CREATE UNIQUE INDEX uq_message_ui_id ON message (conversation_id, ui_id, user_id) WHERE superseded_at IS NULL;
        DROP INDEX ix_message_streaming;
        CREATE INDEX ix_message_streaming ON message (conversation_id, user_id) WHERE status = 'streaming';
        ALTER TABLE task DROP CONSTRAINT pk_task;
        ALTER TABLE task ADD CONSTRAINT pk_task PRIMARY KEY (user_id, id);
    """)


def downgrade():
    """Back to global conversation ids: refused while two users share one."""
    _cursor().execute("""
        ALTER TABLE task DROP CONSTRAINT pk_task;
        ALTER TABLE task ADD CONSTRAINT pk_task PRIMARY KEY (id);
        DROP INDEX ix_message_streaming;
        CREATE INDEX ix_message_streaming ON message (conversation_id) WHERE status = 'streaming';
        DROP INDEX uq_message_ui_id;
        CREATE UNIQUE INDEX uq_message_ui_id ON message (conversation_id, ui_id) WHERE superseded_at IS NULL;
        DROP INDEX ix_message_reply_to;
        CREATE INDEX ix_message_reply_to ON message (reply_to) WHERE reply_to IS NOT NULL;
        DROP INDEX uq_message_reply_to;
        CREATE UNIQUE INDEX uq_message_reply_to ON message (reply_to) WHERE reply_to IS NOT NULL AND superseded_at IS NULL;
        ALTER TABLE message DROP CONSTRAINT fk_message_user_id_conversation_id_reply_to_message;
        ALTER TABLE message DROP CONSTRAINT fk_message_user_id_conversation_id_conversation;
        ALTER TABLE message DROP CONSTRAINT pk_message;
        ALTER TABLE message ADD CONSTRAINT pk_message PRIMARY KEY (conversation_id, id);
        ALTER TABLE conversation DROP CONSTRAINT pk_conversation;
        ALTER TABLE conversation ADD CONSTRAINT pk_conversation PRIMARY KEY (id);
        ALTER TABLE conversation ADD CONSTRAINT uq_conversation_id_user_id UNIQUE (id, user_id);
        ALTER TABLE message ADD CONSTRAINT fk_message_conversation_id_user_id_conversation
            FOREIGN KEY (conversation_id, user_id) REFERENCES conversation (id, user_id) ON DELETE CASCADE;
        ALTER TABLE message ADD CONSTRAINT fk_message_reply_to_conversation_id_message
            FOREIGN KEY (reply_to, conversation_id) REFERENCES message (id, conversation_id) ON DELETE CASCADE;
    """)
