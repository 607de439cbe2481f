"""Which PostgreSQL the benchmarks measure on.

``DATABASE_URL``, if set, is the admin URL (any database on the server to
measure on). Unset, the server at 127.0.0.1:5432 when one answers there (the
machine whose numbers ``docs/performance.md`` reports), else the project's
embedded PostgreSQL, started as the rest of the project starts it
(:func:`tasks.db.embedded_url`, under ``CONTROLPLANE_HOME``), so that the
harness runs on a machine without a PostgreSQL server. It keeps running after
the run, as the project's does: ``CONTROLPLANE_HOME=<home> .venv/bin/controlplane
db stop`` stops it (the note printed when it starts gives the command).
"""

from __future__ import annotations

import functools
import os
import socket
import sys

import psycopg2

from tasks.db import loggable_error
from tasks.redaction import redact

#: The server the documented runs used: PostgreSQL on the same box, over TCP.
LOCAL_URL = "postgresql://root@127.0.0.1:5432/postgres"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@functools.cache
def admin_url() -> str:
    """The admin URL: ``DATABASE_URL``, else the local server if it answers, else the embedded one."""
    configured = os.environ.get("DATABASE_URL")
    if configured:
        return configured
    if _answers("127.0.0.1", 5432):
        return LOCAL_URL
    from tasks.db import embedded_url
    from tasks.settings import Settings

    home = Settings.from_env().home
    print(
        f"note: DATABASE_URL is unset and no server answers at 127.0.0.1:5432: measuring on the "
        f"embedded PostgreSQL in {home / 'pgdata'}, left running after the run "
        f"(`CONTROLPLANE_HOME={home} .venv/bin/controlplane db stop` stops it)",
        file=sys.stderr,
        flush=True,
    )
    return embedded_url(home)


def unusable(url: str, *, roles: bool = False) -> str | None:
    """Why the benchmarks cannot use the server at ``url`` (it does not answer, or its role may
    not create databases, or, with ``roles``, the provision phase's roles), or None. Said
    before anything is measured, not once per system."""
    why = None
    try:
        conn = psycopg2.connect(url, connect_timeout=10, application_name="bench-check")
    except psycopg2.Error as exc:
        why = f"cannot connect to PostgreSQL at {url}: {loggable_error(exc)}"
    else:
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT rolsuper OR rolcreatedb, rolsuper OR rolcreaterole"
                    " FROM pg_roles WHERE rolname = current_user"
                )
                createdb, createrole = cur.fetchone() or (False, False)
        finally:
            conn.close()
        if not createdb:
            why = f"the role of {url} may not create databases, and every phase needs its own"
        elif roles and not createrole:
            why = f"the role of {url} may not create roles, and the provision phase creates each project's"
    if why is not None and url == LOCAL_URL and not os.environ.get("DATABASE_URL"):
        why += " (a server answers at 127.0.0.1:5432, so the embedded PostgreSQL was not used)"
    return None if why is None else redact(why)
