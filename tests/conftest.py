"""Fixtures: a throwaway real PostgreSQL cluster, migrated as the owner, and
the app connected as the app role with row-level security in force; the
helpers they use live in support.py.

No test here runs without PostgreSQL: if the cluster cannot start, every test
that needs it errors loudly.
"""
from __future__ import annotations

import pytest
from support import User, built_app, gunicorn, make_user, throwaway_cluster

from chat_blueprint.devcluster import APP_ROLE, OWNER_ROLE, SUPERUSER


@pytest.fixture(scope="session")
def cluster():
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def app_url(cluster):
    return cluster.url(APP_ROLE)


@pytest.fixture(scope="session")
def owner_url(cluster):
    return cluster.url(OWNER_ROLE)


@pytest.fixture(scope="session")
def superuser_url(cluster):
    return cluster.url(SUPERUSER)


@pytest.fixture(scope="session")
def app(app_url):
    with built_app(app_url) as app:
        yield app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def alice() -> User:
    return make_user("alice")


@pytest.fixture
def bob() -> User:
    return make_user("bob")


@pytest.fixture(scope="session")
def shared_server(app_url):
    """One gunicorn with the default settings, for the modules that need
    nothing else (each test uses users of its own): one start-up for all."""
    with gunicorn(app_url, threads=8) as server:
        yield server
