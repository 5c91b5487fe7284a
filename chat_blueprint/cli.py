"""Flask CLI commands: `flask --app wsgi mint-token USER_ID [--ttl SECONDS]`.

`mint-token` is a plugin command (the `flask.commands` entry point in
setup.cfg), so Flask runs it without loading the app: it needs
`BETTER_AUTH_SECRET` and nothing else, no `DATABASE_URL`.
"""
from __future__ import annotations

import warnings

import click

from .auth import mint_token
from .config import ConfigError, required_auth_secret


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
    """Commands that need the app (and its settings) go here."""
