"""A project's workflow state, read from ``control_plane.projects``, and the control-plane transaction."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from models import project_queries as q
from tasks import db
from tasks.provision.payload import ProvisionPayload, validate


@dataclass(frozen=True)
class ProjectState:
    """What a step needs to know about its project."""

    payload: ProvisionPayload
    status: str
    steps: dict[str, Any]
    secret_nonce: bytes | None
    job_id: str | None
    #: The full result once the project is active (what the callers were told), else None.
    result: dict[str, Any] | None = None

    @property
    def project_id(self) -> str:
        return self.payload.project_id


def load(conn: Any, project_id: str) -> ProjectState | None:
    """The project's state, or None when it does not exist (never claimed, or compensated)."""
    with conn.cursor() as cur:
        cur.execute(q.GET_PROJECT, {"project_id": project_id})
        row = cur.fetchone()
    return from_row(row) if row is not None else None


def from_row(row: tuple[Any, ...]) -> ProjectState:
    """The state from a row of ``GET_PROJECT``."""
    _, _, payload, _, status, steps, nonce, job_id, result, *_ = row
    return ProjectState(
        payload=validate(payload),
        status=status,
        steps=steps or {},
        secret_nonce=bytes(nonce) if nonce is not None else None,
        job_id=str(job_id) if job_id is not None else None,
        result=result,
    )


def hold_current_run(conn: Any, state: ProjectState) -> bool:
    """Lock the project until ``conn``'s transaction ends, and say whether ``state``'s run still provisions it.

    A step whose work holds secrets of its run (the app role's password, the API keys' hashes)
    does that work inside this lock: a step of an undone run that comes late finds the project
    gone or claimed again, and a new claim of the id waits until the step's work is done.
    """
    with conn.cursor() as cur:
        cur.execute(q.LOCK_PROJECT, {"project_id": state.project_id})
        cur.execute(q.IS_CURRENT_RUN, {"project_id": state.project_id, "run": state.job_id})
        return cur.fetchone() is not None


#: Raise the session's ``idle_in_transaction_session_timeout`` (a DBA's, on the role, the database
#: or the server) to ``ms`` for this transaction, when it is set and lower; never turn it off.
_STAYS_OPEN = """
SELECT set_config('idle_in_transaction_session_timeout', %(ms)s::text, true) FROM pg_settings
WHERE name = 'idle_in_transaction_session_timeout' AND setting::bigint BETWEEN 1 AND %(ms)s - 1
"""


def stays_open(conn: Any, seconds: float) -> None:
    """Let ``conn``'s transaction sit idle up to ``seconds`` while the step reaches another server
    (a service's PUT, the tenant server's DDL, each bounded by its own timeouts): a DBA's shorter
    ``idle_in_transaction_session_timeout`` ended the session under it, and the step failed at
    every attempt. Still bounded: a worker cut off mid-step does not hold the lock for good."""
    with conn.cursor() as cur:
        cur.execute(_STAYS_OPEN, {"ms": int(seconds * 1000)})


def control_transaction() -> AbstractContextManager[Any]:
    """One transaction on the control plane's database (a pooled connection, BEGIN/COMMIT)."""
    import tasks

    return db.transaction(tasks.connection)
