"""The lease keeper's loop (``tasks/lease_keeper.py``), without a worker: when it keeps, and what."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from tasks.db import connect_options
from tasks.lease_keeper import Keeper, encode_options


def _keeper(lease: float, interval: float) -> Keeper:
    return Keeper({
        "CONTROLPLANE_KEEPER_URL": "postgresql://nobody@/nowhere",
        "CONTROLPLANE_KEEPER_SQL": "SELECT 1",
        "CONTROLPLANE_KEEPER_WORKER": "test:1",
        "CONTROLPLANE_KEEPER_LEASE": str(lease),
        "CONTROLPLANE_KEEPER_INTERVAL": str(interval),
        "CONTROLPLANE_KEEPER_SECONDS": "600",
        "CONTROLPLANE_KEEPER_CONNECT": encode_options(connect_options("postgresql://nobody@/nowhere")),
    })  # fmt: skip


@pytest.mark.parametrize("interval", [1, 10, 15, 20, 29])
def test_a_silent_worker_is_kept_before_its_lease_runs_out_whatever_its_heartbeat_interval(interval: float) -> None:
    # Given a keeper of a worker whose lease is 30 s, heartbeating every `interval` (shorter than
    # the lease, as the settings require), whose last beat came at 0
    keeper = _keeper(30, interval)
    keeper.last_beat = 0.0
    kept_at: list[float] = []
    keeper.keep = lambda: kept_at.append(now) or 1  # type: ignore[method-assign]
    # When no beat comes, and it looks as often as it does (its clock given, not the host's)
    now = 0.0
    while not kept_at and now < 60:
        now += keeper.every
        keeper.tick(now)
    # Then it kept the leases before the last heartbeat's ran out (at 1.5 intervals, an interval
    # over two thirds of the lease kept them only after: the reaper could take them first)
    assert kept_at and kept_at[0] < 30, (interval, kept_at)
    # And not while the beats came: one interval of silence is a heartbeat on its way
    quiet = _keeper(30, interval)
    quiet.last_beat = 0.0
    quiet.keep = lambda: pytest.fail("kept while its worker heartbeats")  # type: ignore[method-assign]
    quiet.tick(min(interval, 15) * 0.99)


def test_a_keeper_whose_worker_died_while_it_connected_keeps_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a keeper connecting (a server slow to answer) when its worker process dies
    executed: list[str] = []
    options: dict[str, Any] = {}

    class Cursor:
        def __enter__(self) -> Cursor:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def execute(self, sql: str, params: object) -> None:
            executed.append(sql)

        def fetchone(self) -> tuple[int]:
            return (1,)

    class Connection:
        autocommit = False

        def cursor(self) -> Cursor:
            return Cursor()

        def close(self) -> None:
            pass

    keeper = _keeper(30, 10)

    def connect(url: str, **kwargs: Any) -> Connection:
        options.update(kwargs)
        keeper.parent = -1  # (meanwhile it was given to another parent)
        return Connection()

    monkeypatch.setitem(sys.modules, "psycopg2", types.SimpleNamespace(connect=connect))
    # When it keeps
    kept = keeper.keep()
    # Then it runs nothing for the dead worker, and it connects as the worker does: with a timeout,
    # and keepalives (a connection left idle since the last keep may have been cut silently)
    assert (kept, executed) == (0, [])
    assert options == {**connect_options("postgresql://nobody@/nowhere"),
                       "application_name": "controlplane lease keeper"}  # fmt: skip
    assert options["connect_timeout"] == "10" and options["keepalives"] == "1", options
