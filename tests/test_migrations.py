"""Migrations: create everything, are idempotent, serialise concurrent runs, match the models."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.util.exc import CommandError
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

import migrations
from models import SCHEMA, metadata, queries
from tasks.db import sqlalchemy_url
from tests.support import ROOT, query, wait_for


def _drop_roles(url: str, *roles: str) -> None:
    """Drop roles a test made, with what they were granted on ``url``'s database and own there."""
    db = psycopg2.extensions.parse_dsn(url)["dbname"]
    for role in roles:
        query(url, f'REVOKE ALL ON DATABASE "{db}" FROM {role}; DROP OWNED BY {role}; DROP ROLE {role}')


@contextmanager
def _login_roles(url: str, *kinds: str) -> Iterator[list[str]]:
    """Login roles named ``cp_<kind>_<suffix>`` for a test, dropped after it (``_drop_roles``)."""
    suffix = uuid.uuid4().hex[:12]
    roles = [f"cp_{kind}_{suffix}" for kind in kinds]
    query(url, "; ".join(f"CREATE ROLE {role} LOGIN" for role in roles))
    try:
        yield roles
    finally:
        _drop_roles(url, *roles)


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
    migrations.upgrade(empty_db, "0008")
    with _login_roles(empty_db, "reader", "stranger") as (reader, stranger):
        query(empty_db, f"GRANT USAGE ON SCHEMA control_plane TO {reader}")
        # When it is migrated to head
        migrations.upgrade(empty_db)

        # Then the stranger may no longer connect or make temporary tables there, and the reader still may
        def may(role: str, privilege: str) -> bool:
            sql = "SELECT has_database_privilege(%s, current_database(), %s) AS ok"
            return bool(query(empty_db, sql, (role, privilege))[0]["ok"])

        assert not may(stranger, "CONNECT") and not may(stranger, "TEMPORARY")
        assert may(reader, "CONNECT") and may(reader, "TEMPORARY")
        # And downgrading gives PUBLIC its default back
        command.downgrade(migrations.alembic_config(empty_db), "0008")
        assert may(stranger, "CONNECT")


def test_roles_that_send_or_consume_get_the_actor_defaults_table_0015_adds(empty_db: str) -> None:
    # Given a database at the revision before, a web app's role that sends (INSERT on the messages)
    # and a worker's role that consumes (UPDATE too), granted the tables by an operator
    # (and a sender's role that may also update one column of the messages: that is no worker)
    migrations.upgrade(empty_db, "0014")
    with _login_roles(empty_db, "sender", "worker", "narrow") as (sender, worker, narrow):
        query(empty_db, f"GRANT USAGE ON SCHEMA control_plane TO {sender}, {worker}, {narrow}; "
                        f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA control_plane TO {sender}, {narrow}; "
                        f"GRANT UPDATE (cancel_requested_at) ON control_plane.messages TO {narrow}; "
                        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA control_plane "
                        f"TO {worker}")  # fmt: skip
        # When it is migrated to head
        migrations.upgrade(empty_db)

        # Then the sender may read the new table (every send does) and the worker also write it
        def may(role: str, privilege: str) -> bool:
            sql = "SELECT has_table_privilege(%s, 'control_plane.actor_defaults', %s) AS ok"
            return bool(query(empty_db, sql, (role, privilege))[0]["ok"])

        assert [may(sender, p) for p in ("SELECT", "INSERT", "UPDATE")] == [True, False, False]
        assert [may(worker, p) for p in ("SELECT", "INSERT", "UPDATE")] == [True, True, True]
        assert [may(narrow, p) for p in ("SELECT", "INSERT", "UPDATE")] == [True, False, False]


