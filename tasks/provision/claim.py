"""Step 1, claim: record the project, or recognise it; a different payload is a conflict."""

from __future__ import annotations

import uuid
from typing import Any

from psycopg2.extras import Json

from models import project_queries as q
from tasks.errors import Conflict
from tasks.provision.payload import ProvisionPayload, payload_hash
from tasks.provision.state import ProjectState, from_row, load
from tasks.settings import Settings


def claim(conn: Any, payload: ProvisionPayload, job_id: str, settings: Settings) -> tuple[ProjectState, bool]:
    """Insert-or-compare the project under its advisory lock, inside the caller's transaction.

    Returns the state and whether this call created it. The same payload again
    resumes (nothing new is created) and, while the project is not yet active,
    ``job_id`` joins the jobs told its outcome; a different payload for the same
    project_id raises :class:`Conflict`.
    """
    digest = payload_hash(payload)
    with conn.cursor() as cur:
        cur.execute(q.LOCK_PROJECT, {"project_id": payload.project_id})
        cur.execute(q.GET_PROJECT, {"project_id": payload.project_id})
        row = cur.fetchone()
        if row is not None:
            if row[3] != digest:
                raise Conflict(
                    f"project {payload.project_id!r} already exists with a different payload; "
                    "a project id can be provisioned with one payload only"
                )
            if row[4] == "needs_operator":
                raise Conflict(
                    f"project {payload.project_id!r} needs an operator: an earlier cleanup failed ({row[9]})"
                )
            if row[4] in ("provisioning", "compensating"):
                # A later job of the same payload: it hears the outcome with the first.
                cur.execute(q.ADD_WAITING_JOB, {"project_id": payload.project_id, "job_id": job_id})
            return from_row(row), False
        # The run is the claiming job's id, which every step message and compensation carries, and
        # which tells a late message of an undone run from the next run's. A job an operator retried
        # (docs/provisioning.md: retry the entry job) keeps its id, which may be the run of an earlier
        # run of this project id, undone: then the run is a new id, and the job hears the outcome
        # as a waiting caller. (Reused, a redelivered compensation of the undone run undid the new
        # one, and its late roles or api_keys step wrote its own secrets over the new run's.)
        run, waiting = job_id, []
        cur.execute(q.ENTRY_JOB_RETRIED, {"job_id": job_id})
        retried = cur.fetchone()
        if retried is not None and retried[0]:
            run, waiting = str(uuid.uuid4()), [job_id]
        cur.execute(
            q.INSERT_PROJECT,
            {
                "project_id": payload.project_id,
                "tenant_id": payload.tenant_id,
                "payload": Json(payload.to_json()),
                "payload_hash": digest,
                "region": payload.region,
                "owner_id": payload.owner_id,
                "organization_id": payload.organization_id,
                "secrets_ttl": settings.secrets_ttl_seconds,
                "job_id": run,
                "waiting": waiting,
            },
        )
    state = load(conn, payload.project_id)
    assert state is not None
    return state, True
