"""The app factory: `create_app()` builds the Flask app from the environment."""
from __future__ import annotations

import os
from pathlib import Path

import click
from flask import Flask

from . import api
from .assistants import build_assistant
from .auth import TokenVerifier
from .cli import register_commands
from .config import MAX_BODY_BYTES, ConfigError, Settings, load_settings
from .db import pool, tenancy
from .db.extensions import db, migrate
from .db.isolation import IsolationWatch
from .errors import register_error_handlers
from .runtime import body_guard, cooperative, cors, metrics, request_log

# Package data (setup.cfg), so an installed wheel migrates as a checkout does;
# the revisions read their policies from the package's policies/.
MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app from the environment (or `test_config`'s `ENV` mapping).

    Configuration is validated here, once; a bad setting raises ConfigError
    naming the variable (under the `flask` command, its one-line error).
    Nothing here touches the database, so `flask db upgrade` can import the
    app before any table exists, and the `flask` command builds it without a
    DATABASE_URL for `mint-token`, which needs none.
    """
    test_config = dict(test_config or {})
    from_cli = os.environ.get("FLASK_RUN_FROM_CLI") == "true"
    try:
        settings = load_settings(test_config.pop("ENV", None), require_database=not from_cli)
    except ConfigError as exc:
        if from_cli:
            raise click.ClickException(str(exc)) from None
        raise
    app = Flask(__name__)
    app.config.update(SETTINGS=settings, MAX_CONTENT_LENGTH=MAX_BODY_BYTES)
    app.config.update(test_config)
    app.json.sort_keys = False
    register_error_handlers(app)
    register_commands(app)
    migrate.init_app(app, db, directory=str(MIGRATIONS))
    if settings.database_url is None:
        return app  # the flask command without a database: mint-token only
    _bind_database(app, settings)
    app.extensions["token_verifier"] = TokenVerifier.from_settings(settings)
    app.extensions["isolation_watch"] = IsolationWatch(settings.isolation_check_interval_s)
    app.extensions["assistant"] = build_assistant(settings)
    request_log.install(app)
    body_guard.install(app, MAX_BODY_BYTES)
    api.register(app)
    cors.install(app, settings.cors_origins)
    return app


def _bind_database(app: Flask, settings: Settings) -> None:
    cooperative.install()  # psycopg's waits under a gevent worker
    app.config.update(SQLALCHEMY_DATABASE_URI=settings.database_url, SQLALCHEMY_ENGINE_OPTIONS=_engine_options(settings))
    db.init_app(app)
    tenancy.install()
    with app.app_context():
        metrics.watch_pool(db.engine)
        tenancy.set_timeouts(db.engine, settings.statement_timeout_s, settings.lock_timeout_s)
        pool.watch(db.engine)


def _engine_options(settings: Settings) -> dict:
    connect_args = {"connect_timeout": 5, "application_name": "chat_blueprint"}
    if not settings.prepared_statements:
        connect_args["prepare_threshold"] = None
    return {
        "pool_size": settings.pool_size,
        "max_overflow": 0,
        "pool_timeout": settings.pool_timeout_s,
        "pool_pre_ping": False,
        "hide_parameters": True,
        "connect_args": connect_args,
    }
