"""The broker's hot statements as server-side prepared statements.

``ENQUEUE``, ``CLAIM`` and ``SETTLE`` are long CTE statements: PostgreSQL spent
more time planning them (0.3-1.2 ms each) than running them. Prepared once per
connection with ``PREPARE``, they are planned a few times and then run from
a cached generic plan.

psycopg2 has no protocol-level prepared statements, so this is SQL-level
``PREPARE name AS ...`` / ``EXECUTE name (...)``: the statement text keeps its
``%(name)s`` placeholders (and their ``::type`` casts), which are numbered
``$1, $2, ...`` for ``PREPARE``; ``EXECUTE`` passes the same parameters,
quoted by psycopg2 as before, with the same casts.

Only autocommit connections the broker owns use them (its pool and its
consumers): a caller's connection (``enqueue_in``) is in the caller's
transaction, where a failed ``EXECUTE`` would abort it. A statement that
vanished (``DISCARD ALL`` from a pooler, a connection swapped under us by
PgBouncer's transaction pooling) is detected by its error and that connection
falls back to plain statements. ``CONTROLPLANE_PREPARED_STATEMENTS=off``
turns them off everywhere.

A statement's name ends with a hash of its text (``control_plane_claim_1_``
and 8 hex digits): two releases whose statements differ never run each
other's under one name when a pooler lets them share a server session.
"""

from __future__ import annotations

import hashlib
import re
import threading
import weakref
from typing import Any

import psycopg2
import psycopg2.errors

#: ``%(name)s`` with an optional cast such as ``::uuid[]`` or ``::timestamptz``.
_PLACEHOLDER = re.compile(r"%\((\w+)\)s((?:::[a-z_]+(?:\[\])?)?)")

#: What each connection has prepared; a connection that lost a statement maps to None (plain from then on).
_prepared: weakref.WeakKeyDictionary[Any, set[str] | None] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class Statement:
    """One statement, runnable plain or prepared on a connection."""

    def __init__(self, name: str, sql: str) -> None:
        order: list[str] = []
        casts: dict[str, str] = {}

        def number(match: re.Match[str]) -> str:
            param, cast = match.group(1), match.group(2)
            if param not in order:
                order.append(param)
            if cast and param not in casts:
                casts[param] = cast
            return f"${order.index(param) + 1}{cast}"

        self.name = f"{name}_{hashlib.sha1(sql.encode(), usedforsecurity=False).hexdigest()[:8]}"
        self.sql = sql
        self.prepare_sql = f"PREPARE {self.name} AS {_PLACEHOLDER.sub(number, sql).replace('%%', '%')}"
        self.params = tuple(order)
        args = ", ".join(f"%({param})s{casts.get(param, '')}" for param in order)
        self.execute_sql = f"EXECUTE {self.name} ({args})"

    def execute(self, cur: Any, params: dict[str, Any], *, prepare: bool = True) -> None:
        """Run the statement on ``cur``: prepared when allowed and possible, else plain."""
        conn = cur.connection
        if not prepare or not conn.autocommit:
            cur.execute(self.sql, params)
            return
        with _lock:
            done = _prepared.setdefault(conn, set())
        if done is None:
            cur.execute(self.sql, params)
            return
        if self.name not in done:
            try:
                cur.execute(self.prepare_sql)
            except psycopg2.errors.DuplicatePreparedStatement:
                # Another client prepared it on this server session: a pooler shares
                # sessions, and its text may be another version's. Plain from now on.
                with _lock:
                    _prepared[conn] = None
                cur.execute(self.sql, params)
                return
            done.add(self.name)
        try:
            cur.execute(self.execute_sql, params)
        except psycopg2.errors.InvalidSqlStatementName:
            # The session lost it (DISCARD ALL, a transaction pooler): plain statements from now on.
            with _lock:
                _prepared[conn] = None
            cur.execute(self.sql, params)


__all__ = ["Statement"]
