"""``control_plane.workers`` counts the claimed messages once, not once per worker.

Since 0011 its ``in_flight`` column read the claimed messages (``ix_messages_lease``)
for each worker row, keeping that worker's: every claimed message read once per
worker, so ``controlplane workers`` grew with workers times messages in flight
(1,000 workers holding 64 each: 2.3 s; docs/reliability.md, twenty-first session).
Now the claimed messages are counted by worker in one pass and joined to the
heartbeats.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

S = "control_plane"


def upgrade() -> None:
    op.execute(f"""
        CREATE OR REPLACE VIEW {S}.workers AS
        SELECT w.id, w.hostname, w.pid, w.queues, w.started_at, w.heartbeat_at,
               now() - w.heartbeat_at AS silent_for,
               coalesce(c.in_flight, 0) AS in_flight
        FROM {S}.worker_heartbeats w
        LEFT JOIN (SELECT m.worker, count(*) AS in_flight FROM {S}.messages m
                   WHERE m.claim_token IS NOT NULL GROUP BY m.worker) AS c ON c.worker = w.id
        """)


def downgrade() -> None:
    op.execute(f"""
        CREATE OR REPLACE VIEW {S}.workers AS
        SELECT w.id, w.hostname, w.pid, w.queues, w.started_at, w.heartbeat_at,
               now() - w.heartbeat_at AS silent_for,
               (SELECT count(*) FROM {S}.messages m WHERE m.claim_token IS NOT NULL AND m.worker = w.id) AS in_flight
        FROM {S}.worker_heartbeats w
        """)
