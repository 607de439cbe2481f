"""Pausing a queue: ``control_plane.queue_pauses`` and two functions.

An operator whose queue's jobs fail against a service that is down, or who must hold a
queue's work during a maintenance, stops its workers from taking its jobs without
stopping the workers (which may consume other queues) and without touching the jobs:

* ``control_plane.pause_queue(queue text, reason text DEFAULT NULL) RETURNS boolean``
* ``control_plane.resume_queue(queue text) RETURNS boolean``

A claim takes nothing from a paused queue (``models.queries.CLAIM``), and its workers give
back at their next heartbeat, which the pause's NOTIFY brings forward, the messages they
hold but have not started; the jobs that run go on. Sends, delays, retries and the clock
go on: the jobs wait ``pending``. ``resume_queue`` wakes the queue's workers. Roles that may
read the messages are granted SELECT on the new table (every claim, the stats and the metrics
read it); roles that may delete them (workers, operators who cancel) INSERT and DELETE too.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from migrations import create_functions, drop_functions, grant_by_privileges_on_messages

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

S = "control_plane"

#: ``tasks.settings.QUEUE_NAME`` (Dramatiq's), in SQL.
QUEUE_NAME_CHECK = "queue ~ '^[A-Za-z_][A-Za-z0-9._-]*$'"

PAUSE_QUEUE = f"""
CREATE OR REPLACE FUNCTION {S}.pause_queue(queue text, reason text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    INSERT INTO {S}.queue_pauses AS p (queue, reason) VALUES (pause_queue.queue, pause_queue.reason)
    ON CONFLICT (queue) DO NOTHING;
    IF NOT FOUND THEN
        RETURN false;  -- paused already (its reason and time kept)
    END IF;
    -- its workers heartbeat now, and give back what they hold and have not started
    PERFORM pg_notify('control_plane_messages', 'cancel:' || pause_queue.queue);
    RETURN true;
END
$$
"""

RESUME_QUEUE = f"""
CREATE OR REPLACE FUNCTION {S}.resume_queue(queue text) RETURNS boolean
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    DELETE FROM {S}.queue_pauses AS p WHERE p.queue = resume_queue.queue;
    IF NOT FOUND THEN
        RETURN false;  -- not paused
    END IF;
    PERFORM pg_notify('control_plane_messages', resume_queue.queue);  -- its workers claim now
    RETURN true;
END
$$
"""

COMMENTS = {
    "pause_queue(text, text)": "Pause a queue: its workers take none of its jobs, and give back those they hold "
    "and have not started; running ones go on. False if it was paused already.",
    "resume_queue(text)": "Resume a paused queue: its workers take its jobs again. False if it was not paused.",
}


def upgrade() -> None:
    op.create_table(
        "queue_pauses",
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("queue", name="pk_queue_pauses"),
        # a queue's name as an actor may have it (a pause of 'billing ' from SQL holds back nothing)
        sa.CheckConstraint(QUEUE_NAME_CHECK, name="ck_queue_pauses_queue_name"),
        schema=S,
    )
    # Whoever reads the messages reads the pauses (claims, `controlplane stats`, the metrics);
    # whoever may delete them (workers, operators who cancel) may pause.
    grant_by_privileges_on_messages(f"{S}.queue_pauses", [("SELECT", "SELECT"), ("DELETE", "SELECT, INSERT, DELETE")])
    create_functions([PAUSE_QUEUE, RESUME_QUEUE], COMMENTS)


def downgrade() -> None:
    drop_functions(list(COMMENTS))
    op.drop_table("queue_pauses", schema=S)
