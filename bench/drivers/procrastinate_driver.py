"""Procrastinate (psycopg 3), run in ``bench/.venvs/procrastinate``.

Workers: ``App.run_worker(concurrency=T)``, what ``procrastinate worker
--concurrency T`` runs (its default concurrency is 1; we give it the same 8-way
concurrency the threaded systems get). The task is ``async``, so it runs on the
worker's event loop. Sends: ``task.defer_async(...)`` and
``task.batch_defer_async(...)`` for batches.
"""

from __future__ import annotations

import asyncio
import os

from bench.drivers import common


async def _run(args: common.Args) -> None:
    from bench.drivers.procrastinate_app import app, noop

    async with app.open_async():
        if args.command == "setup":
            await app.schema_manager.apply_schema_async()
        elif args.command == "enqueue":
            await common.atimed_enqueue(
                args.n,
                args.batch,
                lambda sent: noop.defer_async(sent=sent),
                lambda count: noop.batch_defer_async(*({"sent": 0.0} for _ in range(count))),
            )
        elif args.command == "latency":
            await common.apaced_send(args.n, args.rate, lambda sent: noop.defer_async(sent=sent))
        else:
            await app.run_worker_async(concurrency=args.threads)


def main() -> None:
    args = common.parse()
    os.environ["BENCH_DATABASE_URL"] = args.url
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
