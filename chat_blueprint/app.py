"""The app factory: `create_app()` builds the Flask app from the environment."""
from __future__ import annotations

from flask import Flask

from . import pool, tenancy
from .assistants import build_assistant
from .auth import TokenVerifier
from .config import load_settings
from .errors import register_error_handlers
from .extensions import db, migrate
from .isolation import IsolationWatch

MAX_BODY_BYTES = 1024 * 1024


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app from the environment (or `test_config`'s `ENV` mapping).

    Configuration is validated here, once; a bad setting raises ConfigError
    naming the variable. Nothing here touches the database, so `flask db
    upgrade` can import the app before any table exists.
    """
    test_config = dict(test_config or {})
    settings = load_settings(test_config.pop("ENV", None))
    app = Flask(__name__)
    app.config.update(
        SETTINGS=settings,
        SQLALCHEMY_DATABASE_URI=settings.database_url,
        SQLALCHEMY_ENGINE_OPTIONS=_engine_options(settings),
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        JSON_SORT_KEYS=False,
    )
    app.config.update(test_config)
    app.json.sort_keys = False

    db.init_app(app)
    migrate.init_app(app, db, directory=_migrations_directory())
    tenancy.install()
    app.extensions["token_verifier"] = TokenVerifier.from_settings(settings)
    app.extensions["isolation_watch"] = IsolationWatch(settings.isolation_check_interval_s)
    app.extensions["assistant"] = build_assistant(settings)

    from .http import BigIntConverter, guard_bodies

    app.url_map.converters["bigint"] = BigIntConverter
    register_error_handlers(app)

    from . import chat, cors, docs, observability, service, tasks, user_data

    observability.install(app)
    guard_bodies(app, MAX_BODY_BYTES)
    with app.app_context():
        observability.watch_pool(db.engine)
        tenancy.set_timeouts(db.engine, settings.statement_timeout_s, settings.lock_timeout_s)
        pool.watch(db.engine)

    app.register_blueprint(service.bp)
    app.register_blueprint(tasks.bp)
    app.register_blueprint(chat.bp)
    app.register_blueprint(user_data.bp)
    app.register_blueprint(docs.bp)
    cors.install(app, settings.cors_origins)

    from .cli import register_commands

    register_commands(app)
    return app


def _engine_options(settings) -> dict:
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


def _migrations_directory() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parent.parent / "migrations")
