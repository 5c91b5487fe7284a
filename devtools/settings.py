"""The settings `make run`, `make test` and `make bench` hand to the app and
to gunicorn, checked before anything starts.

The app checks its own settings when it starts, in one line naming the
variable, but by then `make run` has started a cluster and run `flask db
upgrade`, whose failure pointed at PostgreSQL's log; and gunicorn.conf.py
reads a few settings of gunicorn's own with no check at all (a traceback).
Checked here first, with the app's own rules, a bad setting stops them in
one line naming the variable, before a cluster starts.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

from gunicorn.workers import SUPPORTED_WORKERS

from chat_blueprint.config import ConfigError, load_settings

# What gunicorn.conf.py reads with int(), and the least each may be (0: no timeout).
GUNICORN_INTEGERS = {"WEB_CONCURRENCY": 1, "GUNICORN_WORKER_CONNECTIONS": 1, "GUNICORN_THREADS": 1,
                     "GUNICORN_TIMEOUT": 0, "GUNICORN_GRACEFUL_TIMEOUT": 0}


class SettingError(SystemExit):
    """A setting the app or gunicorn would refuse; the message is one line naming the variable.

    A SystemExit, so that a caller that does not catch it (the benchmarks)
    ends with that line and status 1 rather than a traceback."""


def check_app_settings(env: Mapping[str, str]) -> None:
    """What the app, and `flask db upgrade` with it, would refuse in `env`."""
    try:
        load_settings(env)
    except ConfigError as exc:
        raise SettingError(str(exc)) from None


def check_serving_settings(env: Mapping[str, str]) -> None:
    """What the app or gunicorn.conf.py would refuse when serving with `env`."""
    check_app_settings(env)
    for name, least in GUNICORN_INTEGERS.items():
        raw = env.get(name)
        if raw is not None and not (raw.strip().isdecimal() and int(raw) >= least):
            raise SettingError(f"{name} must be a whole number, at least {least}, got {raw!r}")
    worker_class = env.get("GUNICORN_WORKER_CLASS")
    if worker_class is not None and worker_class not in SUPPORTED_WORKERS:
        raise SettingError(f"GUNICORN_WORKER_CLASS must be gevent or gthread (or another worker class gunicorn "
                           f"names), got {worker_class!r}")
    level = env.get("LOG_LEVEL")
    if level is not None and level.upper() not in logging.getLevelNamesMapping():
        raise SettingError(f"LOG_LEVEL must be debug, info, warning, error or critical, got {level!r}")
