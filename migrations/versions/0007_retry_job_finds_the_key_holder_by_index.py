"""``retry_job`` finds the job holding a unique key through ``uq_jobs_live_key``, not a scan.

When a failed or cancelled job cannot be retried because a live job holds its
unique key, ``retry_job`` (migration 0003) names that job in its error. It
looked it up with ``WHERE unique_key = ... AND status IN ('pending',
'running')``, which no index serves since migration 0005: one scan of the whole
history per refused retry, and ``jobs retry --failed`` can be refused once per
failed keyed job. ``live_key`` (0005) is that key while the job is live, and
its unique index finds the holder at once. Nothing else in the function
changes: the migration reads the function as the database has it and replaces
that one condition (and back on downgrade), so it does not depend on how any
other migration's source reads later.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from migrations import replace_in_function

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

SCAN = "WHERE j.unique_key = job.unique_key AND j.status IN ('pending', 'running')"
BY_INDEX = "WHERE j.live_key = job.unique_key"


def upgrade() -> None:
    replace_in_function("retry_job(uuid)", SCAN, BY_INDEX)


def downgrade() -> None:
    replace_in_function("retry_job(uuid)", BY_INDEX, SCAN)
