"""Flask CLI commands: `flask --app wsgi mint-token USER_ID [--ttl SECONDS]`."""
from __future__ import annotations

import click
from flask import current_app

from .auth import mint_token
from .config import ConfigError


def register_commands(app) -> None:
    @app.cli.command("mint-token")
    @click.argument("user_id")
    @click.option("--ttl", default=3600, show_default=True, type=click.IntRange(1, 10 * 365 * 86400),
                  help="lifetime of the token in seconds")
    def mint_token_command(user_id: str, ttl: int) -> None:
        """Print an HS256 token for USER_ID signed with BETTER_AUTH_SECRET."""
        settings = current_app.config["SETTINGS"]
        try:
            settings.require_secret()
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        if not user_id.strip():
            raise click.BadParameter("must not be blank", param_hint="USER_ID")
        click.echo(mint_token(settings.auth_secret, user_id, ttl))
