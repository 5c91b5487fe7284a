"""Key messages by (conversation_id, id).

With a primary key on `id` alone, the planner may answer "the last 50
messages of conversation X" by walking the primary key backwards through
every newer message of every other conversation, whenever it believes X is
large (seen in the history-growth benchmark: a 10,000-message conversation
was 1.6x slower per turn). With no index led by `id`, the only ordered path
is the conversation's own range. Every query already names the conversation.

Revision ID: 0002_message_key_by_conversation
Revises: 0001_initial
Create Date: 2026-11-22
"""
from alembic import op

revision = "0002_message_key_by_conversation"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def _execute(sql: str) -> None:
    op.get_bind().connection.dbapi_connection.cursor().execute(sql)


def upgrade():
    _execute("""
        ALTER TABLE message DROP CONSTRAINT fk_message_reply_to_conversation_id_message;
        ALTER TABLE message DROP CONSTRAINT uq_message_id_conversation_id;
        ALTER TABLE message DROP CONSTRAINT pk_message;
        ALTER TABLE message ADD CONSTRAINT pk_message PRIMARY KEY (conversation_id, id);
        DROP INDEX ix_message_conversation_id;
        ALTER TABLE message ADD CONSTRAINT fk_message_reply_to_conversation_id_message
            FOREIGN KEY (reply_to, conversation_id) REFERENCES message (id, conversation_id) ON DELETE CASCADE;
    """)


def downgrade():
    _execute("""
        ALTER TABLE message DROP CONSTRAINT fk_message_reply_to_conversation_id_message;
        ALTER TABLE message DROP CONSTRAINT pk_message;
        ALTER TABLE message ADD CONSTRAINT pk_message PRIMARY KEY (id);
        ALTER TABLE message ADD CONSTRAINT uq_message_id_conversation_id UNIQUE (id, conversation_id);
        CREATE INDEX ix_message_conversation_id ON message (conversation_id, id);
        ALTER TABLE message ADD CONSTRAINT fk_message_reply_to_conversation_id_message
            FOREIGN KEY (reply_to, conversation_id) REFERENCES message (id, conversation_id) ON DELETE CASCADE;
    """)
