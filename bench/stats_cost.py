"""What one read of the queue stats costs beside a big history: ``python -m bench.stats_cost [--history 1000000]``.

A measurement aid, like :mod:`bench.ab_drain`: a fresh database at head gets
``--history`` jobs completed before the last hour, one per millisecond, 1,000 failed ones, and
``--live`` live jobs with their messages (64 of them claimed, 48 running, as
16 worker threads with some prefetch would hold them); a quarter of the live
ones then complete, as a queue that keeps working would. It then times
``control_plane.queue_stats`` (the view: what psql users and other brokers
read) and ``QUEUE_STATS_VIA_MESSAGES`` (what ``controlplane stats`` and
``controlplane metrics`` read with the Postgres broker), ``--repeat`` times
each, and checks that both give the same counts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import psycopg2

import migrations
from models import queries
from tasks.db import with_database

ADMIN_URL = os.environ.get("DATABASE_URL") or "postgresql://root@127.0.0.1:5432/postgres"
DATABASE = "bench_stats_cost"

FILL = (
    # the history: one completion per millisecond until an hour ago, in the order they were sent
    """INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at)
       SELECT gen_random_uuid(), 'noop', 'default', 'completed', c, c
       FROM generate_series(1, %(history)s) AS g,
            LATERAL (SELECT now() - interval '1 hour' - (%(history)s - g) * interval '1 ms') AS t(c)""",
    """INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at)
       SELECT gen_random_uuid(), 'noop', 'default', 'failed', now() - interval '1 hour', now() - interval '1 hour'
       FROM generate_series(1, 1000)""",
    # the live jobs: a job row and a message each, as a send writes them
    """WITH j AS (
           INSERT INTO control_plane.jobs (id, type, queue, scheduled_at)
           SELECT gen_random_uuid(), 'noop', 'default', now() FROM generate_series(1, %(live)s)
           RETURNING id, scheduled_at)
       INSERT INTO control_plane.messages (id, queue, actor, eta, body)
       SELECT id, 'default', 'noop', scheduled_at, '\\x7b7d' FROM j""",
    """UPDATE control_plane.messages SET claim_token = gen_random_uuid(), worker = 'bench',
              lease_expires_at = now() + interval '1 minute'
       WHERE id IN (SELECT id FROM control_plane.messages ORDER BY id LIMIT 64)""",
    """UPDATE control_plane.jobs SET status = 'running', attempts = 1, started_at = now()
       WHERE id IN (SELECT id FROM control_plane.messages WHERE claim_token IS NOT NULL ORDER BY id LIMIT 48)""",
    # a quarter of the unclaimed ones complete now: the last minute's throughput
    """WITH done AS (
           DELETE FROM control_plane.messages
           WHERE claim_token IS NULL AND id IN (SELECT id FROM control_plane.messages ORDER BY id DESC
                                                LIMIT %(live)s / 4)
           RETURNING id)
       UPDATE control_plane.jobs SET status = 'completed', attempts = 1, completed_at = now()
       WHERE id IN (SELECT id FROM done)""",
)


def timed(cur: psycopg2.extensions.cursor, sql: str, repeat: int) -> tuple[list[float], list[tuple[object, ...]]]:
    times, rows = [], []
    for _ in range(repeat):
        start = time.perf_counter()
        cur.execute(sql)
        rows = cur.fetchall()
        times.append((time.perf_counter() - start) * 1000)
    return times, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=1_000_000, help="completed jobs in the history (1000000)")
    parser.add_argument("--live", type=int, default=20_000, help="live jobs, each with its message (20000)")
    parser.add_argument("--repeat", type=int, default=7, help="reads of each query (7)")
    ns = parser.parse_args()
    admin = psycopg2.connect(ADMIN_URL)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        cur.execute(f"CREATE DATABASE {DATABASE}")
    url = with_database(ADMIN_URL, DATABASE)
    migrations.upgrade(url)
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for sql in FILL:
                cur.execute(sql, {"history": ns.history, "live": ns.live})
            cur.execute("VACUUM ANALYZE control_plane.jobs")
            cur.execute("VACUUM ANALYZE control_plane.messages")
            cur.execute("SHOW server_version")
            (version,) = cur.fetchone()
            cur.execute("SELECT count(*) FROM pg_indexes WHERE indexname = 'ix_jobs_completed_at_brin'")
            (brin,) = cur.fetchone()
            print(f"PostgreSQL {version}, BRIN index on completed_at: {'yes' if brin else 'no'}; "
                  f"{ns.history:,} completed jobs in the history, {ns.live:,} live")  # fmt: skip
            counts = {}
            for name, sql in (("the view", queries.QUEUE_STATS), ("via messages", queries.QUEUE_STATS_VIA_MESSAGES)):
                times, rows = timed(cur, sql, ns.repeat)
                counts[name] = [row[:6] for row in rows]
                print(f"{name}: median {statistics.median(times):.1f} ms (min {min(times):.1f}, "
                      f"max {max(times):.1f}); rows {counts[name]}")  # fmt: skip
            if counts["the view"] != counts["via messages"]:
                raise SystemExit("the two reads disagree")
    finally:
        conn.close()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        admin.close()


if __name__ == "__main__":
    main()
