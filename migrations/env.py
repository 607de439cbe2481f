"""Alembic's environment: online migrations only, under an advisory lock."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from migrations import MIGRATION_LOCK_KEY, include_name, known
from models import SCHEMA, metadata

config = context.config


def run_migrations_online() -> None:
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "", poolclass=NullPool)
    with engine.connect() as connection:
        # Serialise concurrent runs, for the session (released when it closes): each revision
        # commits on its own. In one transaction for all, a later revision waiting for a lock
        # (0019 for a view a report had open) kept every lock an earlier one took (0018's on
        # jobs), and every send and outcome waited behind it, try after try.
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
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
        context.configure(
            connection=connection,
            target_metadata=metadata,
            version_table_schema=SCHEMA,
            include_schemas=True,
            include_name=include_name,
            transaction_per_migration=True,
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
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `controlplane migrate`")
run_migrations_online()
