"""Stops whose producer died are pruned: prune_reply_stops, run by
`flask --app wsgi prune` (policies/reply_stop_prune.sql says why it is safe).

Revision ID: 0012_prune_reply_stops
Revises: 0011_reply_stops
Create Date: 2026-12-06
"""
from pathlib import Path

from alembic import op

revision = "0012_prune_reply_stops"
down_revision = "0011_reply_stops"
branch_labels = None
depends_on = None

POLICY = Path(__file__).resolve().parents[2] / "policies" / "reply_stop_prune.sql"


def _cursor():
    return op.get_bind().connection.dbapi_connection.cursor()


def upgrade():
    _cursor().execute(POLICY.read_text())


def downgrade():
    _cursor().execute("DROP FUNCTION prune_reply_stops(double precision, integer); "
                      "DROP POLICY reply_stop_prune_read ON reply_stop; DROP POLICY reply_stop_prune ON reply_stop")
