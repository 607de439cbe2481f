"""Roles that use the database's other tables keep ``CONNECT`` (what 0009 took from them).

0009 closed the control plane's database to every role but those with ``USAGE`` on
the ``control_plane`` schema, so that tenants' roles cannot reach it. When the
control plane shares its database with an application (the README's
``enqueue_in`` setup), that also locked out the application's other roles: a
reporting role reading its tables, an exporter, a role owning a schema there. They
had ``CONNECT`` through ``PUBLIC`` and lost it without a word.

This grants ``CONNECT`` and ``TEMPORARY`` (what ``PUBLIC`` had) to every role that
owns a schema or a table of this database, or was granted a privilege on one, and
cannot connect now, and names them on stderr. Tenants' roles own nothing here and
stay out. Only the database's owner or a superuser may grant it: run by another
role, this changes nothing and says so.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

import sys

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

#: Roles that own, or hold privileges on, this database's schemas and tables (not the system's),
#: and cannot connect to it (`%%`: the driver formats the statement).
USERS_LOCKED_OUT = r"""
SELECT DISTINCT g.rolname
FROM (
    SELECT c.relowner AS oid FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_toast%%'
    UNION
    SELECT (aclexplode(c.relacl)).grantee FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
    WHERE c.relacl IS NOT NULL AND n.nspname NOT IN ('pg_catalog', 'information_schema')
    UNION
    SELECT n.nspowner FROM pg_namespace AS n
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\_%%'
    UNION
    SELECT (aclexplode(n.nspacl)).grantee FROM pg_namespace AS n
    WHERE n.nspacl IS NOT NULL AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg\_%%'
) AS h
JOIN pg_roles AS g ON g.oid = h.oid
WHERE NOT g.rolsuper AND g.rolname NOT LIKE 'pg\_%%'
  AND NOT has_database_privilege(g.oid, current_database(), 'CONNECT')
ORDER BY g.rolname
"""


def upgrade() -> None:
    bind = op.get_bind()
    roles = [row[0] for row in bind.exec_driver_sql(USERS_LOCKED_OUT)]
    if not roles:
        return
    may_grant = bind.exec_driver_sql(
        "SELECT pg_has_role(current_user, (SELECT datdba FROM pg_database WHERE datname = current_database()),"
        " 'USAGE') OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)"
    ).scalar()
    names = ", ".join(roles[:20]) + (f" and {len(roles) - 20} more" if len(roles) > 20 else "")
    if not may_grant:
        print(
            f"controlplane migrate: warning: roles that use this database's tables cannot connect to it: {names}; "
            "only its owner or a superuser can GRANT CONNECT ON DATABASE to them (docs/operations.md, Upgrading, "
            "0012)",
            file=sys.stderr,
        )
        return
    for role in roles:
        statement = bind.exec_driver_sql(
            "SELECT format('GRANT CONNECT, TEMPORARY ON DATABASE %%I TO %%I', current_database(), %s)",
            (role,),
        ).scalar()
        bind.exec_driver_sql(statement)
    print(f"controlplane migrate: roles that use this database's tables may connect again: {names}", file=sys.stderr)


def downgrade() -> None:
    # The grants stay: revoking them could lock out roles that had CONNECT before 0009 too.
    pass
