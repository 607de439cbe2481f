"""The PostgreSQL server tenant databases are created on: sessions, errors, ownership markers.

Every provisioning session runs with ``statement_timeout`` and ``lock_timeout``
(settings). Driver errors are translated into the error tree: what may pass
(a lost connection, a busy template, a lock or statement timeout, a
serialisation failure) is a :class:`TransientError`; anything else is a
:class:`PermanentError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg2
import psycopg2.errorcodes

from tasks import db
from tasks.errors import PermanentError, TransientError
from tasks.settings import Settings

#: SQLSTATEs worth retrying: busy objects, timeouts, lock and serialisation conflicts, shutdowns.
TRANSIENT_SQLSTATES = frozenset(
    {
        "55006",  # object_in_use: "source database template1 is being accessed by other users"
        "55P03",  # lock_not_available (lock_timeout)
        "57014",  # query_canceled (statement_timeout)
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "53300",  # too_many_connections
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up)
    }
)


def marker(project_id: str) -> str:
    """The comment that says a role belongs to a project: the ownership proof."""
    return f"controlplane:project={project_id}"


def target_url(settings: Settings) -> str:
    """The libpq URL of the tenant databases' server (default: the control plane's own)."""
    return settings.provision_database_url or db.database_url(settings)


def classify(exc: psycopg2.Error, doing: str) -> Exception:
    """The error-tree exception for a driver error raised while ``doing`` something."""
    code = getattr(exc, "pgcode", None)
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) and code is None:
        return TransientError(f"{doing}: lost the connection to PostgreSQL ({first_line})")
    if code in TRANSIENT_SQLSTATES or (code == "XX000" and "tuple concurrently updated" in first_line):
        # (XX000 "tuple concurrently updated": two sessions changed one catalog row at once,
        # as the same step delivered twice does with CREATE SCHEMA IF NOT EXISTS or a GRANT)
        return TransientError(f"{doing}: {first_line} (SQLSTATE {code})")
    return PermanentError(f"{doing}: {first_line} (SQLSTATE {code})")


@contextlib.contextmanager
def translated(doing: str) -> Iterator[None]:
    """Re-raise driver errors inside the block as Transient/PermanentError naming ``doing``."""
    try:
        yield
    except psycopg2.Error as exc:
        raise classify(exc, doing) from exc


@contextlib.contextmanager
def session(settings: Settings, database: str | None = None, *, autocommit: bool = True) -> Iterator[Any]:
    """A provisioning session on the target server (optionally in ``database``), with timeouts."""
    # libpq takes the database beside the URL: no URL is rebuilt (nor SQLAlchemy imported) per step.
    other_database = {} if database is None else {"dbname": database}
    url = target_url(settings)
    timeouts = (f"-c statement_timeout={settings.provision_statement_timeout_ms} "
                f"-c lock_timeout={settings.provision_lock_timeout_ms}")
    with translated(f"connecting to {database or 'the target server'}"):
        # Keywords given here replace the URL's own: keep what the URL sets (its options, such as
        # "-c role=provisioner", a connect_timeout, an application_name) and add the timeouts.
        given = psycopg2.extensions.parse_dsn(url)
        conn = psycopg2.connect(
            url,
            **other_database,
            **db.gss_off_unless_asked(url),
            application_name=given.get("application_name") or "controlplane-provision",
            connect_timeout=given.get("connect_timeout") or 10,
            options=f"{given.get('options', '')} {timeouts}".strip(),
        )
    conn.autocommit = autocommit
    try:
        yield conn
        if not autocommit:
            conn.commit()
    finally:
        conn.close()


def role_owner_marker(cur: Any, role: str) -> tuple[bool, str | None]:
    """Whether ``role`` exists, and its comment."""
    cur.execute(
        "SELECT shobj_description(oid, 'pg_authid') FROM pg_roles WHERE rolname = %s",
        (role,),
    )
    row = cur.fetchone()
    return (row is not None, row[0] if row else None)


def database_owner(cur: Any, database: str) -> tuple[bool, str | None, str | None]:
    """Whether ``database`` exists, its owner role, and that role's comment."""
    cur.execute(
        "SELECT r.rolname, shobj_description(r.oid, 'pg_authid') FROM pg_database d "
        "JOIN pg_roles r ON r.oid = d.datdba WHERE d.datname = %s",
        (database,),
    )
    row = cur.fetchone()
    return (row is not None, row[0] if row else None, row[1] if row else None)
