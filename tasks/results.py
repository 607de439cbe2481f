"""A PostgreSQL results backend, so ``message.get_result(block=True)`` works.

Results live in ``control_plane.results`` with an expiry. A worker of the
Postgres broker stores a job's result (a failure too: :class:`FailureWithOutcome`)
in the settle statement that writes the job's outcome: when ``get_result``
answers, ``control_plane.jobs`` already shows the job ended, its unique key free.
Other results are written on pooled connections (``tasks.connection``), or with
:meth:`PostgresBackend.store_in` in a transaction of the caller's, which
delivers them at its commit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import dramatiq
import psycopg2
import psycopg2.errors
from dramatiq import Message
from dramatiq.middleware import Middleware
from dramatiq.results import ResultBackend, ResultMissing, Results, ResultTimeout
from dramatiq.results.backend import DEFAULT_TIMEOUT, Missing
from dramatiq.results.result import wrap_exception

from models import queries
from tasks import db
from tasks.broker import (
    RESULTS_LOCK_TIMEOUT,
    PgMessageProxy,
    PostgresBroker,
    joined_connection,
    result_store_params,
    result_ttl_ms,
    store_results,
)
from tasks.errors import NotSerializable
from tasks.redaction import persistable

#: The connection :meth:`PostgresBackend.store_in` stores with (None: a pooled one of its own).
_store_with: ContextVar[Any] = ContextVar("controlplane_results_store_with", default=None)
#: The claimed message whose outcome the result goes with (None: written at once).
_store_on: ContextVar[PgMessageProxy | None] = ContextVar("controlplane_results_store_on", default=None)

#: A result whose encoding is longer than this is written at once, before its job's
#: outcome, not by the settle statement: the statement also ends the other jobs of its
#: queue, which a big value would hold up (a 50 MB one did for seconds).
MAX_SETTLED_RESULT_BYTES = 256 * 1024

#: ``tasks.broker.RESULTS_LOCK_TIMEOUT`` in seconds: how long a worker thread waits for the results table.
_RESULTS_LOCK_SECONDS = int(RESULTS_LOCK_TIMEOUT.removesuffix("ms")) / 1000

#: What a look found when ``control_plane.results`` stayed locked.
_LOCKED = object()

#: A blocked ``get_result`` looks again after 5 ms, then twice as long each time, 250 ms at most
#: (and waits that long at most for the results table's lock, at each look).
FIRST_LOOK_SECONDS = 0.005
LONGEST_LOOK_SECONDS = 0.25


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

    def get_result(self, message: Message[Any], *, block: bool = False, timeout: int | None = None) -> Any:
        """``message``'s result; with ``block``, wait for it up to ``timeout`` ms (default 10 s).

        Dramatiq's loop sleeps up to 2 s between looks and gives up as soon as its next
        sleep would pass the deadline: a result stored 148 ms after the send was seen at
        the median after 148 ms more, and a 2.5 s wait could end at 1.1 s. Here the looks
        come at most 250 ms apart, and the last is at the deadline.
        """
        key = self.build_message_key(message)
        if not block:
            result = self._get(key)
            if result is Missing or result is _LOCKED:
                raise ResultMissing(self._why_missing(message, key, result is _LOCKED))
            return self.unwrap_result(result)  # type: ignore[no-untyped-call]
        deadline = time.monotonic() + (DEFAULT_TIMEOUT if timeout is None else timeout) / 1000
        pause = FIRST_LOOK_SECONDS
        while True:
            left = deadline - time.monotonic()
            result = self._get(key, min(left, LONGEST_LOOK_SECONDS))
            if result is not Missing and result is not _LOCKED:
                return self.unwrap_result(result)  # type: ignore[no-untyped-call]
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResultTimeout(self._why_missing(message, key, result is _LOCKED))
            time.sleep(min(pause, left))
            pause = min(pause * 2, LONGEST_LOOK_SECONDS)

    def forget(self, messages: Sequence[Message[Any]]) -> bool:
        """Delete the results of ``messages``, if any, in one statement: they are about to run
        again. In a transaction the send joined (``enqueue_in``), with it: a run rolled back
        forgets nothing. False when another session held ``control_plane.results`` for 250 ms:
        a send must not wait."""
        params = {"keys": [self.build_message_key(message) for message in messages]}
        caller = joined_connection()
        if caller is None or caller.autocommit:
            try:
                self._look(queries.RESULT_FORGET, params, LONGEST_LOOK_SECONDS)
            except psycopg2.errors.LockNotAvailable:
                return False
            return True
        with caller.cursor() as cur:
            wait = f"{int(LONGEST_LOOK_SECONDS * 1000)}ms"
            return db.within_lock_timeout(cur, "controlplane_forget", wait,
                                          lambda: cur.execute(queries.RESULT_FORGET, params))  # fmt: skip

    def store_soon(self, message_key: str, result: Any, ttl: int, broker: dramatiq.Broker) -> None:
        """Store a result at once, waiting ``RESULTS_LOCK_TIMEOUT`` at most for the table
        (a worker thread must not wait on an operator's lock); past it, the Postgres
        ``broker``'s writer of results apart stores it once the table is free."""
        self._write_soon((message_key, self.encoder.encode(result), _ttl(ttl)), broker)

    def _write_soon(self, stored: tuple[str, bytes, int], broker: dramatiq.Broker) -> None:
        """:meth:`store_soon` for a value encoded already."""
        try:
            self._look(queries.RESULT_STORE, result_store_params([stored]), _RESULTS_LOCK_SECONDS)
        except psycopg2.errors.LockNotAvailable:
            if not isinstance(broker, PostgresBroker):
                raise
            broker.results_writer.put([stored])

    def _why_missing(self, message: Message[Any], key: str, locked: bool = False) -> str:
        """What ``ResultMissing`` and ``ResultTimeout`` say: the message, and what its job's row
        and an expired result tell (a result that expired read like a job still running)."""
        if locked:
            return (f"{message}: control_plane.results stayed locked (another session's LOCK TABLE, "
                    "VACUUM FULL or migration): no result could be read")
        try:
            row = self._look(queries.RESULT_MISSING_WHY, {"id": message.message_id, "key": key}, LONGEST_LOOK_SECONDS)
        except (psycopg2.Error, ValueError):  # (a role that may not read jobs, an id that is no UUID, a lock)
            return str(message)
        status, ended_at, expired_at = row if row is not None else (None, None, None)
        if expired_at is not None:
            why = f"its result expired at {_utc(expired_at)} (result_ttl)"
        elif status in ("completed", "failed", "cancelled"):
            why = (f"job {message.message_id} ended {status} at {_utc(ended_at)} and no result is kept for it "
                   "(an actor without store_results=True, a result expired and pruned, a pipeline run again)")
        elif status is not None:
            why = f"job {message.message_id} is {status}"
        else:
            return str(message)
        return f"{message}: {why}"

    def _get(self, message_key: str, wait: float = LONGEST_LOOK_SECONDS) -> Any:
        """The result stored under ``message_key``; ``Missing``; or ``_LOCKED`` when another
        session held ``control_plane.results`` for ``wait`` seconds (a look waited for it
        without end, past its caller's timeout, holding a pooled connection sends waited for)."""
        try:
            row = self._look(queries.RESULT_GET, {"key": message_key}, wait)
        except psycopg2.errors.LockNotAvailable:
            return _LOCKED
        if row is None:
            return Missing
        return self.encoder.decode(bytes(row[0]))

    def _look(self, sql: str, params: dict[str, Any], wait: float) -> Any:
        """The first row of ``sql`` (None: none, or no rows returned), waiting at most ``wait``
        seconds for a lock (one round trip: the two statements are one implicit transaction,
        which the ``SET LOCAL`` lasts)."""
        with self._connection() as conn, conn.cursor() as cur:
            cur.execute(f"SET LOCAL lock_timeout = {max(1, int(wait * 1000))}; {sql}", params)
            return cur.fetchone() if cur.description is not None else None

    def _store(self, message_key: str, result: Any, ttl: int) -> None:
        value = self.encoder.encode(result)
        ttl = _ttl(ttl)
        conn = _store_with.get()
        claimed = _store_on.get()
        if conn is None and claimed is not None:
            if claimed.settled:
                if message_key in (claimed.result_written_apart, claimed.stored_result and claimed.stored_result[0]):
                    return  # stored before its nack (FailureWithOutcome): with it, or apart already
            elif len(value) <= MAX_SETTLED_RESULT_BYTES:
                claimed.stored_result = (message_key, value, ttl)
                return
            else:
                claimed.result_written_apart = message_key
                # (now, by this worker thread, which must not wait on an operator's lock on the table
                # either: it waited as long as the lock was held, a VACUUM FULL's minutes)
                self._write_soon((message_key, value, ttl), dramatiq.get_broker())
                return
        if conn is not None:
            self._write(conn, message_key, value, ttl)
            return
        with self._connection() as conn:
            self._write(conn, message_key, value, ttl)

    def store_result(self, message: Message[Any], result: Any, ttl: int) -> None:
        """Store ``message``'s return value; one JSON cannot hold is stored as a ``NotSerializable`` failure.

        Dropped silently, a caller blocked in ``get_result`` would wait out its whole timeout
        for a job that completed; it gets a ``ResultFailure`` saying why instead.
        """
        try:
            with _with_outcome(message):
                super().store_result(message, result, ttl)  # the encoding comes before any write
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            refused = NotSerializable(
                f"the return value of {message.actor_name} cannot be stored as a result: {type(exc).__name__}: {exc}"
            )
            self.store_exception(message, refused, ttl)

    def store_exception(self, message: Message[Any], exception: Exception, ttl: int) -> None:
        """Store the failure with its message redacted, as ``control_plane.jobs.last_error`` holds it."""
        wrapped = wrap_exception(exception)
        if not str(wrapped["exn"]["msg"]).strip():
            # An exception raised into the thread by its class (a time limit, an operator's cancel)
            # says nothing: the caller gets the reason last_error gives ("Cancelled: <why>").
            from tasks.middleware.jobs_mirror import describe_error

            wrapped["exn"]["msg"] = describe_error(exception, message).partition(": ")[2]
        wrapped["exn"]["msg"] = persistable(wrapped["exn"]["msg"])
        with _with_outcome(message):
            self._store(self.build_message_key(message), wrapped, ttl)

    def store_in(self, conn: Any, message: Message[Any], outcome: Any, ttl: int) -> None:
        """Store ``message``'s result, or the exception when ``outcome`` is one, with ``conn``.

        ``conn`` is a connection to the control plane's database, typically in an open
        transaction: the result then appears when that commits, and not if it rolls back.
        """
        token = _store_with.set(conn)
        try:
            if isinstance(outcome, Exception):
                self.store_exception(message, outcome, ttl)
            else:
                self.store_result(message, outcome, ttl)
        finally:
            _store_with.reset(token)

    def _write(self, conn: Any, message_key: str, value: bytes, ttl: int) -> None:
        with conn.cursor() as cur:
            store_results(cur, [(message_key, value, ttl)])


def _ttl(ttl: Any) -> int:
    """``ttl`` as the statements take it (``tasks.broker.result_ttl_ms``): one that is no number
    lives ``CONTROLPLANE_RESULT_TTL_MS``."""
    import tasks

    return result_ttl_ms(ttl, tasks.settings.result_ttl_ms)


def _utc(moment: Any) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if isinstance(moment, datetime) else "?"


@contextmanager
def _with_outcome(message: Message[Any]) -> Iterator[None]:
    """Within it, a result of ``message`` goes with its outcome if it is a claimed message not settled yet."""
    if not isinstance(message, PgMessageProxy):
        yield
        return
    token = _store_on.set(message)
    try:
        yield
    finally:
        _store_on.reset(token)


class FailureWithOutcome(Middleware):
    """Stores a failed job's exception before the Postgres broker takes its nack, not after.

    Dramatiq's ``Results`` stores it in ``after_nack``, once the broker has the outcome,
    which its settler may have written already. Stored here, the failure goes with the
    outcome, as a return value does; ``Results.after_nack`` then finds it there and
    writes nothing. (A subclass of ``Results`` would do it too, but Dramatiq's worker
    looks for ``Results`` by its exact type, and warns at every return value without it.)
    """

    def before_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        if isinstance(message, PgMessageProxy):
            for middleware in broker.middleware:
                if isinstance(middleware, Results):
                    middleware.after_nack(broker, message)
