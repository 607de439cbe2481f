"""The tables: the broker's hot message table, the jobs mirror, results, workers,
schedule ticks, rate-limit counters, and provision_project's projects and API keys.

``messages`` holds only what is waiting or running (rows leave on ack) so that
claims stay fast; ``jobs`` is the history an operator reads with SQL.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Computed,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base

JOB_STATUSES = ("pending", "running", "completed", "failed", "cancelled")


class Message(Base):
    """A message waiting for a worker, or leased to one (the broker's hot table)."""

    __tablename__ = "messages"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    queue: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    eta: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    body: Mapped[bytes] = mapped_column(LargeBinary)
    claim_token: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    worker: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    #: Set by ``control_plane.cancel_job`` on a running message: its worker interrupts it.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        # The claim query's index: only unclaimed rows, in claim order.
        Index(
            "ix_messages_ready",
            "queue",
            "priority",
            "eta",
            "id",
            postgresql_where=text("claim_token IS NULL"),
        ),
        # The reaper's index: only leased rows.
        Index(
            "ix_messages_lease",
            "lease_expires_at",
            postgresql_where=text("claim_token IS NOT NULL"),
        ),
    )


class Job(Base):
    """One job and its whole history of attempts: the mirror operators query."""

    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    type: Mapped[str] = mapped_column(Text)
    queue: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    options: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(Text, server_default=text("'pending'"))
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    #: ``attempts`` when an operator last retried the job (``retry_job``; migration 0014): the
    #: reaper counts the attempts since, as Dramatiq's ``options.retries`` does.
    attempts_before_retry: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    scheduled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    result: Mapped[Any | None] = mapped_column(JSONB)
    worker: Mapped[str | None] = mapped_column(Text)
    unique_key: Mapped[str | None] = mapped_column(Text)
    # Generated columns, NULL while a job just runs and completes, so that the
    # indexes on them never stop a completion from being a HOT update (see
    # migration 0005 and docs/design.md, "The jobs table's indexes").
    #: ``unique_key`` while the job is pending or running.
    live_key: Mapped[str | None] = mapped_column(
        Text, Computed("CASE WHEN status IN ('pending', 'running') THEN unique_key END", persisted=True)
    )
    #: When a failed job failed.
    failed_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True),
        Computed("CASE WHEN status = 'failed' THEN coalesce(completed_at, updated_at) END", persisted=True),
    )
    #: When a job waiting for another attempt runs next.
    retry_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True),
        Computed("CASE WHEN status = 'pending' AND attempts >= 1 THEN scheduled_at END", persisted=True),
    )

    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'running', 'completed', 'failed', 'cancelled')",
            name="status",
        ),
        Index("ix_jobs_type_created_at", "type", "created_at"),
        Index("ix_jobs_created_at", "created_at"),
        # One live job per unique key: a second send finds the first.
        Index("uq_jobs_live_key", "live_key", unique=True, postgresql_where=text("live_key IS NOT NULL")),
        Index("ix_jobs_failed_at", "failed_at", postgresql_where=text("failed_at IS NOT NULL")),
        Index("ix_jobs_queue_failed_at", "queue", "failed_at", postgresql_where=text("failed_at IS NOT NULL")),
        Index("ix_jobs_retry_at", "retry_at", postgresql_where=text("retry_at IS NOT NULL")),
        {"postgresql_with": {"fillfactor": 70}},
    )


class Result(Base):
    """A stored actor result (or exception) for ``message.get_result()``."""

    __tablename__ = "results"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_results_expires_at", "expires_at"),)


class Worker(Base):
    """A live worker process and its last heartbeat."""

    __tablename__ = "worker_heartbeats"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    hostname: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(BigInteger)
    queues: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'::text[]"))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    heartbeat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ScheduleTick(Base):
    """One tick of a periodic task that a clock enqueued: its primary key makes each tick run once."""

    __tablename__ = "schedule_ticks"

    schedule_name: Mapped[str] = mapped_column(Text, primary_key=True)
    tick_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    #: The job the tick enqueued (or the live job holding its unique key).
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class RateLimit(Base):
    """A counter of a Dramatiq rate limiter or group barrier; past ``expires_at`` it counts as absent."""

    __tablename__ = "rate_limits"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_rate_limits_expires_at", "expires_at"),)


PROJECT_STATUSES = ("provisioning", "active", "compensating", "needs_operator")


class Project(Base):
    """A tenant project being provisioned (or provisioned): the workflow's own record."""

    __tablename__ = "projects"

    project_id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    payload_hash: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default=text("'provisioning'"))
    region: Mapped[str] = mapped_column(Text)
    owner_id: Mapped[str | None] = mapped_column(Text)
    organization_id: Mapped[str | None] = mapped_column(Text)
    #: Which steps started and finished: {"roles": {"started_at": ..., "done_at": ...}, ...}
    steps: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    #: Seed of the project's secrets (API keys, app role password) until the caller reads them once.
    secret_nonce: Mapped[bytes | None] = mapped_column(LargeBinary)
    secrets_expire_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: The job the caller got from provision_project.send().
    job_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    #: Later provision_project jobs of the same payload: told the outcome with job_id (migration 0008).
    waiting_job_ids: Mapped[list[uuid.UUID]] = mapped_column(
        ARRAY(UUID(as_uuid=True)), server_default=text("'{}'::uuid[]")
    )
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    last_error: Mapped[str | None] = mapped_column(Text)
    provisioned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint(
            "status IN ('provisioning', 'active', 'compensating', 'needs_operator')",
            name="status",
        ),
        Index("ix_projects_tenant_id", "tenant_id"),
    )


class ApiKey(Base):
    """One API key slot of a project: only a keyed hash and a display hint, never the key."""

    __tablename__ = "api_keys"

    project_id: Mapped[str] = mapped_column(
        Text, ForeignKey("control_plane.projects.project_id", ondelete="CASCADE"), primary_key=True
    )
    slot: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(Text)
    hint: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("key_hash"),)


class ActorDefaults(Base):
    """Each actor's priority and attempts as its workers declare it (migration 0015): a send
    of an actor the sender does not declare takes them from here. And the lifetime of its
    results (0021), for the results SQL stores without its workers."""

    __tablename__ = "actor_defaults"

    actor: Mapped[str] = mapped_column(Text, primary_key=True)
    queue: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer)
    max_attempts: Mapped[int] = mapped_column(Integer)
    declared_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    #: How long its results live (migration 0021): its ``result_ttl`` option, else its workers'
    #: ``CONTROLPLANE_RESULT_TTL_MS``; read by the results SQL stores (a cancel's, the reaper's).
    result_ttl_ms: Mapped[int | None] = mapped_column(BigInteger)


class QueuePause(Base):
    """A paused queue (migration 0017): no worker claims its jobs until it is resumed
    (``control_plane.pause_queue``, ``resume_queue``)."""

    __tablename__ = "queue_pauses"

    queue: Mapped[str] = mapped_column(Text, primary_key=True)
    paused_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    reason: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (CheckConstraint("queue ~ '^[A-Za-z_][A-Za-z0-9._-]*$'", name="queue_name"),)


class Deployment(Base):
    """Facts every process of a deployment must agree on (migration 0013): the API key
    pepper's fingerprint, ``api_key_pepper_fingerprint``."""

    __tablename__ = "deployment"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    set_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
