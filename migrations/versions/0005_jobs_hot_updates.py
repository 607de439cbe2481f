"""Let a job's row change in place as it runs: no index of ``jobs`` covers what a completion changes.

A completion (``pending`` to ``completed``) changes ``status``, ``attempts``,
``started_at``, ``completed_at``, ``worker``, ``updated_at``. While any index
covered one of them (``ix_jobs_status_type``, and the live-unique-key index
through its ``WHERE status IN (...)``), PostgreSQL had to write the new row
version elsewhere and add an entry for it to every index of the table: four
index entries per completed job, and as many dead ones for vacuum. Now the
indexes that operators need by state are on stored generated columns that stay
NULL through a normal run, so a completion is a HOT update (the new version on
the same page, no index entry), given room on the page (``fillfactor`` 70):

* ``live_key``: the job's ``unique_key`` while it is pending or running, else
  NULL; ``uq_jobs_live_key`` keeps one live job per key (replaces
  ``uq_jobs_unique_key_live``).
* ``failed_at``: when a failed job failed, else NULL; ``ix_jobs_failed_at``
  serves ``failed_jobs`` and ``jobs retry --failed``.
* ``retry_at``: when a job waiting for another attempt runs next, else NULL;
  ``ix_jobs_retry_at`` serves ``retrying_jobs``.

Deploying it:

* Adding stored generated columns rewrites ``jobs`` under an exclusive lock: on
  a large history, prune it first or run this release in a quiet moment.
* The previous release's sends with a unique key name the dropped index
  (``ON CONFLICT (unique_key) WHERE status IN ...``): from this migration until
  its processes are replaced, they fail with "there is no unique or exclusion
  constraint matching the ON CONFLICT specification" (sends without a key, and
  its workers, go on). Stop the old release's senders and clocks before
  ``controlplane migrate``, or accept keyed sends failing for that moment
  (``docs/operations.md``, "Upgrading").

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

S = "control_plane"

#: The generated columns: (name, type, expression). Each is NULL for a job that just runs and completes.
GENERATED = (
    ("live_key", "text", "CASE WHEN status IN ('pending', 'running') THEN unique_key END"),
    ("failed_at", "timestamptz", "CASE WHEN status = 'failed' THEN coalesce(completed_at, updated_at) END"),
    ("retry_at", "timestamptz", "CASE WHEN status = 'pending' AND attempts >= 1 THEN scheduled_at END"),
)

#: The views whose filters move to the generated columns (their columns are unchanged).
VIEWS = {
    "failed_jobs": ("status = 'failed'", "failed_at IS NOT NULL"),
    "retrying_jobs": ("status = 'pending' AND attempts >= 1", "retry_at IS NOT NULL"),
}
VIEW_COLUMNS = {
    "failed_jobs": "id, type, queue, attempts, max_attempts, last_error, errors, payload, "
    "created_at, completed_at, worker",
    "retrying_jobs": "id, type, queue, attempts, max_attempts, last_error, scheduled_at, "
    "scheduled_at - now() AS retry_in, errors, payload",
}


def _views(new: bool) -> None:
    for view, (old_filter, new_filter) in VIEWS.items():
        op.execute(
            f"CREATE OR REPLACE VIEW {S}.{view} AS SELECT {VIEW_COLUMNS[view]} "
            f"FROM {S}.jobs WHERE {new_filter if new else old_filter}"
        )


def upgrade() -> None:
    # Room on each page for the new version of its rows: set first, so that the
    # rewrite below lays out the existing rows with it too.
    op.execute(f"ALTER TABLE {S}.jobs SET (fillfactor = 70)")
    op.execute(
        f"ALTER TABLE {S}.jobs "
        + ", ".join(f"ADD COLUMN {name} {type_} GENERATED ALWAYS AS ({expr}) STORED" for name, type_, expr in GENERATED)
    )
    op.drop_index("ix_jobs_status_type", table_name="jobs", schema=S)
    op.drop_index("uq_jobs_unique_key_live", table_name="jobs", schema=S)
    op.create_index(
        "uq_jobs_live_key", "jobs", ["live_key"], unique=True, schema=S,
        postgresql_where=sa.text("live_key IS NOT NULL"),
    )  # fmt: skip
    op.create_index(
        "ix_jobs_failed_at", "jobs", ["failed_at"], schema=S, postgresql_where=sa.text("failed_at IS NOT NULL")
    )
    op.create_index(
        "ix_jobs_retry_at", "jobs", ["retry_at"], schema=S, postgresql_where=sa.text("retry_at IS NOT NULL")
    )
    _views(new=True)


def downgrade() -> None:
    _views(new=False)
    op.execute(f"ALTER TABLE {S}.jobs RESET (fillfactor)")
    for index in ("ix_jobs_retry_at", "ix_jobs_failed_at", "uq_jobs_live_key"):
        op.drop_index(index, table_name="jobs", schema=S)
    op.execute(f"ALTER TABLE {S}.jobs " + ", ".join(f"DROP COLUMN {name}" for name, _, _ in GENERATED))
    op.create_index("ix_jobs_status_type", "jobs", ["status", "type"], schema=S)
    op.create_index(
        "uq_jobs_unique_key_live", "jobs", ["unique_key"], unique=True, schema=S,
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )  # fmt: skip
