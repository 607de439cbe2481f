"""``retry_job`` finds the job holding a unique key through ``uq_jobs_live_key``, not a scan.

When a failed or cancelled job cannot be retried because a live job holds its
unique key, ``retry_job`` (migration 0003) names that job in its error. It
looked it up with ``WHERE unique_key = ... AND status IN ('pending',
'running')``, which no index serves since migration 0005: one scan of the whole
history per refused retry, and ``jobs retry --failed`` can be refused once per
failed keyed job. ``live_key`` (0005) is that key while the job is live, and
its unique index finds the holder at once. Nothing else in the function
changes: it is 0003's text with that one condition replaced.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_0003 = importlib.import_module("migrations.versions.0003_operations")

SCAN = "WHERE j.unique_key = job.unique_key AND j.status IN ('pending', 'running')"
BY_INDEX = "WHERE j.live_key = job.unique_key"


def upgrade() -> None:
    assert _0003.RETRY_JOB.count(SCAN) == 1, "retry_job's holder lookup moved; update this migration"
    op.execute(_0003.RETRY_JOB.replace(SCAN, BY_INDEX))


def downgrade() -> None:
    op.execute(_0003.RETRY_JOB)
