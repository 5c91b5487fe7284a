"""Per-user write rate limit state (WRITE_RATE_LIMIT), shared by every instance.

Like chat_rate_limit: one row per user holding the GCRA theoretical arrival
time of the user's writes (every POST, PUT, PATCH and DELETE under
/api/{user_id}), under the same forced row-level security, erased with the
user's data, and pruned by `flask --app wsgi prune` through
prune_write_rate_limits (policies/write_rate_limit.sql).

Revision ID: 0006_write_rate_limit
Revises: 0005_user_data
Create Date: 2026-12-02
"""
from pathlib import Path

from alembic import op
from flask import current_app

revision = "0006_write_rate_limit"
down_revision = "0005_user_data"
branch_labels = None
depends_on = None

POLICY = Path(__file__).resolve().parents[2] / "policies" / "write_rate_limit.sql"


def _cursor():
    return op.get_bind().connection.dbapi_connection.cursor()


def upgrade():
    cursor = _cursor()
    cursor.execute("""
        CREATE TABLE write_rate_limit (
            user_id text NOT NULL,
            tat timestamptz NOT NULL,
            CONSTRAINT pk_write_rate_limit PRIMARY KEY (user_id),
            CONSTRAINT ck_write_rate_limit_user_id_not_blank CHECK (user_id <> '')
        )
    """)
    cursor.execute("SELECT set_config('chat.app_role', %s, true)", (current_app.config["SETTINGS"].app_db_role,))
    cursor.execute(POLICY.read_text())


def downgrade():
    _cursor().execute("DROP FUNCTION prune_write_rate_limits(text, integer); DROP TABLE write_rate_limit")
