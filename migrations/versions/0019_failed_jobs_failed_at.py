"""``control_plane.failed_jobs`` gets a ``failed_at`` column: the latest failures, from an index.

The view had ``created_at`` and ``completed_at`` and no column for when a job failed for good,
which ``ix_jobs_failed_at`` indexes. ``SELECT * FROM control_plane.failed_jobs`` returned every
failed job the retention keeps (a month's, with their payloads and error histories); ordered
by ``completed_at`` and limited, PostgreSQL still read every one of them to sort them. Ordered
by ``failed_at`` it reads the index's end: ``... ORDER BY failed_at DESC LIMIT 20``.

The column goes last, so the view is replaced in place: its owner, grants, comment and options
and any view of an operator's built on it stay, and no table is locked. The downgrade has to drop the view to
take a column away (PostgreSQL cannot): it gives the view back its owner, its comment, its
options (``security_barrier``) and what it was granted, on the view and on its columns, and
fails, naming it, if an operator's view depends on this one.

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
    # (CREATE OR REPLACE VIEW keeps the owner, the grants and the comment, but sets the options
    # anew: those an operator set, security_barrier say, are read first and set again)
    op.execute(f"""
        DO $$
        DECLARE
            options text[] := (SELECT reloptions FROM pg_class WHERE oid = '{S}.failed_jobs'::regclass);
        BEGIN
            CREATE OR REPLACE VIEW {S}.failed_jobs AS
                SELECT {COLUMNS}, failed_at FROM {S}.jobs WHERE failed_at IS NOT NULL;
            IF options IS NOT NULL THEN
                EXECUTE format('ALTER VIEW {S}.failed_jobs SET (%s)', array_to_string(options, ', '));
            END IF;
        END $$""")


#: What makes the view as it is, read before it is dropped, as statements in the order they run:
#: its owner, comment and options, and its grants to roles and PUBLIC, on the view and on each
#: column it keeps (the owner's own privileges are its by owning it).
RESTORE = f"""
SELECT 1, format('ALTER VIEW {S}.failed_jobs OWNER TO %s', c.relowner::regrole)
FROM pg_class AS c WHERE c.oid = '{S}.failed_jobs'::regclass
UNION ALL
SELECT 2, format('COMMENT ON VIEW {S}.failed_jobs IS %L', obj_description(c.oid, 'pg_class'))
FROM pg_class AS c WHERE c.oid = '{S}.failed_jobs'::regclass AND obj_description(c.oid, 'pg_class') IS NOT NULL
UNION ALL
SELECT 3, format('ALTER VIEW {S}.failed_jobs SET (%s)', array_to_string(c.reloptions, ', '))
FROM pg_class AS c WHERE c.oid = '{S}.failed_jobs'::regclass AND c.reloptions IS NOT NULL
UNION ALL
SELECT 4, format('GRANT %s%s ON {S}.failed_jobs TO %s%s', g.privilege_type,
                 coalesce(' (' || quote_ident(a.attname) || ')', ''),
                 CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE g.grantee::regrole::text END,
                 CASE WHEN g.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)
FROM pg_class AS c
CROSS JOIN LATERAL (SELECT NULL::name AS attname, c.relacl AS acl
                    UNION ALL
                    SELECT a.attname, a.attacl FROM pg_attribute AS a
                    WHERE a.attrelid = c.oid AND a.attnum > 0 AND a.attacl IS NOT NULL
                      AND a.attname <> 'failed_at') AS a
CROSS JOIN LATERAL aclexplode(a.acl) AS g
WHERE c.oid = '{S}.failed_jobs'::regclass AND g.grantee <> c.relowner
"""


def downgrade() -> None:
    # Dropped and made again (PostgreSQL cannot drop a view's column), then given back what made
    # it as it was, by statements written before the drop.
    op.execute(f"""
        DO $$
        DECLARE
            restore text[] := ARRAY(SELECT r.statement FROM ({RESTORE}) AS r (step, statement) ORDER BY r.step);
            statement text;
        BEGIN
            DROP VIEW {S}.failed_jobs;
            CREATE VIEW {S}.failed_jobs AS SELECT {COLUMNS} FROM {S}.jobs WHERE failed_at IS NOT NULL;
            FOREACH statement IN ARRAY restore LOOP
                EXECUTE statement;
            END LOOP;
        END $$""")
