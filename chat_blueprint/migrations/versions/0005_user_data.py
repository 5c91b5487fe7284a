"""The user's data: erasure by the app role, retention by the owner.

- The app role may DELETE its user's chat_rate_limit row (policies/
  chat_rate_limit.sql, applied again), so DELETE /api/{user_id}/data erases
  every table under the policy.
- policies/prune.sql: the SECURITY DEFINER functions `flask --app wsgi prune`
  calls, and the owner-only policies they need, since RLS is forced on the
  owner too.

Revision ID: 0005_user_data
Revises: 0004_message_model_metadata
Create Date: 2026-11-23
"""
from pathlib import Path

from alembic import op
from flask import current_app
from psycopg import sql

revision = "0005_user_data"
down_revision = "0004_message_model_metadata"
branch_labels = None
depends_on = None

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def _cursor():
    return op.get_bind().connection.dbapi_connection.cursor()


def upgrade():
    cursor = _cursor()
    cursor.execute("SELECT set_config('chat.app_role', %s, true)", (current_app.config["SETTINGS"].app_db_role,))
    cursor.execute((POLICIES / "chat_rate_limit.sql").read_text())
    cursor.execute((POLICIES / "prune.sql").read_text())


def downgrade():
    cursor = _cursor()
    cursor.execute("""
        DROP FUNCTION prune_idempotency_keys(double precision, integer);
        DROP FUNCTION prune_chat_rate_limits(text, integer);
        DROP POLICY idempotency_key_prune_read ON idempotency_key;
        DROP POLICY idempotency_key_prune ON idempotency_key;
        DROP POLICY chat_rate_limit_prune_read ON chat_rate_limit;
        DROP POLICY chat_rate_limit_prune ON chat_rate_limit;
    """)
    cursor.execute(sql.SQL("REVOKE DELETE ON chat_rate_limit FROM {}").format(
        sql.Identifier(current_app.config["SETTINGS"].app_db_role)))
