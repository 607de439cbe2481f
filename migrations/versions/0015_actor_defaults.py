"""``control_plane.actor_defaults``: each actor's priority and attempts, as its workers declare it.

A job's priority (the claim's order) and ``max_attempts`` (the reaper's limit, what an
operator reads) are fixed when it is sent, from the sender's own declaration of the
actor. A sender that sends by name an actor it does not declare (``controlplane send
ACTOR --queue Q``, a schedule naming an actor, a web app sending a ``Message``) gave the
job priority 0, the highest, and the default attempts. Dramatiq reads both from the
worker's actor. Workers now record their actors' settings here when they start
consuming, and a send that does not know the actor takes them from here. Roles that
send or consume (privileges on ``control_plane.messages``) are granted it.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from migrations import grant_by_privileges_on_messages

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "actor_defaults",
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("declared_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("actor", name="pk_actor_defaults"),
        schema="control_plane",
    )
    # Roles granted the other tables (a sender's, a worker's) get this one as they use it:
    # without it, every send failed once PostgreSQL reused its prepared plan (the sixth).
    # (senders: INSERT on the messages; workers: INSERT and UPDATE)
    grant_by_privileges_on_messages(
        "control_plane.actor_defaults", [("INSERT", "SELECT"), ("INSERT UPDATE", "SELECT, INSERT, UPDATE")]
    )


def downgrade() -> None:
    op.drop_table("actor_defaults", schema="control_plane")