def test_roles_using_the_messages_get_the_queue_pauses_0017_adds(empty_db: str) -> None:
    # Given a database at the revision before, and a sender's, a worker's and a reader's roles
    # granted the tables
    # (and a dashboard's role granted every column of the messages but their bodies, the jobs' arguments)
    migrations.upgrade(empty_db, "0016")
    with _login_roles(empty_db, "sender", "worker", "reader", "dashboard") as (sender, worker, reader, dashboard):
        query(empty_db, f"GRANT USAGE ON SCHEMA control_plane TO {sender}, {worker}; "
                        f"GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA control_plane TO {sender}; "
                        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA control_plane "
                        f"TO {worker}")  # fmt: skip
        query(empty_db, f"GRANT SELECT ON ALL TABLES IN SCHEMA control_plane TO {reader}, {dashboard}; "
                        f"GRANT USAGE ON SCHEMA control_plane TO {reader}, {dashboard}")  # fmt: skip
        query(empty_db, f"REVOKE SELECT ON control_plane.messages FROM {dashboard}")  # noqa: S608 (a test's role)
        columns = [r["attname"] for r in query(empty_db, "SELECT attname FROM pg_attribute WHERE attrelid = "
                   "'control_plane.messages'::regclass AND attnum > 0 AND NOT attisdropped AND attname <> 'body'")]
        query(empty_db, f"GRANT SELECT ({', '.join(columns)}) ON control_plane.messages TO {dashboard}")
        # When it is migrated to head
        migrations.upgrade(empty_db)

        # Then each may read the pauses (claims, `controlplane stats` and the metrics do), and
        # the worker, which may delete messages, may pause and resume
        def may(role: str, privilege: str) -> bool:
            sql = "SELECT has_table_privilege(%s, 'control_plane.queue_pauses', %s) AS ok"
            return bool(query(empty_db, sql, (role, privilege))[0]["ok"])

        assert [may(r, "SELECT") for r in (sender, worker, reader, dashboard)] == [True, True, True, True]
        assert [may(r, "INSERT") and may(r, "DELETE") for r in (sender, worker, reader, dashboard)] == [
            False, True, False, False
        ]  # fmt: skip

        # And, logged in as them, the readers read the stats and the worker pauses and resumes
        db = psycopg2.extensions.parse_dsn(empty_db)["dbname"]
        query(empty_db, f'GRANT CONNECT ON DATABASE "{db}" TO {reader}, {worker}, {dashboard}')

        def as_role(role: str, sql: str) -> list[dict[str, Any]]:
            return query(psycopg2.extensions.make_dsn(empty_db, user=role), sql)

        assert as_role(reader, queries.QUEUE_STATS_VIA_MESSAGES) == []
        assert as_role(dashboard, queries.QUEUE_STATS_VIA_MESSAGES) == []
        assert as_role(worker, "SELECT control_plane.pause_queue('q') AND control_plane.resume_queue('q') AS ok")[0][
            "ok"
        ]


