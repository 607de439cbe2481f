"""Step 2, roles: ``p_<id>_owner`` (NOLOGIN) and ``p_<id>_app`` (LOGIN, connection limit).

Both roles, their ownership markers and the control role's membership of the
owner are created in one transaction: a crash leaves all or nothing. A role
that exists without our marker belongs to someone else: a conflict, never
touched. The app role's password is set as a SCRAM verifier computed
client-side (libpq's ``PQencryptPasswordConn``), never as plaintext DDL; it
is set again when the role is found, so roles an earlier run of the project
id left behind get this run's password.
"""

from __future__ import annotations

from typing import Any

import psycopg2.errors
from psycopg2 import sql
from psycopg2.extensions import encrypt_password

from models import project_queries as q
from tasks.errors import Conflict, TransientError
from tasks.provision import payload as p
from tasks.provision import secrets
from tasks.provision.state import ProjectState, control_transaction, hold_current_run, stays_open
from tasks.provision.target import marker, role_owner_marker, session, translated
from tasks.settings import Settings


def _ensure_role(cur: Any, role: str, project_id: str, create: sql.Composable) -> bool:
    exists, comment = role_owner_marker(cur, role)
    if exists:
        if comment != marker(project_id):
            raise Conflict(f"role {role} already exists and does not belong to project {project_id!r}")
        return False
    try:
        cur.execute("SAVEPOINT create_role")
        cur.execute(create)
        cur.execute("RELEASE SAVEPOINT create_role")
    except (psycopg2.errors.DuplicateObject, psycopg2.errors.UniqueViolation):
        # Created concurrently (a CREATE ROLE that waited for another's commit fails on the
        # catalog's unique index, 23505): it is ours only if its marker says so.
        cur.execute("ROLLBACK TO SAVEPOINT create_role")
        return _ensure_role(cur, role, project_id, create)
    cur.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(sql.Identifier(role), sql.Literal(marker(project_id))))
    return True


def ensure_roles(settings: Settings, state: ProjectState) -> dict[str, object]:
    """Create the project's roles if they are missing; idempotent."""
    owner, app = p.owner_role(state.payload), p.app_role(state.payload)
    if state.secret_nonce is None:
        raise Conflict(f"project {state.project_id!r}: its secrets were already read or expired")
    pepper = secrets.pepper(settings)
    password = secrets.database_password(pepper, state.project_id, state.secret_nonce)
    # One delivery of this step at a time per project (see ensure_schema): a second waits, then finds
    # the roles and their markers. The lock is on the control plane's database, which no tenant can
    # connect to (migration 0009), not on the tenant server: there any tenant may take advisory locks
    # and read every one held in the cluster (pg_locks needs no privilege), so the key a roles step
    # held was a key a tenant could take before the step ran again (a retry, a redelivery, the next
    # run of the project id) and hold up the project for good. (Its key is still derived under the
    # pepper, in case that database is open to PUBLIC.)
    with control_transaction() as control:
        # (idle while the tenant server is reached: a connection and a few statements, each bounded)
        stays_open(control, 60 + 10 * settings.provision_statement_timeout_ms / 1000)
        # (waited for as long as a tenant-side lock, PROVISION_LOCK_TIMEOUT_MS, then retried: a holder
        # whose worker froze holds it until its session ends; the project's lock below as before)
        with translated("waiting for another delivery of the roles step"), control.cursor() as cur:
            cur.execute("SELECT set_config('lock_timeout', %s, true)", (str(settings.provision_lock_timeout_ms),))
            cur.execute(q.LOCK_ROLES_STEP, {"key": secrets.lock_key(pepper, "roles-step", state.project_id)})
            cur.execute("SET LOCAL lock_timeout TO DEFAULT")
        with translated("creating roles"), session(settings, autocommit=False) as conn:
            done = _create_roles(settings, state, conn, owner, app, password)
            # Committed only while this run still provisions the project, under its lock (held
            # until this commit only): a late step of an undone run rolls back, and a new claim of
            # the id waits for the commit, then its own roles step finds the roles and sets its password.
            if not hold_current_run(control, state):
                conn.rollback()
                return {"owner_role": owner, "app_role": app, "skipped": "superseded"}
            conn.commit()
    return done


def _create_roles(
    settings: Settings, state: ProjectState, conn: Any, owner: str, app: str, password: str
) -> dict[str, object]:
    """The roles' DDL in ``conn``'s transaction (the caller commits it)."""
    with conn.cursor() as cur:
        created_owner = _ensure_role(
            cur, owner, state.project_id, sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(owner))
        )
        verifier = encrypt_password(password, app, conn, "scram-sha-256")
        created_app = _ensure_role(
            cur,
            app,
            state.project_id,
            sql.SQL("CREATE ROLE {} LOGIN NOINHERIT CONNECTION LIMIT {} PASSWORD {}").format(
                sql.Identifier(app), sql.Literal(settings.app_connection_limit), sql.Literal(verifier)
            ),
        )
        if not created_app:
            # Found, with our marker: this step done before, or roles left by an earlier run of this
            # project id (a step still running while that run was undone). Either way the password
            # is this run's, as reveal_secrets derives it, and its attributes are those a new one
            # gets (a role made by an older release, or under another connection limit).
            cur.execute(
                sql.SQL("ALTER ROLE {} LOGIN NOINHERIT CONNECTION LIMIT {} PASSWORD {}").format(
                    sql.Identifier(app), sql.Literal(settings.app_connection_limit), sql.Literal(verifier)
                )
            )
        # The control role must be a member of the owner to create its database and grant on it.
        cur.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(owner)))
    return {"owner_role": owner, "app_role": app, "created": created_owner or created_app}


def drop_roles(settings: Settings, payload: p.ProvisionPayload) -> list[str]:
    """Drop the project's roles that carry its marker; others are left alone. Idempotent."""
    dropped = []
    with translated("dropping roles"), session(settings) as conn, conn.cursor() as cur:
        for role in (p.app_role(payload), p.owner_role(payload)):
            exists, comment = role_owner_marker(cur, role)
            if exists and comment == marker(payload.project_id):
                try:
                    cur.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
                except psycopg2.errors.DependentObjectsStillExist as exc:
                    # The project's database, made by a database step still running when this
                    # compensation dropped what it found (a step delivered again, racing it):
                    # the next attempt drops the database first, then the roles.
                    raise TransientError(
                        f"dropping roles: {role} still owns objects (a step may have been running): retried"
                    ) from exc
                dropped.append(role)
    return dropped
