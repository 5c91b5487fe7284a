"""What the assistant backend reported with each reply: model, finish_reason, usage.

Null on user messages and on replies stored before this revision. A reply cut
off at the token limit keeps `finish_reason = 'length'`, so it is never
presented as complete.

Revision ID: 0004_message_model_metadata
Revises: 0003_chat_rate_limit
Create Date: 2026-12-02
"""
from alembic import op

revision = "0004_message_model_metadata"
down_revision = "0003_chat_rate_limit"
branch_labels = None
depends_on = None


def upgrade():
    op.execute("""
        ALTER TABLE message
            ADD COLUMN model text,
            ADD COLUMN finish_reason text,
            ADD COLUMN usage jsonb
    """)


def downgrade():
    op.execute("ALTER TABLE message DROP COLUMN model, DROP COLUMN finish_reason, DROP COLUMN usage")
