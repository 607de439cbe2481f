"""Operating the queue from SQL: cancel, retry and prune jobs.

Adds ``messages.cancel_requested_at`` (set on a running message by
``cancel_job``; its worker interrupts it) and three functions, so that
everything the ``controlplane`` CLI does can be done from psql:

* ``control_plane.cancel_job(id uuid) RETURNS text``
* ``control_plane.retry_job(id uuid) RETURNS boolean``
* ``control_plane.prune_jobs(completed_older_than interval, failed_older_than interval) RETURNS bigint``

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from migrations import create_functions, drop_functions

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

S = "control_plane"

# Parameters are referred to as function_name.parameter, columns through a
# table alias, so that the parameter ``id`` never clashes with a column ``id``.
CANCEL_JOB = f"""
CREATE OR REPLACE FUNCTION {S}.cancel_job(id uuid) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    claimed boolean;
    queue_name text;
BEGIN
    -- Lock the message: a claim running now either took it first (we then see
    -- it claimed) or skips it (CLAIM uses SKIP LOCKED) and it is gone at commit.
    SELECT m.claim_token IS NOT NULL, m.queue INTO claimed, queue_name
    FROM {S}.messages AS m WHERE m.id = cancel_job.id
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;  -- no such job, or it has finished: nothing to cancel
    END IF;
    IF NOT claimed THEN
        DELETE FROM {S}.messages AS m WHERE m.id = cancel_job.id;
        UPDATE {S}.jobs AS j
           SET status = 'cancelled', completed_at = now(), updated_at = now(),
               last_error = 'cancelled by operator'
         WHERE j.id = cancel_job.id;
        RETURN 'cancelled';
    END IF;
    -- Running: its worker sees the request at its next heartbeat, which this
    -- NOTIFY brings forward, and interrupts the attempt; the job then ends
    -- 'cancelled'. Should the worker die first, the reaper cancels it.
    UPDATE {S}.messages AS m
       SET cancel_requested_at = coalesce(m.cancel_requested_at, now())
     WHERE m.id = cancel_job.id;
    PERFORM pg_notify('control_plane_messages', 'cancel:' || queue_name);
    RETURN 'cancelling';
END
$$
"""

RETRY_JOB = f"""
CREATE OR REPLACE FUNCTION {S}.retry_job(id uuid) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    job record;
    new_options jsonb;
BEGIN
    SELECT j.id, j.type, j.queue, j.payload, j.options, j.priority, j.unique_key INTO job
    FROM {S}.jobs AS j
    WHERE j.id = retry_job.id AND j.status IN ('failed', 'cancelled')
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN false;  -- no such job, or it is pending, running or completed
    END IF;
    IF jsonb_typeof(job.payload -> 'args') IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'job % cannot be retried: its message could not be decoded, so it has no arguments', job.id;
    END IF;
    -- Dramatiq's Retries counts from options.retries: the retried job gets all its attempts again.
    new_options := (job.options - 'traceback') || '{{"retries": 0}}'::jsonb;
    BEGIN
        UPDATE {S}.jobs AS j
           SET status = 'pending', scheduled_at = now(), started_at = NULL, completed_at = NULL,
               updated_at = now(), options = new_options
         WHERE j.id = job.id;
    EXCEPTION WHEN unique_violation THEN
        RAISE EXCEPTION 'job % cannot be retried: job % with the same unique key % is pending or running',
            job.id,
            (SELECT j.id FROM {S}.jobs AS j
             WHERE j.unique_key = job.unique_key AND j.status IN ('pending', 'running')),
            job.unique_key
            USING ERRCODE = 'unique_violation';
    END;
    -- The Dramatiq message, rebuilt from the mirror as Message.asdict() encodes it
    -- (JSON, UTF-8). message_timestamp is now: a retry is a new send for AgeLimit.
    INSERT INTO {S}.messages AS m (id, queue, actor, priority, eta, body)
    VALUES (job.id, job.queue, job.type, job.priority, now(), convert_to(jsonb_build_object(
                'queue_name', job.queue,
                'actor_name', job.type,
                'args', job.payload -> 'args',
                'kwargs', coalesce(job.payload -> 'kwargs', '{{}}'::jsonb),
                'options', new_options,
                'message_id', job.id,
                'message_timestamp', floor(extract(epoch FROM now()) * 1000)::bigint)::text, 'UTF8'))
    ON CONFLICT ON CONSTRAINT pk_messages DO UPDATE
       SET queue = excluded.queue, actor = excluded.actor, priority = excluded.priority, eta = excluded.eta,
           body = excluded.body, claim_token = NULL, worker = NULL, lease_expires_at = NULL,
           cancel_requested_at = NULL;
    PERFORM pg_notify('control_plane_messages', job.queue);
    RETURN true;
END
$$
"""

PRUNE_JOBS = f"""
CREATE OR REPLACE FUNCTION {S}.prune_jobs(completed_older_than interval, failed_older_than interval)
RETURNS bigint
LANGUAGE sql AS $$
    WITH finished AS (
        DELETE FROM {S}.jobs AS j
        WHERE (j.status IN ('completed', 'cancelled')
               AND coalesce(j.completed_at, j.updated_at) < now() - completed_older_than)
           OR (j.status = 'failed' AND coalesce(j.completed_at, j.updated_at) < now() - failed_older_than)
        RETURNING 1
    ), expired AS (
        DELETE FROM {S}.results AS r WHERE r.expires_at <= now()
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM finished) + (SELECT count(*) FROM expired)
$$
"""

COMMENTS = {
    "cancel_job(uuid)": "Cancel a job: 'cancelled' if it was waiting (at once), 'cancelling' if it runs "
    "(its worker interrupts it), NULL if there is nothing to cancel.",
    "retry_job(uuid)": "Put a failed or cancelled job back in its queue, its error history kept; "
    "false if it is in neither state.",
    "prune_jobs(interval, interval)": "Delete completed and cancelled jobs finished longer ago than the first "
    "age, failed ones than the second, and expired results; returns the rows deleted.",
}


def upgrade() -> None:
    op.add_column("messages", sa.Column("cancel_requested_at", sa.DateTime(timezone=True), nullable=True), schema=S)
    create_functions([CANCEL_JOB, RETRY_JOB, PRUNE_JOBS], COMMENTS)


def downgrade() -> None:
    drop_functions(list(COMMENTS))
    op.drop_column("messages", "cancel_requested_at", schema=S)
