"""Test fixtures: a real PostgreSQL, a migrated template database, one clone per test.

With ``DATABASE_URL`` set, its server is used (the tests create and drop their
own databases there and never touch the one named in the URL). Unset, an
embedded PostgreSQL is started for the session in a temporary folder.

The clones are made and dropped by two threads beside the tests (``Clones``):
a ``CREATE DATABASE ... TEMPLATE`` took 30-300 ms here, and the suite takes one
clone for each of about four hundred tests. A test that must have the server
to itself asks for ``quiet_server``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# The suite runs on the Postgres broker; the RabbitMQ tests set BROKER_URL for their own processes.
os.environ.pop("BROKER_URL", None)

import migrations
import tasks
from tasks import db
from tests import hang_guard
from tests.support import Clones, EnvironmentGuard, query

# Environment changes (monkeypatch.setenv) and connects in other threads, one at a time.
EnvironmentGuard().install()


def pytest_configure(config: pytest.Config) -> None:
    # A hung test fails after CONTROLPLANE_TEST_TIMEOUT seconds, with every thread's stack.
    hang_guard.install(config)


SUPPORT_SCHEMA = """
CREATE SCHEMA test_support;
CREATE TABLE test_support.effects (
    id bigserial PRIMARY KEY, message_id uuid, kind text NOT NULL, value text NOT NULL DEFAULT '',
    pid integer, at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE test_support.gates (name text PRIMARY KEY);
"""


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """URL of a maintenance database on the server the tests use."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        yield db.with_database(configured, "postgres")
        return
    home = Path(tempfile.mkdtemp(prefix="cp-test-pg-"))
    try:
        yield db.embedded_url(home, "postgres")
    finally:
        db.stop_embedded(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    """A database migrated once per session, cloned by every test that needs one."""
    name = f"cp_tmpl_{uuid.uuid4().hex[:10]}"
    query(server_url, f"CREATE DATABASE {name}")
    url = db.with_database(server_url, name)
    try:
        migrations.upgrade(url)
        query(url, SUPPORT_SCHEMA)
        yield name
    finally:
        query(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def clones(server_url: str, template_db: str) -> Iterator[Clones]:
    made = Clones(server_url, template_db)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def db_url(server_url: str, clones: Clones) -> Iterator[str]:
    """A fresh, migrated database for one test; the global broker points at it."""
    name = clones.take()
    url = db.with_database(server_url, name)
    tasks.broker.reconfigure(url)
    try:
        yield url
    finally:
        tasks.broker.close()
        clones.give_back(name)


@pytest.fixture
def quiet_server(clones: Clones, db_url: str) -> Iterator[None]:
    """No database is cloned or dropped beside this test (see ``Clones``); implies ``db_url``."""
    with clones.quiet():
        yield


@pytest.fixture
def empty_db(server_url: str) -> Iterator[str]:
    """A database with nothing in it (for migration tests)."""
    name = f"cp_e_{uuid.uuid4().hex[:12]}"
    query(server_url, f"CREATE DATABASE {name}")
    try:
        yield db.with_database(server_url, name)
    finally:
        query(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
