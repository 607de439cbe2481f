"""dramatiq-pg 0.12, beside the newest Dramatiq it runs with, in ``bench/.venvs/dramatiq_pg``.

It pins ``dramatiq<2``; it is installed with ``--no-deps`` beside Dramatiq 2.
Sends are ``actor.send`` (it has no batch enqueue: each message is one
transaction on a pooled connection). Workers are the ``dramatiq`` command line
on :mod:`bench.drivers.dramatiq_pg_actors`.
"""

from __future__ import annotations

import os

from bench.drivers import common


def main() -> None:
    args = common.parse()
    os.environ["BENCH_DATABASE_URL"] = args.url
    if args.command == "setup":
        import psycopg2
        from dramatiq_pg import generate_init_sql

        conn = psycopg2.connect(args.url)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(generate_init_sql())
        finally:
            conn.close()
        return
    from bench.drivers.dramatiq_pg_actors import broker, noop

    if args.command == "enqueue":
        if args.batch > 1:
            raise SystemExit("dramatiq-pg has no batch enqueue")
        common.timed_enqueue(args.n, 1, lambda sent: noop.send(sent), lambda count: None)
    elif args.command == "latency":
        common.paced_send(args.n, args.rate, lambda sent: noop.send(sent))
    else:
        raise SystemExit("dramatiq-pg runs its workers with: dramatiq bench.drivers.dramatiq_pg_actors")
    broker.pool.closeall()


if __name__ == "__main__":
    main()
