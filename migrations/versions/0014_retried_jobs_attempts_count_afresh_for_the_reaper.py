"""A retried job's attempts count afresh for the reaper too: ``jobs.attempts_before_retry``.

``retry_job`` gives a failed or cancelled job all its attempts again (Dramatiq's
``options.retries`` back to 0) and keeps ``jobs.attempts`` as the running total
of every attempt it ever had, which operators read. The reaper compared that
total with ``max_attempts``: a retried job whose worker then died was ended
``failed``, "its attempts are used up", on its first new attempt (a review
reproduced it with ``kill -9``). ``retry_job`` now records the total it retried
at, and the reaper counts the attempts since.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from migrations import replace_in_function

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

RETRY_BEFORE = "updated_at = now(), options = new_options"
RETRY_AFTER = "updated_at = now(), options = new_options, attempts_before_retry = j.attempts"


def upgrade() -> None:
    # A constant default: PostgreSQL records it in the catalog, the history is not rewritten.
    op.add_column(
        "jobs",
        sa.Column("attempts_before_retry", sa.Integer(), server_default=sa.text("0"), nullable=False),
        schema="control_plane",
    )
    replace_in_function("retry_job(uuid)", RETRY_BEFORE, RETRY_AFTER)


def downgrade() -> None:
    replace_in_function("retry_job(uuid)", RETRY_AFTER, RETRY_BEFORE)
    op.drop_column("jobs", "attempts_before_retry", schema="control_plane")
