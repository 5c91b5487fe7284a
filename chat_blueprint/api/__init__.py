"""The HTTP API: the only code that touches `request`. Blueprints, the guards
every user request passes, body parsing, the stream format, the documents."""
from __future__ import annotations

from flask import Flask

from .guards import BigIntConverter


def register(app: Flask) -> None:
    """Every route of the API, and the `bigint` converter their paths use."""
    from ..db import tenancy
    from ..services import rate_limit
    from . import chat, conversations, docs, ops, tasks, user_data

    tenancy.queue_with_binding(rate_limit.queue_due_write)
    app.url_map.converters["bigint"] = BigIntConverter
    for module in (ops, tasks, chat, conversations, user_data, docs):
        app.register_blueprint(module.bp)
