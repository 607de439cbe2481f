"""The control plane's database is no longer open to every role of the server.

PostgreSQL grants ``CONNECT`` and ``TEMPORARY`` on a new database to ``PUBLIC``.
``provision_project`` creates a login role per tenant (``p_<id>_app``), by
default on this same server, so every tenant could connect to the control
plane's database: list every project, ``NOTIFY`` the workers' channel, and
hold the advisory locks the broker and the workflow take (a tenant holding
one stalled every send to a queue, or every claim of a project). Locks and
notifications need no privilege beyond ``CONNECT``.

This revokes both from ``PUBLIC`` on the database being migrated, after
granting them to every existing role that can use the control plane (holds
``USAGE`` on the ``control_plane`` schema: its owner and the roles an operator
granted it to), so no role that works with it now loses it. Roles made later
need ``GRANT CONNECT ON DATABASE ...`` (docs/operations.md, "Upgrading",
0009). Only the database's owner or a superuser may change its privileges:
run by another role, this changes nothing and says so on stderr (and in the
server's log).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05
"""

from __future__ import annotations

import sys

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        r"""
DO $$
DECLARE
    db text := current_database();
    r record;
BEGIN
    IF NOT pg_has_role(current_user, (SELECT datdba FROM pg_database WHERE datname = db), 'USAGE')
       AND NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        RAISE WARNING 'database % stays open to every role (CONNECT and TEMPORARY for PUBLIC): only its owner '
                      'or a superuser can revoke them; run REVOKE CONNECT, TEMPORARY ON DATABASE % FROM PUBLIC '
                      'as one', db, db;
        RETURN;
    END IF;
    FOR r IN SELECT rolname FROM pg_roles
             WHERE NOT rolsuper AND rolname NOT LIKE 'pg\_%'
               AND has_schema_privilege(oid, 'control_plane', 'USAGE')
    LOOP
        EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', db, r.rolname);
    END LOOP;
    EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', db);
END
$$
"""
    )
    still_open = op.get_bind().exec_driver_sql(
        "SELECT has_database_privilege('public', current_database(), 'CONNECT')"
    ).scalar()
    if still_open:
        print(
            "controlplane migrate: warning: this database stays open to every role of the server (CONNECT for "
            "PUBLIC): only its owner or a superuser can close it; run REVOKE CONNECT, TEMPORARY ON DATABASE "
            "<db> FROM PUBLIC as one (docs/operations.md, Upgrading, 0009)",
            file=sys.stderr,
        )


def downgrade() -> None:
    op.execute(
        "DO $$ BEGIN EXECUTE format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO PUBLIC', current_database()); END $$"
    )
