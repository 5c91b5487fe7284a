"""Is user isolation in force for the connected role?

It is not when the role is a superuser, has BYPASSRLS, owns one of the tables
or is a member of a role that does (an owner can `ALTER TABLE ... NO FORCE
ROW LEVEL SECURITY`, or drop the policies), or when a table lacks enabled and
forced row-level security.

Serving refuses to start when it is not (see `runtime/startup.py`), `/readyz` reports
the same as a 503, and while serving each process repeats the check at least
every ISOLATION_CHECK_INTERVAL_S seconds, answering API requests 503 while it
fails: a role altered after start-up (`ALTER ROLE chat_app BYPASSRLS`, `GRANT
chat_owner TO chat_app`) stops being served within that interval.
"""
from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.engine import Engine

from ..errors import ApiError
from .models import ISOLATED_TABLES

log = logging.getLogger(__name__)

ROLE_QUERY = "select rolname, rolsuper, rolbypassrls from pg_roles where rolname = current_user"
# Per table: RLS enabled and forced, its owner, and whether the current role
# is that owner or a member of it, directly or through other roles, with or
# without INHERIT (a member without INHERIT can still SET ROLE to the owner).
TABLES_QUERY = (
    "select t.name, c.relrowsecurity, c.relforcerowsecurity, owner.rolname,"
    " coalesce(pg_has_role(current_user, c.relowner, 'MEMBER'), false)"
    " from unnest(%s::text[]) with ordinality as t(name, position)"
    " left join pg_class c on c.oid = to_regclass(t.name)"
    " left join pg_roles owner on owner.oid = c.relowner"
    " order by t.position"
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
    owned: dict[str, list[str]] = {}
    for name, enabled, forced, owner, may_act_as_owner in cursor.fetchall():
        if enabled is None:
            problems.append(f"table {name!r} does not exist (run: flask --app wsgi db upgrade)")
            continue
        if not (enabled and forced):
            problems.append(f"table {name!r} does not have row-level security enabled and forced")
        if may_act_as_owner and not is_superuser:
            owned.setdefault(owner, []).append(name)
    for owner, tables in owned.items():
        whose = "owns" if owner == role else f"is a member of role {owner!r}, which owns"
        problems.append(f"database role {role!r} {whose} table{'s' if len(tables) > 1 else ''} "
                        f"{', '.join(tables)} (an owner can turn row-level security off)")
    return problems


class IsolationNotInForce(ApiError):
    def __init__(self, problems: list[str]):
        super().__init__(503, "isolation_not_in_force", "refusing to serve: " + "; ".join(problems),
                         headers={"Retry-After": "30"})


def check_now(engine: Engine) -> list[str]:
    """Run the check on a pooled connection of `engine` (raises if the database is down)."""
    with engine.connect() as connection:
        cursor = connection.connection.cursor()
        try:
            return isolation_problems(cursor)
        finally:
            cursor.close()
            connection.rollback()


class IsolationWatch:
    """The verdict of this process's last isolation check, and when it was made.

    A request reads the verdict (no query) while it is younger than
    `interval_s`; the first request after that runs the check again while the
    others go on with the previous verdict, so the check costs one query per
    interval per process, never one per request. Until a first check has
    succeeded (a database down at start-up), every request waits for one.
    Only a lock is shared, which gevent's monkey-patching makes cooperative.
    """

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._problems: list[str] = []

    def _due(self) -> bool:
        return self._checked_at is None or time.monotonic() - self._checked_at >= self.interval_s

    def record(self, problems: list[str]) -> None:
        if problems and (self._checked_at is None or problems != self._problems):
            log.error("refusing to serve: %s", "; ".join(problems))
        elif self._problems and not problems:
            log.warning("isolation is in force again; serving")
        self._problems, self._checked_at = problems, time.monotonic()

    def ensure(self, check) -> None:
        """Raise IsolationNotInForce (503) while the latest verdict is a failure;
        `check()` runs the check when one is due (`check_now` on the app's engine)."""
        if self._due() and self._lock.acquire(blocking=self._checked_at is None):
            try:
                if self._due():
                    self.record(check())
            finally:
                self._lock.release()
        if self._problems:
            raise IsolationNotInForce(self._problems)

