"""A cancel's or a lost worker's result lives as the job's own result would: ``actor_defaults.result_ttl_ms``.

A result a worker stores lives the message's ``result_ttl`` option, else its actor's, else the
worker's ``CONTROLPLANE_RESULT_TTL_MS`` (Dramatiq's ``Results``). The ``Cancelled`` failure
``cancel_job`` stores (0010, and 0020's for a pipeline's caller) and the one the reaper stores
(``STORE_REAPED_RESULTS``) read the message's option only, else kept it a day: an actor declaring
``result_ttl=60_000``, or a deployment keeping results a week, got a day all the same (a caller
looking after two days found nothing, while the completed jobs' results were there).

SQL cannot see the workers' settings nor their actors: the workers now record each actor's
lifetime of results with its priority and attempts (``control_plane.actor_defaults``, 0015):
its ``result_ttl`` option, else their ``CONTROLPLANE_RESULT_TTL_MS``. ``cancel_job`` reads it
where the message has no option (a day still for an actor no worker of this release declared).
Roles that may cancel (``DELETE`` on the messages) are granted ``SELECT`` on the table.

The function is edited where it differs (as 0010 and 0020 did), not rewritten.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from migrations import grant_by_privileges_on_messages, replace_in_function

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

_INDENT = " " * 51


def _declared(actor: str) -> str:
    """SQL for the lifetime of results the workers declared for ``actor`` (an SQL expression), else a day."""
    return (f"coalesce((SELECT d.result_ttl_ms FROM control_plane.actor_defaults AS d WHERE d.actor = {actor}),\n"
            f"{_INDENT}         86400000)")  # fmt: skip


#: 0010's: the job's own Cancelled failure.
JOB_BEFORE = f"""THEN (j.options ->> 'result_ttl')::bigint
{_INDENT}ELSE 86400000 END)"""
JOB_AFTER = f"""THEN (j.options ->> 'result_ttl')::bigint
{_INDENT}ELSE {_declared("j.type")} END)"""

#: 0020's: the failure told the caller of the pipeline the job is a step of (its last message ``e``).
PIPELINE_BEFORE = f"""THEN (e #>> '{{options,result_ttl}}')::bigint
{_INDENT}ELSE 86400000 END)"""
PIPELINE_AFTER = f"""THEN (e #>> '{{options,result_ttl}}')::bigint
{_INDENT}ELSE {_declared("e ->> 'actor_name'")} END)"""


def upgrade() -> None:
    op.add_column("actor_defaults", sa.Column("result_ttl_ms", sa.BigInteger(), nullable=True), schema="control_plane")
    # cancel_job reads it as its caller: a role that may cancel a waiting job must read it too
    grant_by_privileges_on_messages("control_plane.actor_defaults", [("DELETE", "SELECT")])
    replace_in_function("cancel_job(uuid)", JOB_BEFORE, JOB_AFTER)
    replace_in_function("cancel_job(uuid)", PIPELINE_BEFORE, PIPELINE_AFTER)


def downgrade() -> None:
    replace_in_function("cancel_job(uuid)", PIPELINE_AFTER, PIPELINE_BEFORE)
    replace_in_function("cancel_job(uuid)", JOB_AFTER, JOB_BEFORE)
    op.drop_column("actor_defaults", "result_ttl_ms", schema="control_plane")
