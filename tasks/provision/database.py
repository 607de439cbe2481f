"""Step 3, database: ``CREATE DATABASE p_<id> OWNER p_<id>_owner TEMPLATE template0``.

``CREATE DATABASE`` cannot run in a transaction, so a worker killed right after
it leaves a database without its comment. Ownership is therefore proved by the
owner role (which carries the project's marker, set in the roles step's
transaction), and the comment is set again on every run.

The database is created closed (``ALLOW_CONNECTIONS false``) and opened only once
``PUBLIC`` has lost the ``CONNECT`` and ``TEMPORARY`` PostgreSQL gives it: created
open, another tenant's app role could connect in the moment between ``CREATE`` and
``REVOKE`` (a review did, looping on connect) and stay connected, hearing and forging
the new tenant's notifications and reading its catalog. A worker killed in between
leaves it closed; the next run opens it.
"""

from __future__ import annotations

import psycopg2.errors
from psycopg2 import sql

from tasks.errors import Conflict
from tasks.provision import payload as p
from tasks.provision.state import ProjectState
from tasks.provision.target import database_owner, marker, session, translated
from tasks.settings import Settings


def _is_ours(exists: bool, owner: str | None, owner_comment: str | None, payload: p.ProvisionPayload) -> bool:
    return exists and owner == p.owner_role(payload) and owner_comment == marker(payload.project_id)


def ensure_database(settings: Settings, state: ProjectState) -> dict[str, object]:
    """Create the project's database if missing, lock it down; idempotent."""
    payload = state.payload
    name, owner, app = p.database_name(payload), p.owner_role(payload), p.app_role(payload)
    created = False
    with translated(f"creating database {name}"), session(settings) as conn, conn.cursor() as cur:
        exists, current_owner, comment = database_owner(cur, name)
        if exists and not _is_ours(exists, current_owner, comment, payload):
            raise Conflict(f"database {name} already exists and does not belong to project {payload.project_id!r}")
        if not exists:
            try:
                cur.execute(
                    sql.SQL(
                        "CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING 'UTF8' ALLOW_CONNECTIONS false"
                    ).format(sql.Identifier(name), sql.Identifier(owner))
                )
                created = True
            except (psycopg2.errors.DuplicateDatabase, psycopg2.errors.UniqueViolation):
                exists, current_owner, comment = database_owner(cur, name)
                if not _is_ours(exists, current_owner, comment, payload):
                    raise Conflict(
                        f"database {name} already exists and does not belong to project {payload.project_id!r}"
                    ) from None
        ident = sql.Identifier(name)
        cur.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(ident, sql.Literal(marker(payload.project_id))))
        cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
        cur.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(ident, sql.Identifier(app)))
        cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(ident))
    return {"database": name, "created": created}


def drop_database(settings: Settings, payload: p.ProvisionPayload) -> bool:
    """Drop the project's database if (and only if) it is provably ours. Idempotent."""
    name = p.database_name(payload)
    with translated(f"dropping database {name}"), session(settings) as conn, conn.cursor() as cur:
        exists, owner, comment = database_owner(cur, name)
        if not exists:
            return False
        if not _is_ours(exists, owner, comment, payload):
            return False  # someone else's: never dropped
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        return True
