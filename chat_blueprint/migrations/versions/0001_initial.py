"""Tables conversation, message, task and idempotency_key, with forced
row-level security from policies/*.sql and privileges for APP_DB_ROLE.

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-22
"""
from pathlib import Path

from alembic import op
from flask import current_app

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

POLICIES = Path(__file__).resolve().parents[2] / "policies"
POLICY_FILES = ("conversation.sql", "message.sql", "task.sql", "idempotency_key.sql")

SCHEMA = """
CREATE TABLE conversation (
    id uuid NOT NULL DEFAULT gen_random_uuid(),
    user_id text NOT NULL,
    title varchar(200) NOT NULL,
    message_count integer NOT NULL DEFAULT 0,
    turn_count integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_conversation PRIMARY KEY (id),
    CONSTRAINT uq_conversation_id_user_id UNIQUE (id, user_id),
    CONSTRAINT ck_conversation_user_id_not_blank CHECK (user_id <> '')
);
CREATE INDEX ix_conversation_user_updated ON conversation (user_id, updated_at DESC, id DESC);

CREATE TABLE message (
    id bigint GENERATED ALWAYS AS IDENTITY,
    conversation_id uuid NOT NULL,
    user_id text NOT NULL,
    role text NOT NULL,
    content text NOT NULL,
    tool_calls jsonb NOT NULL DEFAULT '[]'::jsonb,
    reply_to bigint,
    turn integer,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_message PRIMARY KEY (id),
    CONSTRAINT uq_message_id_conversation_id UNIQUE (id, conversation_id),
    CONSTRAINT ck_message_role_known CHECK (role IN ('user', 'assistant')),
    CONSTRAINT ck_message_assistant_replies CHECK ((role = 'assistant') = (reply_to IS NOT NULL)),
    CONSTRAINT ck_message_user_has_turn CHECK ((role = 'user') = (turn IS NOT NULL)),
    CONSTRAINT fk_message_conversation_id_user_id_conversation
        FOREIGN KEY (conversation_id, user_id) REFERENCES conversation (id, user_id) ON DELETE CASCADE,
    CONSTRAINT fk_message_reply_to_conversation_id_message
        FOREIGN KEY (reply_to, conversation_id) REFERENCES message (id, conversation_id) ON DELETE CASCADE
);
CREATE INDEX ix_message_conversation_id ON message (conversation_id, id);
CREATE UNIQUE INDEX uq_message_reply_to ON message (reply_to) WHERE reply_to IS NOT NULL;

CREATE TABLE task (
    id bigint GENERATED ALWAYS AS IDENTITY,
    user_id text NOT NULL,
    title varchar(200) NOT NULL,
    description varchar(1000) NOT NULL DEFAULT '',
    completed boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_task PRIMARY KEY (id),
    CONSTRAINT ck_task_user_id_not_blank CHECK (user_id <> '')
);
CREATE INDEX ix_task_user_created ON task (user_id, created_at DESC, id DESC);

CREATE TABLE idempotency_key (
    user_id text NOT NULL,
    key varchar(255) NOT NULL,
    request_hash text NOT NULL,
    status text NOT NULL,
    conversation_id uuid,
    user_message_id bigint,
    response jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT pk_idempotency_key PRIMARY KEY (user_id, key),
    CONSTRAINT ck_idempotency_key_user_id_not_blank CHECK (user_id <> ''),
    CONSTRAINT ck_idempotency_key_status_known CHECK (status IN ('running', 'done', 'failed'))
);
CREATE INDEX ix_idempotency_key_created ON idempotency_key (created_at);
"""


def _cursor():
    """The raw psycopg cursor: no bind-parameter parsing of ':' or '%' in policy files."""
    return op.get_bind().connection.dbapi_connection.cursor()


def apply_policies(app_role: str) -> None:
    cursor = _cursor()
    cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (app_role,))
    if cursor.fetchone() is None:
        raise RuntimeError(f"APP_DB_ROLE {app_role!r} does not exist: create it first "
                           f"(CREATE ROLE {app_role} LOGIN PASSWORD '...' NOSUPERUSER NOBYPASSRLS)")
    cursor.execute("SELECT set_config('chat.app_role', %s, true)", (app_role,))
    for name in POLICY_FILES:
        cursor.execute((POLICIES / name).read_text())


def upgrade():
    _cursor().execute(SCHEMA)
    apply_policies(current_app.config["SETTINGS"].app_db_role)


def downgrade():
    cursor = _cursor()
    for table in ("idempotency_key", "task", "message", "conversation"):
        cursor.execute(f"DROP POLICY IF EXISTS {table}_isolation ON {table}")
    cursor.execute("DROP TABLE idempotency_key, task, message, conversation")
