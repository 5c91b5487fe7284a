"""Per-user export rate limit state (EXPORT_RATE_LIMIT), and prune keeps
running idempotency keys.

- export_rate_limit: like write_rate_limit, one row per user holding the GCRA
  theoretical arrival time of the user's exports (GET /api/{user_id}/export),
  under the same forced row-level security, erased with the user's data, and
  pruned by `flask --app wsgi prune` through prune_export_rate_limits
  (policies/export_rate_limit.sql).
- policies/prune.sql, applied again: prune_idempotency_keys leaves a key that
  is still `running` until it too has not moved for the TTL (its signature, and
  so any EXECUTE granted on it, is unchanged). A downgrade keeps this body: it
  deletes a subset of what the previous one did.

Revision ID: 0007_export_rate_limit
Revises: 0006_write_rate_limit
Create Date: 2026-12-09
"""
from pathlib import Path

from alembic import op
from flask import current_app

revision = "0007_export_rate_limit"
down_revision = "0006_write_rate_limit"
branch_labels = None
depends_on = None

POLICIES = Path(__file__).resolve().parents[2] / "policies"


def _cursor():
    return op.get_bind().connection.dbapi_connection.cursor()


def upgrade():
    cursor = _cursor()
    cursor.execute("""
        CREATE TABLE export_rate_limit (
            user_id text NOT NULL,
            tat timestamptz NOT NULL,
            CONSTRAINT pk_export_rate_limit PRIMARY KEY (user_id),
            CONSTRAINT ck_export_rate_limit_user_id_not_blank CHECK (user_id <> '')
        )
    """)
    cursor.execute("SELECT set_config('chat.app_role', %s, true)", (current_app.config["SETTINGS"].app_db_role,))
    cursor.execute((POLICIES / "export_rate_limit.sql").read_text())
    cursor.execute((POLICIES / "prune.sql").read_text())


def downgrade():
    _cursor().execute("DROP FUNCTION prune_export_rate_limits(text, integer); DROP TABLE export_rate_limit")
