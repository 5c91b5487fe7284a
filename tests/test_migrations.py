"""Migrations run as the owner with `flask db upgrade`, and undo cleanly."""
from __future__ import annotations

import os
import subprocess
import sys

import psycopg
from support import ROOT, SECRET, throwaway_cluster

from chat_blueprint.db.models import ISOLATED_TABLES
from devtools.cluster import APP_ROLE, OWNER_ROLE


def flask_db(cluster, *args) -> None:
    env = {**os.environ, "DATABASE_URL": cluster.url(OWNER_ROLE), "APP_DB_ROLE": APP_ROLE,
           "BETTER_AUTH_SECRET": SECRET}
    subprocess.run([sys.executable, "-m", "flask", "--app", "wsgi", "db", *args], cwd=ROOT, env=env, check=True,
                   capture_output=True)


def isolation_state(cluster) -> list:
    with psycopg.connect(cluster.url(OWNER_ROLE)) as conn:
        tables = conn.execute(
            "select relname, relrowsecurity, relforcerowsecurity from pg_class"
            " where relname = any(%s) and relkind = 'r' order by relname", (list(ISOLATED_TABLES),)).fetchall()
        policies = conn.execute(
            "select tablename, policyname from pg_policies order by tablename, policyname").fetchall()
        grants = conn.execute(
            "select table_name, string_agg(privilege_type, ',' order by privilege_type)"
            " from information_schema.role_table_grants where grantee = %s group by table_name order by table_name",
            (APP_ROLE,)).fetchall()
        column_grants = conn.execute(
            "select table_name, column_name, privilege_type from information_schema.role_column_grants"
            " where grantee = %s and privilege_type <> 'SELECT' and privilege_type <> 'INSERT'"
            " and privilege_type <> 'REFERENCES' order by 1, 2, 3", (APP_ROLE,)).fetchall()
        # Our functions, not those of extensions (btree_gin's stay after a downgrade).
        functions = conn.execute(
            "select proname, prosecdef, proacl::text from pg_proc"
            " where pronamespace = 'public'::regnamespace and not exists (select from pg_depend"
            " where objid = pg_proc.oid and classid = 'pg_proc'::regclass and deptype = 'e') order by proname"
        ).fetchall()
    return [tables, policies, grants, functions, column_grants]


def test_upgrade_downgrade_upgrade_round_trip():
    with throwaway_cluster("chat-test-pg-migrations-") as cluster:
        upgraded = isolation_state(cluster)
        assert [row[1:] for row in upgraded[0]] == [(True, True)] * len(ISOLATED_TABLES)
        assert {table for table, _ in upgraded[1]} == set(ISOLATED_TABLES)
        assert dict(upgraded[2])["message"] == "DELETE,INSERT,SELECT"
        assert dict(upgraded[2])["chat_rate_limit"] == "DELETE,INSERT,SELECT,UPDATE"
        assert dict(upgraded[2])["write_rate_limit"] == "DELETE,INSERT,SELECT,UPDATE"
        assert dict(upgraded[2])["export_rate_limit"] == "DELETE,INSERT,SELECT,UPDATE"
        owner_only = f"{{{OWNER_ROLE}=X/{OWNER_ROLE}}}"  # EXECUTE for the owner, none for PUBLIC
        owner_and_app = f"{{{OWNER_ROLE}=X/{OWNER_ROLE},{APP_ROLE}=X/{OWNER_ROLE}}}"
        assert upgraded[3] == [("prune_chat_rate_limits", True, owner_only),
                               ("prune_export_rate_limits", True, owner_only),
                               ("prune_idempotency_keys", True, owner_only),
                               ("prune_reply_stops", True, owner_only),
                               ("prune_write_rate_limits", True, owner_only),
                               ("search_hits", True, owner_and_app),
                               ("search_text", False, None),
                               ("stopped_replies", True, owner_and_app)]
        # Table-wide UPDATE on message is never granted: only the feedback columns, and those a reply's
        # progress, end and supersession change.
        assert [row for row in upgraded[4] if row[0] == "message"] == [
            ("message", column, "UPDATE") for column in (
                "content", "feedback_comment", "feedback_rating", "feedback_updated_at", "finish_reason", "model",
                "stale_at", "status", "superseded_at", "tool_calls", "usage")]
        flask_db(cluster, "downgrade", "base")
        assert isolation_state(cluster) == [[], [], [], [], []]
        flask_db(cluster, "upgrade")
        assert isolation_state(cluster) == upgraded
        flask_db(cluster, "upgrade")  # nothing left to do: a second run changes nothing
        assert isolation_state(cluster) == upgraded


def test_policy_files_can_be_applied_again():
    with throwaway_cluster("chat-test-pg-policies-") as cluster:
        before = isolation_state(cluster)
        with psycopg.connect(cluster.url(OWNER_ROLE)) as conn:
            conn.execute("select set_config('chat.app_role', %s, true)", (APP_ROLE,))
            for policy in sorted((ROOT / "chat_blueprint" / "policies").glob("*.sql")):
                conn.execute(policy.read_text())
        assert isolation_state(cluster) == before


def test_models_and_migrations_agree(owner_url):
    """Alembic's autogenerate finds nothing to do on a migrated database, so
    `flask db migrate` proposes only what a change to models.py asks for."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from chat_blueprint.db.extensions import db

    engine = create_engine(owner_url.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, db.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_a_database_with_conversations_upgrades_in_place():
    """The lifecycle revision (0009) fills the new columns of existing rows under
    forced row-level security (the owner sees no row unless it lifts FORCE for the
    backfill), the per-user keys (0010) take the rows as they are, and every message
    stays readable to its user, `complete`."""
    with throwaway_cluster("chat-test-pg-upgrade-") as cluster:
        flask_db(cluster, "downgrade", "0008_search_and_feedback")
        with psycopg.connect(cluster.url(APP_ROLE)) as conn:
            conn.execute("select set_config('app.user_id', 'old-user', false)")
            conversation_id = conn.execute("insert into conversation (user_id, title, message_count, turn_count)"
                                           " values ('old-user', 'before', 2, 1) returning id").fetchone()[0]
            asked = conn.execute("insert into message (conversation_id, user_id, role, content, turn)"
                                 " values (%s, 'old-user', 'user', 'question', 1) returning id",
                                 (conversation_id,)).fetchone()[0]
            conn.execute("insert into message (conversation_id, user_id, role, content, reply_to)"
                         " values (%s, 'old-user', 'assistant', 'answer', %s)", (conversation_id, asked))
            conn.commit()
        flask_db(cluster, "upgrade")
        with psycopg.connect(cluster.url(APP_ROLE)) as conn:
            conn.execute("select set_config('app.user_id', 'old-user', false)")
            rows = conn.execute("select content, ui_id, status, superseded_at from message order by id").fetchall()
        assert [row[0] for row in rows] == ["question", "answer"]
        assert all(row[1].startswith("msg-") and row[2] == "complete" and row[3] is None for row in rows)
        assert rows[0][1] != rows[1][1]
        with psycopg.connect(cluster.url(OWNER_ROLE)) as conn:
            forced = conn.execute("select relforcerowsecurity from pg_class where relname = 'message'").fetchone()
        assert forced == (True,)