def test_0019s_failed_at_column_keeps_the_views_grants_and_its_downgrade_gives_them_back(empty_db: str) -> None:
    tag = uuid.uuid4().hex[:8]
    role, odd, owner = f"failed_reader_{tag}", f'"Odd ""{tag}"" reader"', f"failed_owner_{tag}"
    # Given a database at the revision before, its failed_jobs view owned by a role of its own,
    # granted to a role (with grant option), to one of an odd name on two columns only, and to
    # PUBLIC, commented, and made a security barrier
    migrations.upgrade(empty_db, "0018")
    query(empty_db, f"CREATE ROLE {role}; CREATE ROLE {odd}; CREATE ROLE {owner}; "
                    f"GRANT USAGE ON SCHEMA control_plane TO {owner}; GRANT SELECT ON control_plane.jobs TO {owner}; "
                    f"ALTER VIEW control_plane.failed_jobs OWNER TO {owner}; "
                    f"GRANT SELECT ON control_plane.failed_jobs TO {role} WITH GRANT OPTION; "
                    f"GRANT SELECT (id, last_error) ON control_plane.failed_jobs TO {odd}; "
                    "GRANT SELECT ON control_plane.failed_jobs TO PUBLIC; "
                    "ALTER VIEW control_plane.failed_jobs SET (security_barrier = true); "
                    "COMMENT ON VIEW control_plane.failed_jobs IS 'what gave up: 100%'")  # fmt: skip
    query(empty_db, "INSERT INTO control_plane.jobs (id, type, queue, status, completed_at) "
                    "VALUES (gen_random_uuid(), 't', 'q', 'failed', timestamptz '2026-12-01')")  # fmt: skip

    def view() -> dict[str, Any]:
        return query(empty_db, """
            SELECT c.relowner::regrole::text AS owner, c.relacl::text[] AS acl, c.reloptions,
                   obj_description(c.oid, 'pg_class') AS comment,
                   (SELECT array_agg(a.attname || ' ' || a.attacl::text ORDER BY a.attnum) FROM pg_attribute AS a
                    WHERE a.attrelid = c.oid AND a.attacl IS NOT NULL) AS column_acls
            FROM pg_class AS c WHERE c.oid = 'control_plane.failed_jobs'::regclass""")[0]

    before = view()
    try:
        # When it is migrated
        migrations.upgrade(empty_db)
        # Then the view says when each job failed, and keeps its grants and comment
        rows = query(empty_db, "SELECT failed_at FROM control_plane.failed_jobs")
        assert [r["failed_at"].isoformat() for r in rows] == ["2026-12-01T00:00:00+00:00"]
        assert view() == before
        # And its downgrade drops the column, and gives back the grants and comment the view had
        command.downgrade(migrations.alembic_config(empty_db), "0018")
        columns = query(empty_db, "SELECT attname FROM pg_attribute WHERE attnum > 0 "
                                  "AND attrelid = 'control_plane.failed_jobs'::regclass")  # fmt: skip
        assert "failed_at" not in {c["attname"] for c in columns}
        assert view() == before
    finally:
        query(empty_db, f"DROP OWNED BY {role}, {odd}, {owner}; DROP ROLE {role}, {odd}, {owner}")


def test_0018_keeps_an_index_built_beforehand_and_builds_again_one_a_failed_build_left_invalid(empty_db: str) -> None:
    def index() -> list[dict[str, Any]]:
        return query(empty_db, "SELECT i.indisvalid AS valid, i.indisunique AS is_unique FROM pg_index AS i "
                               "WHERE i.indexrelid = to_regclass('control_plane.ix_jobs_queue_failed_at')")  # fmt: skip

    # Given a database at the revision before, with two jobs failed at the same moment in one queue
    migrations.upgrade(empty_db, "0017")
    query(empty_db, "INSERT INTO control_plane.jobs (id, type, queue, status, completed_at) "
                    "SELECT gen_random_uuid(), 't', 'q', 'failed', timestamptz '2026-12-01' FROM generate_series(1, 2)")
    # and a build of the index beforehand, as the upgrade notes suggest, that failed (here: asked
    # UNIQUE over those two) and left an invalid index of that name
    conn = psycopg2.connect(empty_db)
    conn.autocommit = True
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.errors.UniqueViolation):
            cur.execute("CREATE UNIQUE INDEX CONCURRENTLY ix_jobs_queue_failed_at ON control_plane.jobs "
                        "(queue, failed_at) WHERE failed_at IS NOT NULL")  # fmt: skip
    finally:
        conn.close()
    assert index() == [{"valid": False, "is_unique": True}]
    # When it is migrated
    migrations.upgrade(empty_db)
    # Then the index is built again, valid (and the one a planner uses)
    assert index() == [{"valid": True, "is_unique": False}]
    # And a valid index found there is kept as it is
    command.downgrade(migrations.alembic_config(empty_db), "0017")
    assert index() == []
    query(empty_db, "CREATE INDEX ix_jobs_queue_failed_at ON control_plane.jobs (queue, failed_at) "
                    "WHERE failed_at IS NOT NULL; COMMENT ON INDEX control_plane.ix_jobs_queue_failed_at IS 'mine'")
    # without waiting for the table's lock behind a writer that holds it (a send's open transaction)
    writer = psycopg2.connect(empty_db)
    try:
        with writer.cursor() as cur:
            cur.execute("UPDATE control_plane.jobs SET type = type WHERE false")
        migrations.upgrade(empty_db, lock_timeout=1.0)
    finally:
        writer.close()
    comment = query(empty_db, "SELECT obj_description('control_plane.ix_jobs_queue_failed_at'::regclass) AS c")
    assert comment[0]["c"] == "mine"


