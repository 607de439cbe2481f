"""The broker's message table, the jobs mirror, results, workers, operator views.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

S = "control_plane"


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("eta", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("claim_token", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        schema=S,
    )
    op.create_index(
        "ix_messages_ready",
        "messages",
        ["queue", "priority", "eta", "id"],
        schema=S,
        postgresql_where=sa.text("claim_token IS NULL"),
    )
    op.create_index(
        "ix_messages_lease",
        "messages",
        ["lease_expires_at"],
        schema=S,
        postgresql_where=sa.text("claim_token IS NOT NULL"),
    )
    # The hot table churns (every row is deleted on ack): vacuum it early and
    # often so that dead tuples never slow the claim query down.
    op.execute(
        f"ALTER TABLE {S}.messages SET (autovacuum_vacuum_scale_factor = 0.0, "
        "autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0, "
        "autovacuum_analyze_scale_factor = 0.02, fillfactor = 80)"
    )

    op.create_table(
        "jobs",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("payload", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("options", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("errors", postgresql.JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("result", postgresql.JSONB(), nullable=True),
        sa.Column("worker", sa.Text(), nullable=True),
        sa.Column("unique_key", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'completed', 'failed', 'cancelled')",
            name="ck_jobs_status",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        schema=S,
    )
    op.create_index("ix_jobs_status_type", "jobs", ["status", "type"], schema=S)
    op.create_index("ix_jobs_type_created_at", "jobs", ["type", "created_at"], schema=S)
    op.create_index("ix_jobs_created_at", "jobs", ["created_at"], schema=S)
    op.create_index(
        "uq_jobs_unique_key_live",
        "jobs",
        ["unique_key"],
        unique=True,
        schema=S,
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )

    op.create_table(
        "results",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("value", sa.LargeBinary(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name="pk_results"),
        schema=S,
    )
    op.create_index("ix_results_expires_at", "results", ["expires_at"], schema=S)

    op.create_table(
        "worker_heartbeats",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.BigInteger(), nullable=False),
        sa.Column("queues", postgresql.ARRAY(sa.Text()), server_default=sa.text("'{}'::text[]"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_worker_heartbeats"),
        schema=S,
    )

    # Views for operators: everything the CLI shows, from psql.
    op.execute(
        f"""
        CREATE VIEW {S}.failed_jobs AS
        SELECT id, type, queue, attempts, max_attempts, last_error, errors, payload,
               created_at, completed_at, worker
        FROM {S}.jobs WHERE status = 'failed'
        """
    )
    op.execute(
        f"""
        CREATE VIEW {S}.retrying_jobs AS
        SELECT id, type, queue, attempts, max_attempts, last_error, scheduled_at,
               scheduled_at - now() AS retry_in, errors, payload
        FROM {S}.jobs WHERE status = 'pending' AND attempts >= 1
        """
    )
    op.execute(
        f"""
        CREATE VIEW {S}.queue_stats AS
        SELECT queue,
               count(*) FILTER (WHERE status = 'pending' AND scheduled_at <= now()) AS ready,
               count(*) FILTER (WHERE status = 'pending' AND scheduled_at > now()) AS scheduled,
               count(*) FILTER (WHERE status = 'running') AS running,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               count(*) FILTER (WHERE status = 'completed'
                                AND completed_at > now() - interval '1 minute') AS completed_last_minute,
               coalesce(extract(epoch FROM now() - min(scheduled_at)
                        FILTER (WHERE status = 'pending' AND scheduled_at <= now())), 0)::double precision
                   AS oldest_ready_age_seconds
        FROM {S}.jobs GROUP BY queue
        """
    )
    op.execute(
        f"""
        CREATE VIEW {S}.workers AS
        SELECT w.id, w.hostname, w.pid, w.queues, w.started_at, w.heartbeat_at,
               now() - w.heartbeat_at AS silent_for,
               (SELECT count(*) FROM {S}.messages m WHERE m.worker = w.id) AS in_flight
        FROM {S}.worker_heartbeats w
        """
    )


def downgrade() -> None:
    for view in ("workers", "queue_stats", "retrying_jobs", "failed_jobs"):
        op.execute(f"DROP VIEW IF EXISTS {S}.{view}")
    for table in ("worker_heartbeats", "results", "jobs", "messages"):
        op.drop_table(table, schema=S)
