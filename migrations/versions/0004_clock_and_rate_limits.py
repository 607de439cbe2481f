"""Periodic tasks and rate limits: ``schedule_ticks`` and ``rate_limits``.

* ``control_plane.schedule_ticks``: one row per tick of a periodic task that
  was enqueued. Its primary key (schedule, tick time) is what makes each tick
  run once however many ``controlplane clock`` processes run: the tick row and
  the job's message are inserted in one transaction, the losers' inserts do
  nothing.
* ``control_plane.rate_limits``: the counters of Dramatiq's rate limiters and
  group-completion barriers (``tasks.rate_limits.PostgresRateLimiterBackend``);
  a row past ``expires_at`` counts as absent.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

S = "control_plane"


def upgrade() -> None:
    op.create_table(
        "schedule_ticks",
        sa.Column("schedule_name", sa.Text(), nullable=False),
        sa.Column("tick_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("job_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("schedule_name", "tick_at", name="pk_schedule_ticks"),
        schema=S,
    )
    op.create_table(
        "rate_limits",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_rate_limits"),
        schema=S,
    )
    op.create_index("ix_rate_limits_expires_at", "rate_limits", ["expires_at"], schema=S)
    # Window limiters write a row per second: vacuum it as eagerly as the queue table.
    op.execute(
        f"ALTER TABLE {S}.rate_limits SET (autovacuum_vacuum_scale_factor = 0.0, "
        "autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0)"
    )


def downgrade() -> None:
    op.drop_index("ix_rate_limits_expires_at", table_name="rate_limits", schema=S)
    op.drop_table("rate_limits", schema=S)
    op.drop_table("schedule_ticks", schema=S)
