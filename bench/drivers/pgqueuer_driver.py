"""PgQueuer (asyncpg), at its defaults, run in ``bench/.venvs/pgqueuer``.

Workers: ``pgqueuer.run(factory)``, which is what ``pgq run module:factory``
does without the command line (the ``pgq run`` of PgQueuer 1.6.0 fails at
start in its log setup: ``AttributeError: 'str' object has no attribute
'name'``). One process per command; PgQueuer is asyncio, so there are no
threads to set: it runs with its defaults (batch size 10, no concurrency cap). Sends:
``Queries.enqueue(entrypoint, payload)``, and its list form for batches.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pgqueuer
from pgqueuer import AsyncpgDriver, Job, PgQueuer, Queries

from bench.drivers import common
from bench.record import record

ENTRYPOINT = "bench_noop"


@asynccontextmanager
async def factory() -> AsyncIterator[PgQueuer]:
    """The worker ``pgq run`` starts (database from ``PGDSN``)."""
    conn = await asyncpg.connect(os.environ["PGDSN"])
    pgq = PgQueuer(AsyncpgDriver(conn))

    @pgq.entrypoint(ENTRYPOINT)
    async def noop(job: Job) -> None:
        record(float(job.payload or b"0"))

    try:
        yield pgq
    finally:
        await conn.close()


async def _run(args: common.Args) -> None:
    if args.command == "worker":
        os.environ["PGDSN"] = args.url
        await pgqueuer.run(factory)
        return
    conn = await asyncpg.connect(args.url)
    try:
        queries = Queries(AsyncpgDriver(conn))
        if args.command == "setup":
            await queries.install()
        elif args.command == "enqueue":
            await common.atimed_enqueue(
                args.n,
                args.batch,
                lambda sent: queries.enqueue(ENTRYPOINT, b"%.6f" % sent),
                lambda count: queries.enqueue([ENTRYPOINT] * count, [b"0"] * count, [0] * count),
            )
        elif args.command == "latency":
            await common.apaced_send(args.n, args.rate, lambda sent: queries.enqueue(ENTRYPOINT, b"%.6f" % sent))
    finally:
        await conn.close()


def main() -> None:
    asyncio.run(_run(common.parse()))


if __name__ == "__main__":
    main()
