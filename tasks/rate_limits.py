"""Dramatiq's rate limiters on PostgreSQL: no Redis, no Memcached.

:class:`PostgresRateLimiterBackend` implements ``dramatiq.rate_limits.RateLimiterBackend``
on ``control_plane.rate_limits (key, value, expires_at)``, so Dramatiq's own
``ConcurrentRateLimiter`` (a distributed semaphore or mutex),
``WindowRateLimiter`` and ``Barrier`` (hence ``GroupCallbacks``, for
``group(...).add_completion_callback(...)``) hold across processes and
machines::

    from dramatiq.rate_limits import ConcurrentRateLimiter
    import tasks

    MUTEX = ConcurrentRateLimiter(tasks.rate_limiter_backend, "invoices", limit=1)

    @dramatiq.actor(actor_name="billing.invoice", queue_name="billing")
    def invoice(customer_id: int) -> None:
        with MUTEX.acquire():        # raises RateLimitExceeded: the job is retried with backoff
            ...

Every operation is one atomic statement (an upsert that locks the key's row;
see ``models.queries``): a row past its ``expires_at`` counts as absent, as a
Redis key past its TTL. ``incr_and_sum`` (window limiters) adds a transaction-
scoped advisory lock on the window, in the same round trip. Blocking barrier
waits use LISTEN/NOTIFY.
"""

from __future__ import annotations

import contextlib
import re
import select
import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from dramatiq.rate_limits import BucketRateLimiter, RateLimiterBackend

from models import queries
from tasks import db

#: How often (at most) a process deletes expired counters, in seconds.
SWEEP_INTERVAL = 60.0

_WINDOW_SUFFIX = re.compile(r"@\d+$")
#: A ``BucketRateLimiter``'s key: ``<name>@<start of its bucket>`` in epoch milliseconds.
_BUCKET_KEY = re.compile(r"^(.*)@(\d{13,})$")


#: The code of Dramatiq's ``BucketRateLimiter._acquire``, which names its buckets.
_BUCKET_ACQUIRE = BucketRateLimiter._acquire.__code__


def _by_the_databases_clock(key: str, ttl: int, sql: str, bucket_sql: str, params: dict[str, Any]) -> str:
    """The statement for ``key``: a ``BucketRateLimiter``'s (``<name>@<ms>``, a multiple of its
    bucket, ``ttl``, by this host's clock) is re-named by the database's clock (``params`` gets the
    name and the bucket), so that hosts whose clocks disagree count in one bucket.

    Only when ``BucketRateLimiter._acquire`` called (``add`` or ``incr``, which call this): a
    ``ConcurrentRateLimiter`` whose key looked the same had its slot taken under the database's
    bucket and given back (``decr``) under its own key, never."""
    match = _BUCKET_KEY.match(key)
    if match is None or sys._getframe(2).f_code is not _BUCKET_ACQUIRE:
        return sql
    if int(ttl) != ttl or int(match.group(2)) % int(ttl):
        return sql
    params.update(bucket_name=match.group(1), bucket_ms=int(ttl))
    return bucket_sql