def test_migrated_by_a_role_that_does_not_own_the_database_it_says_the_database_stays_open(empty_db: str) -> None:
    # Given a role that may create schemas in the database but does not own it
    db = psycopg2.extensions.parse_dsn(empty_db)["dbname"]
    with _login_roles(empty_db, "migrator") as (role,):
        query(empty_db, f'GRANT CREATE ON DATABASE "{db}" TO {role}')
        try:
            from sqlalchemy.engine import make_url

            as_role = make_url(empty_db).set(username=role, password=None).render_as_string(hide_password=False)
            # When it migrates
            done = _migrate(as_role)
            # Then the migration succeeds, and says on stderr that the database is still open to every role
            assert done.returncode == 0, done.stderr
            assert "stays open to every role" in done.stderr and "REVOKE CONNECT" in done.stderr
            assert query(empty_db, "SELECT has_database_privilege('public', current_database(), 'CONNECT') AS open")[
                0
            ]["open"]
        finally:
            query(empty_db, "DROP SCHEMA IF EXISTS control_plane CASCADE")


def _migrate(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    command_line = [sys.executable, "-m", "tasks.cli", "migrate", *args]
    return subprocess.run(command_line, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_migration_behind_a_long_transaction_gives_up_instead_of_holding_up_every_send(empty_db: str) -> None:
    # Given a database one migration behind, and a session whose open transaction read the
    # view that migration replaces (a report, a pg_dump)
    migrations.upgrade(empty_db, "0010")
    holder = psycopg2.connect(empty_db)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), count(*) FROM control_plane.workers")
            (holder_pid, _) = cur.fetchone()
        # When the release migrates, waiting a tenth of a second for each lock, twice
        blocked = _migrate(empty_db, "--lock-timeout", "0.1", "--lock-attempts", "2")
        # Then it gives up (instead of queueing every other session behind its wait), saying so at
        # each try, changes nothing, and names the session in the way
        assert blocked.returncode == 1, blocked.stderr
        assert "try 1 of 2 gave up on a lock (canceling statement due to lock timeout)" in blocked.stderr
        assert "a table stayed locked for 0.1 s on each of 2 tries; the database is at revision 0010" in blocked.stderr
        assert f"pid {holder_pid} " in blocked.stderr and "Traceback" not in blocked.stderr
        assert migrations.current(empty_db) == "0010"
    finally:
        holder.close()
    # And once that transaction ended, the same command migrates
    done = _migrate(empty_db, "--lock-timeout", "0.1", "--lock-attempts", "2")
    assert done.returncode == 0, done.stderr
    assert migrations.current(empty_db) == migrations.head()


def test_a_revision_waiting_for_a_lock_holds_none_an_earlier_revision_of_the_same_run_took(empty_db: str) -> None:
    # Given a database at 0017, and a report whose open transaction read failed_jobs, the view
    # 0019 replaces (0018 before it builds an index on jobs: a lock that stops every send)
    migrations.upgrade(empty_db, "0017")
    holder = psycopg2.connect(empty_db)
    migrate: subprocess.Popen[str] | None = None
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT count(*) FROM control_plane.failed_jobs")
        # When the release migrates, waiting for that view
        env = {**os.environ, "DATABASE_URL": empty_db}
        migrate = subprocess.Popen([sys.executable, "-m", "tasks.cli", "migrate", "--lock-timeout", "60"], env=env,
                                   cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip

        def waiting_for_the_view() -> list[dict[str, Any]]:
            return query(empty_db, "SELECT pid FROM pg_locks "
                         "WHERE NOT granted AND relation = 'control_plane.failed_jobs'::regclass")  # fmt: skip

        wait_for(lambda: waiting_for_the_view() or migrate.poll() is not None, what="the migration's wait")
        assert migrate.poll() is None, migrate.communicate()
        (waiter,) = waiting_for_the_view()
        # Then it waits with 0018 committed, holding no lock on jobs: sends and outcomes go on
        # (in one transaction for the whole run, its index build's lock stopped them all)
        assert migrations.current(empty_db) == "0018"
        held = query(empty_db, "SELECT mode FROM pg_locks WHERE pid = %s AND relation = 'control_plane.jobs'::regclass",
                     (waiter["pid"],))  # fmt: skip
        blocking_writes = {"ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"}
        assert not {h["mode"] for h in held} & blocking_writes, held
    finally:
        holder.close()
    # And once the report's transaction ends, it finishes
    assert migrate is not None
    _, err = migrate.communicate(timeout=120)
    assert migrate.returncode == 0, err
    assert migrations.current(empty_db) == migrations.head()


def test_the_read_only_role_operations_md_gives_reads_the_queues_and_jobs_and_not_the_arguments(empty_db: str) -> None:
    # Given the grants docs/operations.md ("A read-only role") gives a dashboard, on a migrated
    # database with a job in it
    migrations.upgrade(empty_db)
    doc = (ROOT / "docs" / "operations.md").read_text()
    recipe = doc.split("### A read-only role", 1)[1].split("```sql", 1)[1].split("```", 1)[0]
    db = psycopg2.extensions.parse_dsn(empty_db)["dbname"]
    with _login_roles(empty_db, "dashboard") as (role,):
        statements = recipe.replace("CREATE ROLE dashboard LOGIN PASSWORD '...';", "")
        query(empty_db, statements.replace("DATABASE controlplane", f'DATABASE "{db}"').replace("dashboard", role))
        query(empty_db, "INSERT INTO control_plane.messages (id, queue, actor, priority, eta, body) "
                        "VALUES (gen_random_uuid(), 'default', 'tests.noop', 0, now(), '{}')")  # fmt: skip
        parts = urlsplit(empty_db)
        as_role = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))
        env = {**os.environ, "DATABASE_URL": as_role}
        # When it runs the commands the doc names
        for command in (["stats"], ["workers"], ["queues", "list"], ["jobs", "list"], ["jobs", "list", "--status",
                                                                                        "failed"]):
            done = subprocess.run([sys.executable, "-m", "tasks.cli", *command], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
            # Then each works
            assert done.returncode == 0, (command, done.stderr)
        # And the messages' bodies, the jobs' arguments, are not its to read
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            query(as_role, "SELECT body FROM control_plane.messages")


def test_a_database_a_newer_release_migrated_is_left_as_it_is(empty_db: str) -> None:
    # Given a database at a revision a newer release made (this one is being rolled back to)
    migrations.upgrade(empty_db)
    query(empty_db, "UPDATE control_plane.alembic_version SET version_num = '9999'")
    # When this release's `controlplane migrate` runs (its release step)
    result = _migrate(empty_db)
    # Then it succeeds, saying so, and leaves the revision alone
    assert result.returncode == 0, result.stderr
    assert "is at revision 9999, newer than this release's" in result.stderr
    assert query(empty_db, "SELECT version_num FROM control_plane.alembic_version")[0]["version_num"] == "9999"
    # And Alembic's other commands, given the libpq URL as docs/operations.md's downgrade recipe
    # gives it, refuse the revision they do not know instead of doing nothing
    config = migrations.alembic_config(empty_db)
    for run in (lambda: command.downgrade(config, "-1"), lambda: command.stamp(config, "head")):
        with pytest.raises(CommandError, match="Can't locate revision identified by '9999'"):
            run()
    assert query(empty_db, "SELECT version_num FROM control_plane.alembic_version")[0]["version_num"] == "9999"


MIGRATION_LOCK_WAITERS = """
SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND NOT granted AND classid = %s AND objid = %s AND objsubid = 1
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"""


def test_a_rollback_migrating_while_a_newer_release_migrates_waits_then_leaves_it_as_it_is(empty_db: str) -> None:
    # Given a newer release's migration run holding the migration lock (its revision not yet committed)
    key = migrations.MIGRATION_LOCK_KEY
    migrations.upgrade(empty_db)
    newer = psycopg2.connect(empty_db)
    try:
        with newer.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (migrations.MIGRATION_LOCK_KEY,))
            # When this release's `controlplane migrate` starts meanwhile (a rollback racing a deploy)
            env = {**os.environ, "DATABASE_URL": empty_db}
            older = subprocess.Popen([sys.executable, "-m", "tasks.cli", "migrate"], env=env, cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            try:
                # (this database's migration lock only: pg_locks lists the whole server's locks)
                wait_for(lambda: query(empty_db, MIGRATION_LOCK_WAITERS, (key >> 32, key & 0xFFFFFFFF)),
                         what="the release's run waiting for the migration lock")  # fmt: skip
                # and the newer run commits a revision this release does not know
                cur.execute("UPDATE control_plane.alembic_version SET version_num = '9999'")
                newer.commit()
                _, stderr = older.communicate(timeout=120)
            finally:
                older.kill()
                older.wait()
    finally:
        newer.close()
    # Then it read the revision after its wait: it succeeds, saying so, and changes nothing
    # (it read 0016 before the wait, and Alembic failed on the revision it did not know)
    assert older.returncode == 0, stderr
    assert "is at revision 9999, newer than this release's" in stderr and "Traceback" not in stderr
    assert query(empty_db, "SELECT version_num FROM control_plane.alembic_version")[0]["version_num"] == "9999"


def test_a_role_owning_the_schema_its_dba_made_migrates_without_the_right_to_create_schemas(
    empty_db: str, server_url: str
) -> None:
    from sqlalchemy.engine import make_url

    # Given a deploy role that may not create schemas in the database, owning the one its DBA made
    role = f"cp_deploy_{uuid.uuid4().hex[:8]}"
    query(server_url, f"CREATE ROLE {role} LOGIN")
    try:
        query(empty_db, f"REVOKE CREATE ON DATABASE {make_url(empty_db).database} FROM PUBLIC")
        query(empty_db, f"CREATE SCHEMA {SCHEMA} AUTHORIZATION {role}")
        as_role = make_url(empty_db).set(username=role, password=None).render_as_string(hide_password=False)
        # When it migrates
        result = _migrate(as_role)
        # Then it works (CREATE SCHEMA IF NOT EXISTS would be refused: the database's CREATE is checked first)
        assert result.returncode == 0, result.stderr
        assert migrations.current(empty_db) == migrations.head()
    finally:
        query(empty_db, f"DROP SCHEMA {SCHEMA} CASCADE")
        query(server_url, f"DROP ROLE {role}")


def test_commands_on_a_database_an_older_release_migrated_say_to_migrate(empty_db: str) -> None:
    # Given a database an older release migrated (before failed_at and live_key existed)
    migrations.upgrade(empty_db, "0004")
    env = {**os.environ, "DATABASE_URL": empty_db}
    # When this release's commands read it
    stats = subprocess.run([sys.executable, "-m", "tasks.cli", "stats"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    # Then they say what is wrong and what to do, in one line
    assert stats.returncode == 1
    assert stats.stderr.strip().splitlines() == [stats.stderr.strip()]
    assert f"the database's schema is at revision 0004, this release needs {migrations.head()}" in stats.stderr
    assert "run `controlplane migrate`" in stats.stderr


def test_roles_using_the_databases_other_tables_keep_connecting_once_it_is_closed_to_public(
    empty_db: str, server_url: str
) -> None:
    # Given the control plane sharing its database with an application: a reporting role
    # reading the application's table, and a role that only exists (a tenant's, say)
    reporter, stranger = (f"cp_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("report", "tenant"))
    for role in (reporter, stranger):
        query(server_url, f"CREATE ROLE {role} LOGIN")
    try:
        migrations.upgrade(empty_db, "0008")
        query(empty_db, f"CREATE TABLE public.invoices (id int); GRANT SELECT ON public.invoices TO {reporter}")
        # When the control plane's migrations run to the end
        result = _migrate(empty_db)
        assert result.returncode == 0, result.stderr
        # Then the reporting role still connects (and is named), and the other role does not
        can = "SELECT has_database_privilege(%s, current_database(), 'CONNECT') AS ok"
        assert query(empty_db, can, (reporter,))[0]["ok"] is True
        assert query(empty_db, can, (stranger,))[0]["ok"] is False
        assert f"may connect again: {reporter}" in result.stderr
    finally:
        query(empty_db, "DROP TABLE IF EXISTS public.invoices")
        for role in (reporter, stranger):
            query(empty_db, f"REVOKE ALL ON DATABASE {empty_db.rsplit('/', 1)[-1].split('?')[0]} FROM {role}")
            query(server_url, f"DROP ROLE {role}")


#: Sessions holding the migration lock (``migrations.MIGRATION_LOCK_KEY``, as pg_locks splits it).
_MIGRATION_LOCK_HOLDERS = """
SELECT l.pid FROM pg_locks AS l
WHERE l.locktype = 'advisory' AND l.granted
  AND l.classid::bigint = (%(k)s::bigint >> 32) AND l.objid::bigint = (%(k)s::bigint & 4294967295)
"""


@pytest.fixture
def transaction_pooling(db_url: str) -> Iterator[str]:
    """A PgBouncer in transaction pooling mode before ``db_url``'s server; its URL of that database."""
    import pwd
    import shutil
    import signal
    import socket
    import tempfile

    if shutil.which("pgbouncer") is None:
        pytest.skip("pgbouncer is not installed")
    runner: list[str] = []
    if os.geteuid() == 0:  # (PgBouncer refuses to run as root)
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("pgbouncer refuses root, and there is no postgres user to run it as")
        runner = ["su", "postgres", "-c"]
    dsn = psycopg2.extensions.parse_dsn(db_url)
    if dsn.get("host", "").startswith("/") or not dsn.get("host"):
        # (the embedded server listens on a socket in a directory of the user's, which PgBouncer,
        # run as another user, cannot reach)
        pytest.skip("the server is reached through a Unix socket (the embedded one)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run = tempfile.mkdtemp(prefix="pgbouncer-")  # (not under tmp_path: PgBouncer's user must read it)
    os.chmod(run, 0o755)
    with open(f"{run}/users.txt", "w") as users:
        users.write(f'"{dsn.get("user", "root")}" ""\n')
    with open(f"{run}/pgbouncer.ini", "w") as ini:
        ini.write(
            f"[databases]\n* = host={dsn.get('host', '127.0.0.1')} port={dsn.get('port', 5432)}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = trust\n"
            f"auth_file = {run}/users.txt\npool_mode = transaction\ndefault_pool_size = 4\n"
            f"unix_socket_dir =\npidfile = {run}/pgbouncer.pid\nlogfile = {run}/pgbouncer.log\n"
            "ignore_startup_parameters = extra_float_digits,application_name\n"
        )
    if runner:
        for name in ("", "/users.txt", "/pgbouncer.ini"):
            shutil.chown(run + name, "postgres")
    command = ["pgbouncer", "-d", f"{run}/pgbouncer.ini"]
    subprocess.run([*runner, " ".join(command)] if runner else command, check=True)
    pid = int(wait_for(lambda: os.path.exists(f"{run}/pgbouncer.pid") and open(f"{run}/pgbouncer.pid").read().strip(),
                       what="PgBouncer to start"))  # fmt: skip
    try:
        yield f"postgresql://{dsn.get('user', 'root')}@127.0.0.1:{port}/{dsn['dbname']}"
    finally:
        os.kill(pid, signal.SIGTERM)

        def gone() -> bool:  # (or a zombie: a daemon's parent is init, which may not reap it here)
            try:
                return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
            except FileNotFoundError:
                return True

        wait_for(gone, what="PgBouncer to stop")
        shutil.rmtree(run, ignore_errors=True)


def test_a_migration_run_through_transaction_pooling_leaves_the_migration_lock_to_no_session(
    db_url: str, transaction_pooling: str
) -> None:
    # Given the control plane's database behind a PgBouncer in transaction pooling mode
    # When `controlplane migrate` runs through it (the release step of a deploy)
    migrations.upgrade(transaction_pooling, lock_timeout=2.0, attempts=10)
    # Then no server session is left holding the migration lock: one left holding it (an idle
    # server session of the pooler, kept for its server_lifetime, an hour by default) made the
    # next run that reached another server session wait for it, without a timeout
    assert query(db_url, _MIGRATION_LOCK_HOLDERS, {"k": migrations.MIGRATION_LOCK_KEY}) == []


def test_controlplane_migrate_connects_with_the_options_every_other_connection_has(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # docs/operations.md, "A server gone from the network": every connection the workers, the
    # clock and the controlplane commands open gives up a connect after 10 s, and one cut with a
    # statement in flight within 30 s (tcp_user_timeout)
    made: list[dict[str, str]] = []
    connect = psycopg2.connect
    this_thread = threading.get_ident()  # (not the test databases' maker and dropper threads)

    def recording(*args: object, **kwargs: object) -> object:
        conn = connect(*args, **kwargs)
        if threading.get_ident() == this_thread:
            made.append(conn.get_dsn_parameters())
        return conn

    monkeypatch.setattr(psycopg2, "connect", recording)
    # When `controlplane migrate` runs (a database at head: it connects, finds nothing to do)
    migrations.upgrade(db_url)
    # Then its connections have them too
    assert made
    for dsn in made:
        options = (dsn.get("connect_timeout"), dsn.get("tcp_user_timeout"), dsn.get("keepalives"))
        assert options == ("10", "30000", "1"), dsn


def test_controlplane_migrate_and_db_start_take_a_url_naming_several_hosts(empty_db: str) -> None:
    # Given a DATABASE_URL naming two hosts, as for a failover (libpq's form, which SQLAlchemy's
    # URL parser cannot read: the port "5432,127.0.0.1:5432" was no number, and a traceback)
    with psycopg2.connect(empty_db) as conn:
        host, port = conn.info.host, conn.info.port
    conn.close()
    if host.startswith("/"):
        pytest.skip("the server answers on a Unix socket here: no host:port list to write")
    given = psycopg2.extensions.parse_dsn(empty_db)
    user = f"{given['user']}@" if given.get("user") else ""
    url = f"postgresql://{user}{host}:{port},{host}:{port}/{given['dbname']}"
    # When it is migrated, and `db start` asked whether it runs
    migrated = _migrate(url)
    started = subprocess.run([sys.executable, "-m", "tasks.cli", "db", "start"], cwd=ROOT, capture_output=True,
                             env={**os.environ, "DATABASE_URL": url}, text=True, timeout=120)  # fmt: skip
    # Then both work, naming the hosts
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith(f"migrated DATABASE_URL host={host},{host} port={port},{port}"), migrated.stdout
    assert migrations.current(url) == migrations.head()
    assert started.returncode == 0 and started.stdout.startswith("running: DATABASE_URL host="), started
