"""Checks the gunicorn master runs before it serves (see gunicorn.conf.py).

A bad setting, or a database role that would bypass row-level security, stops
the server with one line saying why. A database that is down is not a refusal:
the workers start, answer 503 until it is back, and check isolation then.
"""
from __future__ import annotations

import logging

import psycopg

from ..config import ConfigError, load_settings
from ..db.isolation import isolation_problems

log = logging.getLogger("chat_blueprint.startup")


class RefuseToServe(SystemExit):
    """Raised from the gunicorn master hook to stop before any worker starts."""


def check_before_serving() -> None:
    try:
        settings = load_settings()
        settings.require_auth()
    except ConfigError as exc:
        raise RefuseToServe(f"configuration error: {exc}") from None
    url = settings.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        with psycopg.connect(url, connect_timeout=5, application_name="chat_blueprint-startup") as conn:
            with conn.cursor() as cursor:
                problems = isolation_problems(cursor)
    except psycopg.OperationalError as exc:
        log.warning("database not reachable at start-up (%s); serving 503 until it answers",
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return
    if problems:
        raise RefuseToServe("refusing to serve: " + "; ".join(problems))


def main() -> int:
    """`python -m chat_blueprint.runtime.startup`: the check as its own process, so that
    gunicorn's master never imports Flask (see gunicorn.conf.py). Exit 1 on a
    refusal, with the reason on stderr."""
    import sys

    from .logs import JsonFormatter

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    log.addHandler(handler)
    log.propagate = False
    try:
        check_before_serving()
    except RefuseToServe as refusal:
        print(str(refusal), file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
