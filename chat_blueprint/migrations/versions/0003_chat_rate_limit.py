"""Per-user chat rate limit state, shared by every app instance.

One row per user holding the theoretical arrival time of the generic cell
rate algorithm (GCRA): a turn is admitted when pushing `tat` one emission
interval later keeps it within one period of now. Under the same forced
row-level security as the other tables.

Revision ID: 0003_chat_rate_limit
Revises: 0002_message_key_by_conversation
Create Date: 2026-11-22
"""
from pathlib import Path

from alembic import op
from flask import current_app

revision = "0003_chat_rate_limit"
down_revision = "0002_message_key_by_conversation"
branch_labels = None
depends_on = None

POLICY = Path(__file__).resolve().parents[2] / "policies" / "chat_rate_limit.sql"


def _cursor():
    return op.get_bind().connection.dbapi_connection.cursor()


def upgrade():
    cursor = _cursor()
    cursor.execute("""
        CREATE TABLE chat_rate_limit (
            user_id text NOT NULL,
            tat timestamptz NOT NULL,
            CONSTRAINT pk_chat_rate_limit PRIMARY KEY (user_id),
            CONSTRAINT ck_chat_rate_limit_user_id_not_blank CHECK (user_id <> '')
        )
    """)
    cursor.execute("SELECT set_config('chat.app_role', %s, true)", (current_app.config["SETTINGS"].app_db_role,))
    cursor.execute(POLICY.read_text())


def downgrade():
    _cursor().execute("DROP TABLE chat_rate_limit")
