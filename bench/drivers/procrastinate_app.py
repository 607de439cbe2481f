"""The Procrastinate app and task of the benchmark (database from ``BENCH_DATABASE_URL``).

A module of its own, not the driver's ``__main__``, as Procrastinate asks; the
driver sets the variable before importing it.
"""

from __future__ import annotations

import os

import procrastinate

from bench.record import record

app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=os.environ["BENCH_DATABASE_URL"]))


@app.task(name="bench_noop")
async def noop(sent: float = 0.0) -> None:
    """A no-op job: it only notes when it started."""
    record(sent)
