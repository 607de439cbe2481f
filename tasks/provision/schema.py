"""Step 4, schema: the project's schema, grants, default privileges and search_path, in one transaction."""

from __future__ import annotations

from psycopg2 import sql

from models import project_queries as q
from tasks.provision import payload as p
from tasks.provision.state import ProjectState
from tasks.provision.target import session, translated
from tasks.settings import Settings


def ensure_schema(settings: Settings, state: ProjectState) -> dict[str, object]:
    """Create and grant the schema (least privilege: the app role gets DML, not DDL); idempotent."""
    payload = state.payload
    database = p.database_name(payload)
    schema, owner, app = (sql.Identifier(x) for x in (p.schema_name(payload), p.owner_role(payload),
                                                        p.app_role(payload)))
    statements = [
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(schema, owner),
        sql.SQL("REVOKE ALL ON SCHEMA public FROM PUBLIC"),
        sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(schema),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, app),
        sql.SQL(
            "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {}"
        ).format(owner, schema, app),
        sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT USAGE, SELECT ON SEQUENCES TO {}").format(
            owner, schema, app
        ),
        sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path = {}").format(app, sql.Identifier(database), schema),
        sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path = {}").format(owner, sql.Identifier(database), schema),
    ]
    with translated(f"creating schema in {database}"), session(settings, database, autocommit=False) as conn:
        with conn.cursor() as cur:
            # One at a time in this database: the same step delivered twice at once (its first
            # worker cut off until its lease ran out) would otherwise fail on the catalogs
            # (23505 on pg_namespace, "tuple concurrently updated"); the second now waits, then
            # finds everything done.
            cur.execute(q.LOCK_SCHEMA_STEP)
            for statement in statements:
                cur.execute(statement)
    return {"schema": p.schema_name(payload)}
