"""Fixtures: a throwaway real PostgreSQL cluster, migrated as the owner, and
the app connected as the app role with row-level security in force; the
helpers they use live in support.py.

No test here runs without PostgreSQL: if the cluster cannot start, every test
that needs it errors loudly.
"""
from __future__ import annotations

import time

import pytest
import requests
from fake_llm import FakeChatCompletions
from support import User, built_app, gunicorn, make_user, throwaway_cluster

from devtools.cluster import APP_ROLE, OWNER_ROLE, SUPERUSER


@pytest.fixture(scope="session")
def cluster():
    with throwaway_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def app_url(cluster):
    return cluster.url(APP_ROLE)


@pytest.fixture(scope="module")
def llm():
    """The tests' own Chat Completions server on loopback, one per test module."""
    with FakeChatCompletions() as server:
        yield server


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
def _shared_gunicorn(app_url):
    with gunicorn(app_url, threads=8) as server:
        yield server


@pytest.fixture
def shared_server(_shared_gunicorn):
    """One gunicorn with the default settings, for the modules that need
    nothing else (each test uses users of its own): one start-up for all.

    A module in between may have restarted the database (test_faults): the
    first request after that finds a dead pooled connection and answers 503,
    as it should, so each test starts once /readyz answers 200 again."""
    deadline = time.monotonic() + 30
    while requests.get(f"{_shared_gunicorn.url}/readyz", timeout=10).status_code != 200:
        if time.monotonic() > deadline:
            raise AssertionError("the shared gunicorn is not ready:\n" + _shared_gunicorn.output()[-3000:])
        time.sleep(0.2)
    return _shared_gunicorn
