"""Is user isolation in force for the connected role?

It is not when a table lacks enabled and forced row-level security, or when
the role is, or can become, a role that is a superuser, has BYPASSRLS, owns
one of the tables (an owner can `ALTER TABLE ... NO FORCE ROW LEVEL
SECURITY`, or drop the policies), or is `pg_read_all_data` /
`pg_write_all_data`. These two read or write every table whatever its grants
say; the policies still hold for them, but a role that needs no grant is not
the least-privileged role the app is meant to run as.

"Can become" follows every chain of memberships in `pg_auth_members`, whatever
INHERIT says: a role inherits no attribute (SUPERUSER, BYPASSRLS) from its
groups, but a member can `SET ROLE` to any of them, and a bug or an injection
that runs SQL as the app role can too. That is how Neon's console roles,
members of `neon_superuser` (BYPASSRLS), are caught. On PostgreSQL 16 and
later a grant says what it allows; the only one not followed is a grant with
SET, INHERIT and ADMIN all false, which allows nothing (ADMIN lets a member
grant the role to itself, so it counts). Everything else counts, even where a
chain of mixed grants could not in fact be walked: refusing a harmless role is
fixed with one REVOKE, serving a dangerous one is not. The owner of the
database is also a member of `pg_database_owner`, as PostgreSQL itself has it.
The walk starts from `session_user` too when it differs from `current_user`
(a login role that `ALTER ROLE ... SET role` switches at connect time can
`RESET ROLE`).

Serving refuses to start when isolation is not in force (see
`runtime/startup.py`), `/readyz` reports the same as a 503, and while serving
each process repeats the check at least every ISOLATION_CHECK_INTERVAL_S
seconds, answering API requests 503 while it fails: a role altered after
start-up (`ALTER ROLE chat_app BYPASSRLS`, `GRANT neon_superuser TO chat_app`)
stops being served within that interval. The check is two queries.
"""
from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.engine import Engine

from ..errors import ApiError
from .models import ISOLATED_TABLES

log = logging.getLogger(__name__)

# Roles a member of which may read or write every table, whatever its grants.
ALL_DATA_ROLES = {"pg_read_all_data": "may read every table", "pg_write_all_data": "may write every table"}

# Every role the connected role is or can become, with its shortest chain of
# memberships, when it is a superuser, has BYPASSRLS, owns one of the tables
# (and which), or is one of ALL_DATA_ROLES. `to_jsonb(m)` reads PostgreSQL 16's
# set_option and inherit_option where they exist: the same text runs on 15,
# where every grant allows SET ROLE. The name guard keeps a cycle (which
# PostgreSQL forbids anyway) from recursing forever.
ROLES_QUERY = """
with recursive grant_edge(member, granted) as (
    select m.member, m.roleid from pg_auth_members m
    where m.admin_option
       or coalesce((to_jsonb(m) ->> 'set_option')::boolean or (to_jsonb(m) ->> 'inherit_option')::boolean, true)
  union all
    select d.datdba, 'pg_database_owner'::regrole::oid from pg_database d where d.datname = current_database()
), reachable(oid, chain) as (
    select r.oid, array[r.rolname::text] from pg_roles r where r.rolname in (current_user, session_user)
  union all
    select g.oid, reachable.chain || g.rolname::text
    from reachable
    join grant_edge e on e.member = reachable.oid
    join pg_roles g on g.oid = e.granted
    where g.rolname <> all(reachable.chain)
), shortest as (
    select distinct on (oid) oid, chain from reachable order by oid, cardinality(chain), chain
)
select r.rolname, s.chain, r.rolsuper, r.rolbypassrls,
       r.rolcreaterole and current_setting('server_version_num')::int < 160000,
       array(select t.name from unnest(%(tables)s::text[]) with ordinality as t(name, position)
             join pg_class c on c.oid = to_regclass(t.name) where c.relowner = r.oid order by t.position)
from shortest s join pg_roles r on r.oid = s.oid
order by cardinality(s.chain), r.rolname
"""
TABLES_QUERY = (
    "select t.name, c.relrowsecurity, c.relforcerowsecurity"
    " from unnest(%s::text[]) with ordinality as t(name, position)"
    " left join pg_class c on c.oid = to_regclass(t.name)"
    " order by t.position"
)


def isolation_problems(cursor) -> list[str]:
    """Reasons isolation is not in force, as sentences; empty when it is.

    `cursor` is a DB-API (psycopg) cursor, so this runs from the gunicorn
    master before the app exists, and from the app on its own connection.
    """
    cursor.execute(ROLES_QUERY, {"tables": list(ISOLATED_TABLES)})
    problems = [problem for row in cursor.fetchall() for problem in role_problems(*row)]
    cursor.execute(TABLES_QUERY, (list(ISOLATED_TABLES),))
    for name, enabled, forced in cursor.fetchall():
        if enabled is None:
            problems.append(f"table {name!r} does not exist (run: flask --app wsgi db upgrade)")
        elif not (enabled and forced):
            problems.append(f"table {name!r} does not have row-level security enabled and forced")
    return problems


def role_problems(name: str, chain: list[str], is_superuser: bool, bypasses_rls: bool, grants_any_role: bool,
                  owned: list[str]) -> list[str]:
    """Why role `name`, which the connected role is (a chain of one) or can
    become (through `chain`), could turn isolation off, as sentences: one per
    reason for the role itself, one naming the chain for a role it can become."""
    reasons = []
    if is_superuser:
        reasons.append("is a superuser, which bypasses row-level security" if len(chain) == 1 else "is a superuser")
    if bypasses_rls:
        reasons.append("has BYPASSRLS")
    if grants_any_role:
        reasons.append("has CREATEROLE, which before PostgreSQL 16 lets it grant itself any role but a superuser "
                       "(the tables' owner among them)")
    if owned:
        reasons.append(f"owns table{'s' if len(owned) > 1 else ''} {', '.join(owned)}"
                       " (an owner can turn row-level security off)")
    if name in ALL_DATA_ROLES:
        reasons.append(ALL_DATA_ROLES[name])
    if len(chain) == 1 or not reasons:
        return [f"database role {name!r} {reason}" for reason in reasons]
    return [f"database role {chain[0]!r} is a member of role {name!r} ({' -> '.join(chain)}), "
            f"which {' and '.join(reasons)}"]


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

