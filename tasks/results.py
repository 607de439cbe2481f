"""A PostgreSQL results backend, so ``message.get_result(block=True)`` works.

Results live in ``control_plane.results`` with an expiry; they are written on
pooled connections (the Postgres broker's, or ``tasks.connection``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import psycopg2
from dramatiq.results import ResultBackend
from dramatiq.results.backend import Missing

from models import queries
from tasks.broker import PostgresBroker


class PostgresBackend(ResultBackend):
    """Stores results next to the messages, in the same database.

    ``source`` is the Postgres broker, or any callable giving a pooled autocommit
    connection as a context manager (``tasks.connection``, whichever broker runs).
    """

    def __init__(
        self, source: PostgresBroker | Callable[[], AbstractContextManager[Any]], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self._connection = source.connection if isinstance(source, PostgresBroker) else source

    def _get(self, message_key: str) -> Any:
        with self._connection() as conn, conn.cursor() as cur:
            cur.execute(queries.RESULT_GET, {"key": message_key})
            row = cur.fetchone()
        if row is None:
            return Missing
        return self.encoder.decode(bytes(row[0]))

    def _store(self, message_key: str, result: Any, ttl: int) -> None:
        value = self.encoder.encode(result)
        with self._connection() as conn, conn.cursor() as cur:
            cur.execute(
                queries.RESULT_STORE,
                {"key": message_key, "value": psycopg2.Binary(value), "ttl_ms": ttl},
            )

