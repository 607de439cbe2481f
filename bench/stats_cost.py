"""What one read of the queue stats costs beside a big history: ``python -m bench.stats_cost [--history 1000000]``.

A measurement aid, like :mod:`bench.ab_drain`: a fresh database at head gets
``--history`` jobs completed before the last hour, one per millisecond, 1,000 failed ones, and
``--live`` live jobs with their messages (64 of them claimed, 48 running, as
16 worker threads with some prefetch would hold them); a quarter of the live
ones then complete, as a queue that keeps working would. It then times
``control_plane.queue_stats`` (the view: what psql users and other brokers
read) and ``QUEUE_STATS_VIA_MESSAGES`` (what ``controlplane stats`` and
``controlplane metrics`` read with the Postgres broker), ``--repeat`` times
each, and checks in one snapshot that both give the same rows.

``--late N`` then completes N jobs of the old history now (jobs done long after
they were written: a long delay or backoff, ``jobs retry --failed``), which
widens the old block ranges of the BRIN index on ``completed_at``, and times
both reads again. Results go to ``bench/results/stats-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime

import psycopg2

import migrations
from bench.harness import RESULTS
from bench.scratch import drop_database, fresh_database
from models import queries
from tests.support import queue_stats_both_ways

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


#: Jobs of the old history completed now (``--late``).
LATE = """UPDATE control_plane.jobs SET completed_at = now(), updated_at = now()
   WHERE id IN (SELECT id FROM control_plane.jobs WHERE status = 'completed'
                AND completed_at < now() - interval '1 hour' ORDER BY random() LIMIT %(late)s)"""

READS = {"the view": queries.QUEUE_STATS, "via messages": queries.QUEUE_STATS_VIA_MESSAGES}


def timed(cur: psycopg2.extensions.cursor, sql: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        cur.execute(sql)
        cur.fetchall()
        times.append((time.perf_counter() - start) * 1000)
    return times


def measure(conn: psycopg2.extensions.connection, url: str, repeat: int) -> dict[str, object]:
    """Both reads' times, and their rows read in one snapshot (one ``now()``), which must be equal."""
    out: dict[str, object] = {}
    with conn.cursor() as cur:
        for name, sql in READS.items():
            times = timed(cur, sql, repeat)
            out[name] = {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}
    view, via_messages = queue_stats_both_ways(url)
    if view != via_messages:
        raise SystemExit(f"the two reads disagree: {view} against {via_messages}")
    out["rows"] = [list(row.values()) for row in view]
    for name in READS:
        t = out[name]
        assert isinstance(t, dict)
        print(f"  {name}: median {t['median_ms']:.1f} ms (min {t['min_ms']:.1f}, max {t['max_ms']:.1f})")
    print(f"  rows (both): {out['rows']}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--history", type=int, default=1_000_000, help="completed jobs in the history (1000000)")
    parser.add_argument("--live", type=int, default=20_000, help="live jobs, each with its message (20000)")
    parser.add_argument("--repeat", type=int, default=7, help="reads of each query (7)")
    parser.add_argument("--late", type=int, default=0, help="old jobs then completed now, and read again (0)")
    ns = parser.parse_args()
    url = fresh_database(DATABASE)
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
        result: dict[str, object] = {
            "server": version, "brin": bool(brin), "history": ns.history, "live": ns.live, "repeat": ns.repeat,
        }  # fmt: skip
        result["in_order"] = measure(conn, url, ns.repeat)
        if ns.late:
            with conn.cursor() as cur:
                cur.execute(LATE, {"late": ns.late})
            print(f"after {ns.late:,} jobs of the old history completed now:")
            result["late"] = {"jobs": ns.late, **measure(conn, url, ns.repeat)}
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"stats-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"results: {path}")
    finally:
        conn.close()
        drop_database(DATABASE)


if __name__ == "__main__":
    main()
