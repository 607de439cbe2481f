"""Migrations: create everything, are idempotent, serialise concurrent runs, match the models."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import psycopg2
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

import migrations
from models import SCHEMA, metadata
from tasks.db import sqlalchemy_url
from tests.support import ROOT, query


def test_migrate_creates_tables_and_views_and_is_idempotent(empty_db: str) -> None:
    # Given an empty database
    # When it is migrated twice
    migrations.upgrade(empty_db)
    migrations.upgrade(empty_db)
    # Then the broker's tables, the mirror and the operator views exist, at head
    names = {
        r["name"]
        for r in query(
            empty_db,
            "SELECT table_name AS name FROM information_schema.tables WHERE table_schema = 'control_plane'",
        )
    }
    assert {
        "messages",
        "jobs",
        "results",
        "worker_heartbeats",
        "failed_jobs",
        "retrying_jobs",
        "queue_stats",
        "workers",
    } <= names
    assert migrations.current(empty_db) == migrations.head()


def test_two_releases_migrating_at_once_both_succeed(empty_db: str) -> None:
    # Given two release processes started together on an empty database
    env = {**os.environ, "DATABASE_URL": empty_db}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "migrate"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    # When both finish
    outputs = [p.communicate(timeout=120) for p in procs]
    # Then both succeeded (the advisory lock made the second wait) and the schema is at head once
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert query(empty_db, "SELECT count(*) AS n FROM control_plane.alembic_version")[0]["n"] == 1
    assert migrations.current(empty_db) == migrations.head()


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    # Given a migrated database
    engine = create_engine(sqlalchemy_url(db_url), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={
                    "include_schemas": True,
                    "include_name": migrations.include_name,  # as migrations/env.py compares
                    "version_table_schema": SCHEMA,
                },
            )
            # When Alembic compares it with the SQLAlchemy models
            diff = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    # Then there is no difference at all
    assert diff == []


def test_the_control_plane_database_is_closed_to_roles_that_cannot_use_the_control_plane(empty_db: str) -> None:
    # Given a database at the revision before, a role an operator granted the control plane to,
    # and a role with no business there (as a tenant's app role is)
    suffix = uuid.uuid4().hex[:12]
    reader, stranger = f"cp_reader_{suffix}", f"cp_stranger_{suffix}"
    migrations.upgrade(empty_db, "0008")
    try:
        query(empty_db, f"CREATE ROLE {reader} LOGIN; CREATE ROLE {stranger} LOGIN; "
                        f"GRANT USAGE ON SCHEMA control_plane TO {reader}")  # fmt: skip
        # When it is migrated to head
        migrations.upgrade(empty_db)

        # Then the stranger may no longer connect or make temporary tables there, and the reader still may
        def may(role: str, privilege: str) -> bool:
            sql = "SELECT has_database_privilege(%s, current_database(), %s) AS ok"
            return bool(query(empty_db, sql, (role, privilege))[0]["ok"])

        assert not may(stranger, "CONNECT") and not may(stranger, "TEMPORARY")
        assert may(reader, "CONNECT") and may(reader, "TEMPORARY")
        # And downgrading gives PUBLIC its default back
        command.downgrade(migrations.alembic_config(sqlalchemy_url(empty_db)), "0008")
        assert may(stranger, "CONNECT")
    finally:
        db = psycopg2.extensions.parse_dsn(empty_db)["dbname"]
        query(empty_db, f'REVOKE ALL ON DATABASE "{db}" FROM {reader}; DROP OWNED BY {reader}; '
                        f"DROP ROLE {reader}; DROP ROLE {stranger}")  # fmt: skip


def test_migrated_by_a_role_that_does_not_own_the_database_it_says_the_database_stays_open(empty_db: str) -> None:
    # Given a role that may create schemas in the database but does not own it
    role = f"cp_migrator_{uuid.uuid4().hex[:12]}"
    db = psycopg2.extensions.parse_dsn(empty_db)["dbname"]
    query(empty_db, f'CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE "{db}" TO {role}')
    try:
        from sqlalchemy.engine import make_url

        as_role = make_url(empty_db).set(username=role, password=None).render_as_string(hide_password=False)
        # When it migrates
        env = {**os.environ, "DATABASE_URL": as_role}
        done = subprocess.run([sys.executable, "-m", "tasks.cli", "migrate"], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        # Then the migration succeeds, and says on stderr that the database is still open to every role
        assert done.returncode == 0, done.stderr
        assert "stays open to every role" in done.stderr and "REVOKE CONNECT" in done.stderr
        assert query(empty_db, "SELECT has_database_privilege('public', current_database(), 'CONNECT') AS open")[0][
            "open"
        ]
    finally:
        query(empty_db, f'DROP SCHEMA IF EXISTS control_plane CASCADE; REVOKE ALL ON DATABASE "{db}" FROM {role}; '
                        f"DROP OWNED BY {role}; DROP ROLE {role}")  # fmt: skip
