"""Alembic's environment: online migrations only, under an advisory lock."""

from __future__ import annotations

import contextlib
from typing import Any

from alembic import context
from sqlalchemy import text

from migrations import MIGRATION_LOCK_KEY, engine, include_name, known
from models import SCHEMA, metadata

config = context.config


#: Whether this transaction's server session holds the migration lock.
_HOLDS_LOCK = text(
    "SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid() "
    "AND classid::bigint = (CAST(:k AS bigint) >> 32) AND objid::bigint = (CAST(:k AS bigint) & 4294967295))"
)

#: Said when a run's transactions reach another server session than the one holding its lock.
_POOLED = (
    "this run's transactions reached another server session than the one that holds the migration lock "
    "(a pooler in transaction mode, PgBouncer's pool_mode = transaction?): run it against PostgreSQL "
    "directly or through session pooling (the pooler's server session may still hold the lock: "
    "docs/operations.md, \"Upgrading\", says how to end it)"
)


def _check_lock(connection: Any) -> None:
    if not connection.execute(_HOLDS_LOCK, {"k": MIGRATION_LOCK_KEY}).scalar():
        raise RuntimeError(_POOLED)


def run_migrations_online() -> None:
    on = engine(config.get_main_option("sqlalchemy.url") or "")
    with on.connect() as connection:
        # Serialise concurrent runs, for the session: each revision commits on its own. In one
        # transaction for all, a later revision waiting for a lock (0019 for a view a report had
        # open) kept every lock an earlier one took (0018's on jobs), and every send and outcome
        # waited behind it, try after try. Released at the end of the run, not left to the
        # session's end: a pooler keeps its server sessions (docs/operations.md, "PgBouncer").
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        try:
            _run_locked(connection)
        except BaseException:
            with contextlib.suppress(Exception):  # (a connection lost: the error to tell is the first)
                _unlock(connection)
            raise
        _unlock(connection)
    on.dispose()


def _unlock(connection: Any) -> None:
    if connection.in_transaction():
        connection.rollback()
    connection.execute(text("RESET lock_timeout; SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK_KEY})
    connection.commit()


def _run_locked(connection: Any) -> None:
    # Waiting for a table's lock behind a long transaction, a migration's ALTER would
    # queue every send and read of that table behind it: give up soon instead
    # (migrations.upgrade tries again, then names the sessions in the way).
    lock_timeout_ms = int(config.attributes.get("lock_timeout_ms", 0))
    connection.execute(text(f"SET lock_timeout = {lock_timeout_ms}"))
    # Not CREATE SCHEMA IF NOT EXISTS: PostgreSQL checks the CREATE privilege on the
    # database first, which a role owning a schema its DBA made need not have.
    exists = connection.execute(text("SELECT 1 FROM pg_namespace WHERE nspname = :s"), {"s": SCHEMA})
    if exists.first() is None:
        connection.execute(text(f"CREATE SCHEMA {SCHEMA}"))
    connection.commit()
    _check_lock(connection)  # (in the next transaction: the same server session?)
    connection.commit()  # (Alembic takes a connection in a transaction for one the caller runs: one for all)
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table_schema=SCHEMA,
        include_schemas=True,
        include_name=include_name,
        transaction_per_migration=True,
        # each revision's transaction, before it commits: still under the run's lock?
        on_version_apply=lambda ctx, **_: _check_lock(ctx.connection),
    )
    # migrations.upgrade reads the revision under the lock: a newer release's run that held
    # it may have just committed a revision this release does not know (a rollback racing a
    # deploy). Its schema is a superset this release runs on; leave it as it is (upgrade
    # says so). Other commands (downgrade, stamp, check) fail on it, as Alembic's do.
    found = context.get_context().get_current_revision()
    if config.attributes.get("leave_newer") and found is not None and not known(found):
        config.attributes["newer_revision"] = found
    else:
        with context.begin_transaction():
            context.run_migrations()
    connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `controlplane migrate`")
run_migrations_online()
