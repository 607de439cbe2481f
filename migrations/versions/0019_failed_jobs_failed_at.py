"""``control_plane.failed_jobs`` gets a ``failed_at`` column: the latest failures, from an index.

The view had ``created_at`` and ``completed_at`` and no column for when a job failed for good,
which ``ix_jobs_failed_at`` indexes. ``SELECT * FROM control_plane.failed_jobs`` returned every
failed job the retention keeps (a month's, with their payloads and error histories); ordered
by ``completed_at`` and limited, PostgreSQL still read every one of them to sort them. Ordered
by ``failed_at`` it reads the index's end: ``... ORDER BY failed_at DESC LIMIT 20``.

The column goes last, so the view is replaced in place: its grants, its comment and any view of
an operator's built on it stay, and no table is locked. The downgrade has to drop the view to
take a column away (PostgreSQL cannot): it grants again what the view was granted and sets
its comment again (the view is then owned by the role that downgrades), and fails, naming it,
if an operator's view depends on this one.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

S = "control_plane"

#: The view's columns before this revision (0005's).
COLUMNS = "id, type, queue, attempts, max_attempts, last_error, errors, payload, created_at, completed_at, worker"


def upgrade() -> None:
    op.execute(f"CREATE OR REPLACE VIEW {S}.failed_jobs AS "
               f"SELECT {COLUMNS}, failed_at FROM {S}.jobs WHERE failed_at IS NOT NULL")  # fmt: skip


def downgrade() -> None:
    # Dropped and made again: its grants (to roles and PUBLIC, with grant option or not) and its
    # comment are read first and given back.
    op.execute(f"""
        DO $$
        DECLARE
            acl aclitem[] := (SELECT relacl FROM pg_class WHERE oid = '{S}.failed_jobs'::regclass);
            note text := obj_description('{S}.failed_jobs'::regclass, 'pg_class');
            owner oid := (SELECT relowner FROM pg_class WHERE oid = '{S}.failed_jobs'::regclass);
            g record;
        BEGIN
            DROP VIEW {S}.failed_jobs;
            CREATE VIEW {S}.failed_jobs AS SELECT {COLUMNS} FROM {S}.jobs WHERE failed_at IS NOT NULL;
            EXECUTE format('COMMENT ON VIEW {S}.failed_jobs IS %L', note);
            FOR g IN SELECT * FROM aclexplode(acl) WHERE grantee <> owner LOOP
                EXECUTE format('GRANT %s ON {S}.failed_jobs TO %s%s', g.privilege_type,
                               CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END,
                               CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END);
            END LOOP;
        END $$""")
