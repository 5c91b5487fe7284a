"""The app's commands: `flask --app wsgi mint-token USER_ID [--ttl SECONDS]`
and `flask --app wsgi prune [--batch-size N]`, beside Flask-Migrate's `db`.

Under the `flask` command the app is built even without a DATABASE_URL
(see `create_app`), so `mint-token` needs `BETTER_AUTH_SECRET` and nothing
else; the commands that need the database say in one line that it is missing.
"""
from __future__ import annotations

import warnings

import click
import psycopg
from flask import current_app
from sqlalchemy import exc as sa_exc

from .auth import mint_token
from .config import ConfigError, required_auth_secret
from .db.extensions import db, migrate

NO_DATABASE = "DATABASE_URL is not set (a postgresql:// URL is required)"


def _require_database() -> None:
    if current_app.config["SETTINGS"].database_url is None:
        raise click.ClickException(NO_DATABASE)


@migrate.configure
def _migrations_need_a_database(config):
    """Every `flask db ...` command builds its configuration here first."""
    _require_database()
    return config


@click.command("mint-token")
@click.argument("user_id")
@click.option("--ttl", default=3600, show_default=True, type=click.IntRange(1, 10 * 365 * 86400),
              help="lifetime of the token in seconds")
def mint_token_command(user_id: str, ttl: int) -> None:
    """Print an HS256 token for USER_ID signed with BETTER_AUTH_SECRET."""
    try:
        secret = required_auth_secret()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if not user_id.strip():
        raise click.BadParameter("must not be blank", param_hint="USER_ID")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        token = mint_token(secret, user_id, ttl)
    if caught:
        click.echo("warning: BETTER_AUTH_SECRET is shorter than 32 bytes; use a long random secret", err=True)
    click.echo(token)


def register_commands(app) -> None:
    """The app's own commands: they appear under `flask --app wsgi` only."""
    app.cli.add_command(mint_token_command)

    @app.cli.command("prune")
    @click.option("--batch-size", default=1000, show_default=True, type=click.IntRange(1, 100_000),
                  help="rows deleted per transaction")
    def prune_command(batch_size: int) -> None:
        """Delete idempotency keys older than IDEMPOTENCY_TTL_S, idle rate-limit rows and old stops.

        Run it with the owner's DATABASE_URL (the one `db upgrade` uses), or a
        role the owner granted EXECUTE on the prune functions, and the app's
        IDEMPOTENCY_TTL_S and ASSISTANT_TIMEOUT_S: a TTL shorter than
        ASSISTANT_TIMEOUT_S + 30 s is refused, and a key still running is kept.
        """
        from .services import retention

        _require_database()
        settings = current_app.config["SETTINGS"]
        try:
            pruned = retention.prune(db.engine, settings.idempotency_ttl_s, batch_size, settings.assistant_timeout_s)
        except retention.TtlTooShort as exc:
            raise click.ClickException(str(exc)) from None
        except sa_exc.DBAPIError as exc:
            raise click.ClickException(_prune_failure(exc.orig)) from None
        finally:
            db.engine.dispose()
        click.echo(f"deleted {pruned.idempotency_keys} expired idempotency keys "
                   f"(older than IDEMPOTENCY_TTL_S={settings.idempotency_ttl_s} s)")
        click.echo(f"deleted {pruned.rate_limits} idle rate-limit rows")
        click.echo(f"deleted {pruned.reply_stops} stops of replies no longer produced")


def _prune_failure(error) -> str:
    if isinstance(error, psycopg.errors.InsufficientPrivilege):
        return ("this database role may not prune: run prune with the owner's DATABASE_URL (the one "
                "`flask --app wsgi db upgrade` uses), or have the owner GRANT EXECUTE on the prune functions")
    if isinstance(error, psycopg.errors.UndefinedFunction):
        return "the prune functions are missing: run `flask --app wsgi db upgrade` first"
    if isinstance(error, psycopg.OperationalError):
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return f"the database is unreachable: {first_line}"
    return f"prune failed: {type(error).__name__}"

