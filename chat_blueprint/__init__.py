"""A todo app's AI chat assistant: the persistence and API layer.

`create_app` lives in `app.py` and is imported on first use, so that
importing a light module of the package (the log formatter gunicorn's master
configures) does not import Flask: under gevent workers, the worker must
monkey-patch the standard library before Flask, Werkzeug and the ssl module
they pull in are imported.
"""


def __getattr__(name):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["create_app"]