def _positive(ttl: int) -> int:
    """A limiter's ``ttl``, refused unless positive: a counter that expires at once (Redis refuses
    such an expiry) let a mutex of ``limit=1`` admit every acquirer."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
        raise ValueError(f"a rate limiter's ttl must be a positive number of milliseconds, not {ttl!r}")
    return ttl


class PostgresRateLimiterBackend(RateLimiterBackend):
    """A rate limiter backend on ``control_plane.rate_limits``.

    Parameters:
      connection: gives a pooled autocommit connection to the control plane's
        database as a context manager (``tasks.connection``; a broker's
        ``connection`` method).
      url: where blocking ``wait`` calls open their own LISTEN connection
        (default: the URL of ``tasks``' database).
      barriers: this backend makes group barriers (``GroupCallbacks``'): ``add``
        joins the transaction of ``tasks.enqueue_in``, as the group's messages do.
        Off for everything else: a ``ConcurrentRateLimiter`` acquires with ``add``,
        and a slot taken inside a caller's transaction would be invisible to its
        release (on another connection) and stay taken for the limiter's ``ttl``.
    """

    def __init__(
        self,
        connection: Callable[[], AbstractContextManager[Any]],
        *,
        url: Callable[[], str] | None = None,
        barriers: bool = False,
    ) -> None:
        self._connection = connection
        self._url = url
        self._barriers = barriers
        self._next_sweep = 0.0
        self._sweep_lock = threading.Lock()

    def _execute(self, sql: str, params: dict[str, Any]) -> bool:
        """Run one statement; True when it returned a row (the operation was applied)."""
        self._maybe_sweep()
        with self._connection() as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone() is not None

    def add(self, key: str, value: int, ttl: int) -> bool:
        """Set ``key`` to ``value`` for ``ttl`` ms, unless it exists; True when it did.

        A group's barrier is made with ``add`` when the group is sent: on a ``barriers``
        backend, inside ``tasks.enqueue_in(conn)`` it is written in that transaction, with
        the group's messages, so that a rollback leaves no barrier behind either.
        """
        import tasks
        from tasks.broker import PostgresBroker, joined_connection

        params: dict[str, Any] = {"key": key, "value": value, "ttl_ms": _positive(ttl)}
        sql = _by_the_databases_clock(key, ttl, queries.RATE_LIMIT_ADD, queries.RATE_LIMIT_ADD_BUCKET, params)
        # With RabbitMQ the group's messages are published at once: the barrier must be too.
        joins = self._barriers and isinstance(tasks.broker, PostgresBroker)
        caller = joined_connection() if joins else None
        if caller is None:
            return self._execute(sql, params)
        with caller.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone() is not None

    def incr(self, key: str, amount: int, maximum: int, ttl: int) -> bool:
        """Add ``amount`` to ``key`` (absent: 0) unless it would pass ``maximum``; True when it did.

        A ``BucketRateLimiter``'s bucket (``add``, then ``incr``) is the database's clock's."""
        params: dict[str, Any] = {"key": key, "amount": amount, "minimum": None, "maximum": maximum,
                                  "ttl_ms": _positive(ttl)}  # fmt: skip
        sql = _by_the_databases_clock(key, ttl, queries.RATE_LIMIT_ADJUST, queries.RATE_LIMIT_ADJUST_BUCKET, params)
        return self._execute(sql, params)

    def decr(self, key: str, amount: int, minimum: int, ttl: int) -> bool:
        """Take ``amount`` from ``key`` (absent: 0) unless it would go below ``minimum``; True when it did."""
        return self._execute(
            queries.RATE_LIMIT_ADJUST,
            {"key": key, "amount": -amount, "minimum": minimum, "maximum": None, "ttl_ms": _positive(ttl)},
        )

    def incr_and_sum(self, key: str, keys: Callable[[], list[str]], amount: int, maximum: int, ttl: int) -> bool:
        """Add ``amount`` to ``key`` unless the sum over ``keys()`` would pass ``maximum``; True when it did.

        A ``WindowRateLimiter``'s (``key`` is ``name@<epoch second>``, ``keys()`` that second
        and the ones before it) counts by the database's clock, not this host's.
        """
        group = _WINDOW_SUFFIX.sub("", key)
        listed = list(keys())
        window = None
        # Dramatiq reads the time twice (``key``, then ``keys()``), so the two can be a second
        # apart: the window is recognised by ``keys()`` alone.
        if group != key and listed and _WINDOW_SUFFIX.sub("", listed[0]) == group:
            second = int(listed[0][len(group) + 1:])
            if listed == [f"{group}@{second - i}" for i in range(len(listed))]:
                window = len(listed)
        return self._execute(
            queries.RATE_LIMIT_INCR_AND_SUM,
            {"group": group, "key": key, "keys": listed, "window": window, "amount": amount, "maximum": maximum,
             "ttl_ms": _positive(ttl)},
        )

    def wait(self, key: str, timeout: int | None) -> bool:
        """Block until an event is published on ``key`` (or was, within its TTL), at most ``timeout`` ms."""
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        conn = db.connect(self._database_url(), autocommit=True, application_name="controlplane-barrier")
        try:
            with conn.cursor() as cur:
                cur.execute(f"LISTEN {queries.RATE_LIMIT_CHANNEL}")
                cur.execute(queries.RATE_LIMIT_EVENT, {"key": key})
                if cur.fetchone() is not None:
                    return True
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                # Wake at least every few seconds to look again: a NOTIFY is lost if
                # this connection was being re-established when it was sent.
                readable, _, _ = select.select([conn], [], [], 5.0 if left is None else min(left, 5.0))
                if readable:
                    conn.poll()
                if any(n.payload == key for n in conn.notifies):
                    return True
                conn.notifies.clear()
                with conn.cursor() as cur:
                    cur.execute(queries.RATE_LIMIT_EVENT, {"key": key})
                    if cur.fetchone() is not None:
                        return True
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def wait_notify(self, key: str, ttl: int) -> None:
        """Publish an event on ``key``, kept for ``ttl`` ms, and wake whoever waits on it."""
        self._execute(queries.RATE_LIMIT_NOTIFY, {"key": key, "ttl_ms": _positive(ttl)})

    def sweep(self) -> int:
        """Delete expired counters now; returns how many went."""
        with self._connection() as conn, conn.cursor() as cur:
            cur.execute(queries.RATE_LIMIT_SWEEP)
            return int(cur.rowcount)

    def _maybe_sweep(self) -> None:
        # Window limiters write one row per second: delete the dead ones now and then.
        now = time.monotonic()
        if now < self._next_sweep or not self._sweep_lock.acquire(blocking=False):
            return
        try:
            self._next_sweep = now + SWEEP_INTERVAL
            if self.sweep() >= queries.RATE_LIMIT_SWEEP_BATCH:
                # More expired than one batch (many window keys): sweep again on the next call
                # rather than a minute later, or they would pile up faster than they go.
                self._next_sweep = now
        finally:
            self._sweep_lock.release()

    def _database_url(self) -> str:
        if self._url is not None:
            return self._url()
        import tasks

        return tasks.database_url()


__all__ = ["PostgresRateLimiterBackend"]
