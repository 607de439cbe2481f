"""provision_project: provision a tenant project (roles, database, schema, services, API keys).

``dramatiq tasks tasks.provision`` runs its workers; ``provision_project.send(payload)`` starts one.
"""

from __future__ import annotations

from tasks.provision.keys import reveal_secrets
from tasks.provision.workflow import (
    STEPS,
    compensate_project,
    forget_expired_secrets,
    provision_project,
    reconcile_entry_jobs,
    run_step,
    sweep_orphans,
)

__all__ = [
    "STEPS",
    "compensate_project",
    "forget_expired_secrets",
    "provision_project",
    "reconcile_entry_jobs",
    "reveal_secrets",
    "run_step",
    "sweep_orphans",
]
