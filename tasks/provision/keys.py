"""Step 6, API keys: one row per slot, only a keyed hash and a display hint; and the one-time reveal."""

from __future__ import annotations

from typing import Any

from models import project_queries as q
from tasks.errors import ConfigurationError, Conflict, PermanentError
from tasks.provision import apikeys, secrets
from tasks.provision import payload as p
from tasks.provision.state import ProjectState, control_transaction, hold_current_run
from tasks.settings import Settings


def ensure_api_keys(settings: Settings, state: ProjectState) -> dict[str, object]:
    """Store the hashes of the project's ``api_key_count`` keys; idempotent (unique per slot)."""
    payload = state.payload
    if state.secret_nonce is None:
        raise Conflict(f"project {state.project_id!r}: its secrets were already read or expired")
    key = secrets.pepper(settings)
    with control_transaction() as conn, conn.cursor() as cur:
        if not hold_current_run(conn, state):
            return {"skipped": "superseded"}  # a late step of an undone run: the keys are another run's
        for slot in range(1, payload.api_key_count + 1):
            plaintext = secrets.api_key(key, payload.project_id, payload.api_key_prefix, slot, state.secret_nonce)
            cur.execute(
                q.INSERT_API_KEY,
                {
                    "project_id": payload.project_id,
                    "slot": slot,
                    "key_hash": apikeys.hash_key(plaintext, key),
                    "hint": apikeys.hint(plaintext),
                },
            )
    return {"api_keys": payload.api_key_count}


def list_api_keys(conn: Any, project_id: str) -> list[dict[str, Any]]:
    """The stored keys: slot, hint, created_at, revoked_at (never a key)."""
    with conn.cursor() as cur:
        cur.execute(q.LIST_API_KEYS, {"project_id": project_id})
        return [
            {"slot": slot, "hint": hint, "created_at": created.isoformat(),
             "revoked_at": revoked.isoformat() if revoked else None}
            for slot, hint, created, revoked in cur.fetchall()
        ]


def revoke_api_keys(conn: Any, project_id: str) -> None:
    with conn.cursor() as cur:
        cur.execute(q.REVOKE_API_KEYS, {"project_id": project_id})


def reveal_secrets(settings: Settings, project_id: str) -> dict[str, object]:
    """The project's API keys and app role password, exactly once; then they are gone.

    Raises PermanentError when the project does not exist, is not active yet, or
    its secrets were already read or have expired; ``ConfigurationError`` when this process's
    pepper is not the deployment's, before the secrets are taken (they would be wrong ones).
    """
    key = secrets.pepper(settings, record=False)
    with control_transaction() as conn, conn.cursor() as cur:
        cur.execute(q.GET_PROJECT, {"project_id": project_id})
        row = cur.fetchone()
        if row is None:
            raise PermanentError(f"no project {project_id!r}")
        if row[4] != "active":
            raise PermanentError(f"project {project_id!r} is {row[4]}, not active: nothing to reveal yet")
        cur.execute(q.TAKE_SECRET_NONCE, {"project_id": project_id})
        taken = cur.fetchone()
        if taken is None:
            raise PermanentError(f"the secrets of project {project_id!r} were already read, or expired unread")
        nonce, fresh, _, raw_payload = taken
        if fresh:
            payload = p.validate(raw_payload)
            nonce = bytes(nonce)
            keys = [
                secrets.api_key(key, project_id, payload.api_key_prefix, slot, nonce)
                for slot in range(1, payload.api_key_count + 1)
            ]
            # Before the nonce goes: what this process derives must be what the project was given.
            cur.execute(q.FIRST_KEY_HASH, {"project_id": project_id})
            stored = cur.fetchone()
            if stored is None or stored[0] != apikeys.hash_key(keys[0], key):
                raise ConfigurationError(
                    f"the keys this process derives for project {project_id!r} do not match their stored "
                    "hashes: its API key pepper is not the one the project was provisioned with; the secrets "
                    "were left in place (give this process the workers' API_KEY_PEPPER or CONTROLPLANE_HOME)"
                )
    # Raised after the commit: the nonce taken above must stay gone when it had expired.
    if not fresh:
        raise PermanentError(f"the secrets of project {project_id!r} expired unread")
    return {
        "project_id": project_id,
        "api_keys": keys,
        "database_user": p.app_role(payload),
        "database_password": secrets.database_password(key, project_id, nonce),
    }
