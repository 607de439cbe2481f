"""``projects.waiting_job_ids``: every caller of a project's provisioning gets its outcome.

A second ``provision_project.send`` of the same payload, sent after the first
job had been accepted but before the project was active, completed at once
with ``{"status": "provisioning"}`` and never heard more: the outcome went to
the first job only (``projects.job_id``). Its job id is now kept here, and
activation, compensation and a cleanup that needs an operator deliver the
outcome to ``job_id`` and to every job in this list.

Adding a column with a constant default rewrites nothing (PostgreSQL 11+).
The old release's workers ignore it: while they still run, such a second
caller waits in vain as before.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "ALTER TABLE control_plane.projects ADD COLUMN waiting_job_ids uuid[] NOT NULL DEFAULT '{}'::uuid[]"
    )


def downgrade() -> None:
    op.execute("ALTER TABLE control_plane.projects DROP COLUMN waiting_job_ids")
