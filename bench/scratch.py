"""The scratch database of the measurement aids (``ab_drain``, ``ab_enqueue``, ``stats_cost``, ``profile_ours``).

The server is :func:`bench.server.admin_url`'s: ``DATABASE_URL`` if set, else the
local server at 127.0.0.1:5432 if one answers, else the embedded PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator

from bench.server import admin_url
from tasks.db import with_database
from tests.support import query


def fresh_database(name: str) -> str:
    """Create the database ``name`` empty (dropping what a stopped run left); returns its URL."""
    drop_database(name)
    query(admin_url(), f"CREATE DATABASE {name}")
    return with_database(admin_url(), name)


def drop_database(name: str) -> None:
    query(admin_url(), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def tree_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``ROOT[::NAME=VALUE,...]``, a source tree to measure with extra environment, as (ROOT, {NAME: VALUE})."""
    path, _, extra = spec.partition("::")
    env: dict[str, str] = {}
    for pair in filter(None, extra.split(",")):
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"{spec!r}: expected ROOT::NAME=VALUE[,NAME=VALUE...], got {pair!r}")
        env[name] = value
    return path, env


def interleaved(specs: list[str], rounds: int) -> Iterator[tuple[int, int, str, dict[str, str]]]:
    """The A/B order of ``specs`` (``ROOT[::NAME=VALUE,...]``): (round, position, ROOT, extra
    environment), every other round reversed. All are parsed before the first is yielded,
    so a malformed one stops the run before it starts."""
    parsed = [tree_spec(spec) for spec in specs]
    order = list(range(len(specs)))
    for round_no in range(rounds):
        for index in order if round_no % 2 == 0 else order[::-1]:
            yield round_no, index, *parsed[index]
