"""``control_plane.deployment``: facts every process of a deployment must agree on.

Its first row is the fingerprint of the API key pepper (an HMAC of a fixed text under
it, from which the pepper cannot be had). Without ``API_KEY_PEPPER`` each process
kept its pepper in a file under its ``CONTROLPLANE_HOME``, ``./.controlplane`` of
the directory it started in: a process started elsewhere made a pepper of its own
without a word, derived passwords and keys that matched nothing, and
``reveal_secrets`` then erased the project's nonce, losing the real secrets for good.
Every use of the pepper now checks it against the deployment's first one.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployment",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("set_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_deployment"),
        schema="control_plane",
    )


def downgrade() -> None:
    op.drop_table("deployment", schema="control_plane")
