"""Is user isolation in force for the connected role?

Serving refuses to start when it is not (see `startup.py`), `/readyz` reports
the same as a 503, and each process re-checks on its first API request after a
start with the database down.
"""
from __future__ import annotations

import logging

from flask import current_app

from .errors import ApiError
from .models import ISOLATED_TABLES

log = logging.getLogger(__name__)

ROLE_QUERY = "select rolname, rolsuper, rolbypassrls from pg_roles where rolname = current_user"
TABLES_QUERY = (
    "select t.name, c.relrowsecurity, c.relforcerowsecurity"
    " from unnest(%s::text[]) as t(name)"
    " left join pg_class c on c.oid = to_regclass(t.name)"
)


def isolation_problems(cursor) -> list[str]:
    """Reasons isolation is not in force, as sentences; empty when it is.

    `cursor` is a DB-API (psycopg) cursor, so this runs from the gunicorn
    master before the app exists, and from the app on its own connection.
    """
    problems = []
    cursor.execute(ROLE_QUERY)
    role, is_superuser, bypasses_rls = cursor.fetchone()
    if is_superuser:
        problems.append(f"database role {role!r} is a superuser, which bypasses row-level security")
    if bypasses_rls:
        problems.append(f"database role {role!r} has BYPASSRLS")
    cursor.execute(TABLES_QUERY, (list(ISOLATED_TABLES),))
    for name, enabled, forced in cursor.fetchall():
        if enabled is None:
            problems.append(f"table {name!r} does not exist (run: flask --app wsgi db upgrade)")
        elif not (enabled and forced):
            problems.append(f"table {name!r} does not have row-level security enabled and forced")
    return problems


class IsolationNotInForce(ApiError):
    def __init__(self, problems: list[str]):
        super().__init__(503, "isolation_not_in_force", "refusing to serve: " + "; ".join(problems),
                         headers={"Retry-After": "30"})


def check_now() -> list[str]:
    """Run the check on a fresh pooled connection (raises if the database is down)."""
    with current_app.extensions["sqlalchemy"].engine.connect() as connection:
        cursor = connection.connection.cursor()
        try:
            return isolation_problems(cursor)
        finally:
            cursor.close()
            connection.rollback()


def ensure_isolation() -> None:
    """Once per process, before the first API request is served: refuse (503)
    while isolation is not in force."""
    verified = current_app.extensions["isolation_verified"]
    if verified.is_set():
        return
    problems = check_now()
    if problems:
        log.error("refusing to serve: %s", "; ".join(problems))
        raise IsolationNotInForce(problems)
    verified.set()
