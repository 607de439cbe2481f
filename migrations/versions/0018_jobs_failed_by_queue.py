"""Count each queue's failed jobs from an index: ``ix_jobs_queue_failed_at``.

``controlplane stats`` and the queue gauges count, at every refresh or scrape, the failed
jobs each queue keeps. ``ix_jobs_failed_at`` found them but not their queue, so the count
read every kept failed row from the table: 300 ms for 121,000 of them (4% of 3 million
jobs kept 30 days) on the benchmark machine, at every scrape. With the queue in the index
it is an index-only scan (10 ms there). The index changes only when a job fails for good
(an update that is not HOT anyway: ``ix_jobs_failed_at`` changes with it), so completions
stay HOT. It also serves ``controlplane jobs list --status failed --queue Q``.

Building it reads all of ``jobs`` while the table takes reads but not writes (sends and
settles wait): 0.5 s for 3 million jobs (121,000 of them failed) on the benchmark machine. On a large history
prune first, or build it beforehand with ``CREATE INDEX CONCURRENTLY`` (the statement in
``docs/operations.md``, "Upgrading"), which this migration then finds and keeps (one
left invalid by a failed or cancelled build, it builds again).

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None

S = "control_plane"


def upgrade() -> None:
    # One built beforehand (CONCURRENTLY) is kept, and no lock is taken: CREATE INDEX IF NOT EXISTS
    # would wait for the table's lock, behind any open writer, before it looked at the name. One
    # left INVALID by a failed or cancelled build, which the planner ignores, is built again.
    op.execute(f"""
        DO $$
        DECLARE
            valid boolean := (SELECT indisvalid FROM pg_index
                              WHERE indexrelid = to_regclass('{S}.ix_jobs_queue_failed_at'));
        BEGIN
            IF valid THEN
                RETURN;
            ELSIF NOT valid THEN
                DROP INDEX {S}.ix_jobs_queue_failed_at;
            END IF;
            CREATE INDEX ix_jobs_queue_failed_at ON {S}.jobs (queue, failed_at) WHERE failed_at IS NOT NULL;
        END $$""")


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {S}.ix_jobs_queue_failed_at")
