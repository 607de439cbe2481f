"""Alembic environment and versions for the control plane's schema.

``controlplane migrate`` (or :func:`upgrade`) brings a database to the newest
version. It is idempotent, and safe when two releases run it at once: the run
holds a session-level advisory lock (released when it ends), so the second waits, then finds
nothing left to do.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config

if TYPE_CHECKING:
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent

#: Key of the advisory lock every migration run holds (any fixed bigint).
MIGRATION_LOCK_KEY = 0x636F6E74726F6C  # "control"


#: Objects that exist on some servers only, so not in the SQLAlchemy models
#: (migration 0006's BRIN index: PostgreSQL 16+).
NOT_IN_MODELS = frozenset({"ix_jobs_completed_at_brin"})


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """What Alembic compares with the models: our schema, less :data:`NOT_IN_MODELS`."""
    from models import SCHEMA

    if type_ == "schema":
        return name == SCHEMA
    return name not in NOT_IN_MODELS


def alembic_config(url: str) -> Config:
    """An Alembic config for ``url`` (a libpq URL, or SQLAlchemy's spelling of one) that needs no
    alembic.ini on disk."""
    from tasks.db import sqlalchemy_url

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return config


class LockNotAvailable(Exception):
    """The migration could not get a table's lock within its timeout, on any of its tries."""


class NewerSchema(Exception):
    """A newer release migrated the database (this one is being rolled back to): it is left as
    it is, a schema this release runs on (``docs/operations.md``, "Upgrading")."""

    def __init__(self, revision: str) -> None:
        super().__init__(f"the database is at revision {revision}, newer than this release's {head()}")
        self.revision = revision


def upgrade(
    url: str,
    revision: str = "head",
    *,
    lock_timeout: float = 0.0,
    attempts: int = 1,
    on_retry: Callable[[int, BaseException], None] | None = None,
) -> None:
    """Migrate the database at ``url`` (a libpq URL) to ``revision``.

    Each revision commits on its own. ``lock_timeout`` (seconds, 0: wait as long as it
    takes) bounds each wait for a table's lock; the revision that timed out is rolled back
    (those before it stay applied) and the try made again from there, up to ``attempts``
    times, a little later each time (``on_retry(try, error)`` is told of each), then
    :class:`LockNotAvailable`. A database at a revision this release does not know, read
    under the migration lock, is left as it is: :class:`NewerSchema`.
    """
    import time

    import psycopg2.errors
    from sqlalchemy.exc import DBAPIError

    config = alembic_config(url)
    config.attributes["leave_newer"] = True  # see migrations/env.py
    config.attributes["lock_timeout_ms"] = min(int(lock_timeout * 1000), 2_147_483_647)  # PostgreSQL's most
    for attempt in range(1, attempts + 1):
        try:
            command.upgrade(config, revision)
        except DBAPIError as exc:
            if not isinstance(exc.orig, psycopg2.errors.LockNotAvailable):
                raise
            if attempt == attempts:
                raise LockNotAvailable(str(exc.orig).strip()) from exc
            if on_retry is not None:
                on_retry(attempt, exc.orig or exc)
            time.sleep(min(0.5 * 2**attempt, 5.0))
            continue
        newer = config.attributes.get("newer_revision")
        if newer is not None:
            raise NewerSchema(newer)
        return


def _scripts() -> ScriptDirectory:
    """This release's migration scripts (Alembic's ``ScriptDirectory``)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("postgresql://"))


def known(revision: str) -> bool:
    """Whether this release knows ``revision`` (a database a newer release migrated does not)."""
    from alembic.util.exc import CommandError

    try:
        return _scripts().get_revision(revision) is not None
    except CommandError:
        return False


def head() -> str:
    """The newest revision this release knows."""
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


def engine(url: str) -> Engine:
    """A SQLAlchemy engine on ``url`` (a libpq URL, or SQLAlchemy's spelling of one), one connection
    per use, connecting as every connection of this project does (``tasks.db.connect_options``:
    a connect timeout, keepalives, ``tcp_user_timeout``; docs/operations.md, "A server gone from
    the network")."""
    import psycopg2
    from sqlalchemy import create_engine
    from sqlalchemy.pool import NullPool

    from tasks.db import connect_options, libpq_url

    # libpq reads the URL, not SQLAlchemy: one naming several hosts for a failover
    # (postgresql://h1:5432,h2:5432/db?target_session_attrs=read-write) is libpq's only
    dsn, options = libpq_url(url), connect_options(url)
    return create_engine("postgresql+psycopg2://", poolclass=NullPool,
                         creator=lambda: psycopg2.connect(dsn, **options))  # fmt: skip


def current(url: str) -> str | None:
    """The database's current revision, or None when it was never migrated."""
    from alembic.runtime.migration import MigrationContext

    on = engine(url)
    try:
        with on.connect() as conn:
            return MigrationContext.configure(
                conn, opts={"version_table_schema": "control_plane"}
            ).get_current_revision()
    finally:
        on.dispose()


def replace_in_function(signature: str, old: str, new: str) -> None:
    """In a migration: redefine ``control_plane.<signature>`` (e.g. ``retry_job(uuid)``) with its one
    occurrence of ``old`` replaced by ``new``; refuse when the text is not there exactly once (the
    function is not what this migration was written against)."""
    from alembic import op

    definition = (
        op.get_bind()
        .exec_driver_sql(f"SELECT pg_get_functiondef('control_plane.{signature}'::regprocedure)")
        .scalar()
    )
    if not isinstance(definition, str) or definition.count(old) != 1:
        raise RuntimeError(f"control_plane.{signature} does not read as expected: no single {old!r}")
    op.execute(definition.replace(old, new))


#: The roles other than the migrating one (superusers and PostgreSQL's own left out) that hold
#: privileges on control_plane.messages, and which (`%%`: the driver formats it). SELECT held
#: on some columns only counts (a dashboard's role may read every column but the bodies, the
#: jobs' arguments, and reads the new tables all the same); writes count table-wide only (an
#: UPDATE of one column must not grant a table's rows to change).
ROLES_ON_MESSAGES = r"""
SELECT r.rolname,
       array_remove(ARRAY[
           CASE WHEN has_any_column_privilege(r.oid, 'control_plane.messages', 'SELECT') THEN 'SELECT' END,
           CASE WHEN has_table_privilege(r.oid, 'control_plane.messages', 'INSERT') THEN 'INSERT' END,
           CASE WHEN has_table_privilege(r.oid, 'control_plane.messages', 'UPDATE') THEN 'UPDATE' END,
           CASE WHEN has_table_privilege(r.oid, 'control_plane.messages', 'DELETE') THEN 'DELETE' END
       ], NULL)
FROM pg_roles AS r
WHERE (has_any_column_privilege(r.oid, 'control_plane.messages', 'SELECT')
       OR has_table_privilege(r.oid, 'control_plane.messages', 'INSERT, UPDATE, DELETE'))
  AND NOT r.rolsuper AND r.rolname NOT LIKE 'pg\_%%' AND r.rolname <> current_user
ORDER BY r.rolname
"""


def grant_by_privileges_on_messages(table: str, grants: list[tuple[str, str]]) -> None:
    """In a migration: grant a new ``table`` to the roles an operator granted the messages, as
    they will use it. ``grants`` pairs the privileges on the messages a role must all hold
    (``"INSERT UPDATE"``) with what it then gets on ``table``; a role gets each that applies."""
    from alembic import op

    bind = op.get_bind()
    for role, held in bind.exec_driver_sql(ROLES_ON_MESSAGES).fetchall():
        for needed, privileges in grants:
            if set(needed.split()) <= set(held):
                statement = bind.exec_driver_sql(
                    f"SELECT format('GRANT {privileges} ON {table} TO %%I', %s)", (role,)
                ).scalar()
                bind.exec_driver_sql(str(statement))


def create_functions(ddls: list[str], comments: dict[str, str]) -> None:
    """In a migration: run each function's ``CREATE``, then comment each ``control_plane.<signature>``."""
    from alembic import op

    for ddl in ddls:
        op.execute(ddl)
    for signature, comment in comments.items():
        op.execute(f"COMMENT ON FUNCTION control_plane.{signature} IS $comment${comment}$comment$")


def drop_functions(signatures: list[str]) -> None:
    """In a migration's downgrade: drop each ``control_plane.<signature>``, if there."""
    from alembic import op

    for signature in signatures:
        op.execute(f"DROP FUNCTION IF EXISTS control_plane.{signature}")
