"""Celery on Redis, in ``bench/.venvs/celery``.

``--url`` is a ``redis://host:port/db`` URL: the harness gives Celery a Redis
database of its own and ``setup`` empties it. Sends are ``task.delay(...)``;
Celery has no batch enqueue (a ``group`` still sends one message per task), so
batches are not measured. A worker process is ``celery worker --pool threads
--concurrency T`` (threads, like the other systems' 8 threads per process),
Celery's defaults otherwise (gossip, mingle and heartbeats on).
"""

from __future__ import annotations

import os
import socket

from bench.drivers import common


def main() -> None:
    args = common.parse()
    os.environ["BENCH_REDIS_URL"] = args.url
    if args.command == "setup":
        import redis

        redis.Redis.from_url(args.url).flushdb()
        return
    from bench.drivers.celery_app import app, noop

    if args.command == "enqueue":
        if args.batch > 1:
            raise SystemExit("Celery has no batch enqueue")
        with app.connection_for_write():
            noop.delay(0.0)  # connect before the clock starts, as the other drivers do
        common.timed_enqueue(args.n - 1, 1, lambda sent: noop.delay(sent), lambda count: None)
    elif args.command == "latency":
        common.paced_send(args.n, args.rate, lambda sent: noop.delay(sent))
    else:
        app.worker_main(
            [
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                str(args.threads),
                "--loglevel",
                "WARNING",
                "--hostname",
                f"bench{os.getpid()}@{socket.gethostname()}",
            ]
        )


if __name__ == "__main__":
    main()
