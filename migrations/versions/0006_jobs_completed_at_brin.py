"""Count the jobs completed in the last minute without reading the whole history (PostgreSQL 16+).

``controlplane stats`` and the queue gauges ask, at every refresh or scrape,
how many jobs each queue completed in the last minute. No index of ``jobs``
covers ``completed_at``: a btree on it would take HOT away from every
completion (migration 0005), so that count read all of ``jobs``, 140 ms per
million rows on the benchmark machine, per scrape.

A BRIN index on ``completed_at`` answers it from the few block ranges that
hold recent completions: jobs complete in roughly the order they were sent, so
each range's min/max stays narrow. A job that completes long after it was
written (a long delay, a retry after a long backoff, ``jobs retry --failed``)
widens its old range's max, and the count reads that range until the minute
has passed: 16 pages per range (not the default 128) keeps that to 128 kB per
such job. From PostgreSQL 16 on, a BRIN index
("summarizing") does not stop an update from being HOT; up to 15 it does, so
there this migration creates nothing and the count still reads the table.
``autosummarize`` summarizes each range as it fills, without waiting for a
vacuum. A database moved to PostgreSQL 16 or later later on gets the index by
running this migration's SQL by hand (``docs/operations.md``, "Upgrading").

The index is not in the SQLAlchemy models, since it exists only on some
servers; the schema comparison test leaves it out.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

S = "control_plane"

#: The index, and the first server version on which a BRIN index keeps updates HOT.
INDEX = "ix_jobs_completed_at_brin"
CREATE = (
    f"CREATE INDEX IF NOT EXISTS {INDEX} ON {S}.jobs USING brin (completed_at) "
    "WITH (pages_per_range = 16, autosummarize = on)"
)
HOT_SAFE_FROM = 160000


def upgrade() -> None:
    version = op.get_bind().exec_driver_sql("SHOW server_version_num").scalar()
    if int(version) >= HOT_SAFE_FROM:
        op.execute(CREATE)


def downgrade() -> None:
    op.execute(f"DROP INDEX IF EXISTS {S}.{INDEX}")
