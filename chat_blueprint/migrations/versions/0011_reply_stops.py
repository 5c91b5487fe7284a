"""Stops a producer learns of in one query per interval for all its replies.

reply_stop holds a row per stop asked for a reply being produced (its user,
its ui_id), until the producer has ended the reply; stopped_replies(ui_ids)
(policies/reply_stop.sql) tells a process which of its replies were stopped,
across users, in one statement, where a check per reply cost a transaction
per reply and per interval (a thousand a second for a thousand blocking turns).

Revision ID: 0011_reply_stops
Revises: 0010_per_user_keys
Create Date: 2026-12-06
"""
from pathlib import Path

from alembic import op
from flask import current_app

revision = "0011_reply_stops"
down_revision = "0010_per_user_keys"
branch_labels = None
depends_on = None

POLICY = Path(__file__).resolve().parents[2] / "policies" / "reply_stop.sql"


def _cursor():
    return op.get_bind().connection.dbapi_connection.cursor()


def upgrade():
    cursor = _cursor()
    cursor.execute("""
        CREATE TABLE reply_stop (
            user_id text NOT NULL,
            ui_id text NOT NULL,
            stopped_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_reply_stop PRIMARY KEY (ui_id, user_id),
            CONSTRAINT ck_reply_stop_user_id_not_blank CHECK (user_id <> '')
        )
    """)
    cursor.execute("SELECT set_config('chat.app_role', %s, true)", (current_app.config["SETTINGS"].app_db_role,))
    cursor.execute(POLICY.read_text())


def downgrade():
    _cursor().execute("DROP FUNCTION stopped_replies(text[]); DROP TABLE reply_stop")
