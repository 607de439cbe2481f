"""What a long transaction elsewhere costs the queue: ``python -m bench.long_transaction [--jobs 50000]``.

A measurement aid, like :mod:`bench.ab_drain`. A claim changes a message's
``claim_token`` (never a HOT update) and a settle deletes it, so every job drained
leaves a dead entry at the head of the claim's index. Vacuum removes them, and an
index scan marks them dead as it passes, only once no snapshot can still see them:
while any session of the cluster holds an old snapshot (a transaction left open, a
long ``pg_dump``, a report), every claim walks all the dead entries of the jobs drained
since it began. This drains ``--jobs`` messages with the broker's own ``CLAIM`` (32 at a
time) and ``SETTLE``, without and with another session holding a ``REPEATABLE READ``
snapshot open, and reports the claims' times at the start and the end, and the rate,
on a fresh database. Results go to ``bench/results/long-transaction-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg2

import migrations
from bench.harness import in_round_order, save_aid_results
from bench.scratch import drop_database, fresh_database
from models import queries

DATABASE = "bench_long_transaction"
CLAIM_SIZE = 32


def fill(url: str, jobs: int, history: int = 0) -> None:
    """Empty the queue and the history, then queue ``jobs`` no-op messages in the queue ``bench``,
    beside ``history`` jobs completed 8 days ago (created over the day before)."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("TRUNCATE control_plane.messages, control_plane.jobs")
        cur.execute("""
            INSERT INTO control_plane.jobs (id, type, queue, payload, max_attempts, status, created_at, completed_at)
            SELECT gen_random_uuid(), 'bench.old', 'bench', '{}', 3, 'completed',
                   now() - interval '9 days' + i * interval '1 day' / %(n)s, now() - interval '8 days'
            FROM generate_series(1, %(n)s) AS i""", {"n": history})  # fmt: skip
        cur.execute("""
            INSERT INTO control_plane.jobs (id, type, queue, payload, max_attempts)
            SELECT gen_random_uuid(), 'bench.noop', 'bench', '{}', 3 FROM generate_series(1, %s)""", (jobs,))
        cur.execute("""
            INSERT INTO control_plane.messages (id, queue, actor, priority, eta, body)
            SELECT id, 'bench', 'bench.noop', 0, now() - interval '1 hour',
                   convert_to(json_build_object('queue_name', 'bench', 'actor_name', 'bench.noop', 'args', '[]'::json,
                              'kwargs', '{}'::json, 'options', '{}'::json, 'message_id', id,
                              'message_timestamp', 0)::text, 'UTF8')
            FROM control_plane.jobs WHERE status = 'pending'""")  # fmt: skip
        cur.execute("VACUUM ANALYZE control_plane.messages")
        cur.execute("VACUUM ANALYZE control_plane.jobs")
    conn.close()


def drain(url: str, jobs: int, hold: bool) -> dict[str, Any]:
    """Drain ``jobs`` messages claim by claim; with ``hold``, beside a snapshot held open throughout."""
    fill(url, jobs)
    holder = psycopg2.connect(url) if hold else None
    if holder is not None:
        with holder.cursor() as cur:
            cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            cur.execute("SELECT count(*) FROM control_plane.worker_heartbeats")  # takes the snapshot
    times, _, wall = claim_and_settle_all(url)
    if holder is not None:
        holder.close()
    return {
        "jobs_per_s": jobs / wall,
        "first_50_claims_ms": statistics.mean(times[:50]),
        "last_50_claims_ms": statistics.mean(times[-51:-1]),
        "empty_claim_ms": times[-1],
    }


def claim_and_settle_all(url: str) -> tuple[list[float], list[float], float]:
    """Claim the queue ``bench``'s messages ``CLAIM_SIZE`` at a time with the broker's ``CLAIM`` and
    ack each claim with its ``SETTLE``, until a claim comes back empty; each claim's time in ms
    (the empty one last), when each began (``time.perf_counter()``) and the wall time in seconds."""
    claimer, settler = psycopg2.connect(url), psycopg2.connect(url)
    claimer.autocommit = settler.autocommit = True
    times: list[float] = []
    starts: list[float] = []
    started = time.perf_counter()
    with claimer.cursor() as cc, settler.cursor() as sc:
        while True:
            token = str(uuid.uuid4())
            t = time.perf_counter()
            starts.append(t)
            cc.execute(queries.CLAIM, {"queue": "bench", "limit": CLAIM_SIZE, "token": token, "worker": "bench",
                                       "lease": 30})  # fmt: skip
            rows = cc.fetchall()
            times.append((time.perf_counter() - t) * 1000)
            if not rows:
                break
            ids = [r[0] for r in rows]
            n = len(ids)
            sc.execute(queries.SETTLE, {"ids": ids, "tokens": [token] * n, "kinds": ["ack"] * n, "delays": None,
                                        "bodies": None, "errors": None, "results": None, "started_ms": [1] * n,
                                        "markers": None, "worker": "bench"})  # fmt: skip
    wall = time.perf_counter() - started
    claimer.close()
    settler.close()
    return times, starts, wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.long_transaction", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=50_000, help="jobs drained per measurement (default 50,000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--output", type=Path,
                        help="results file (default bench/results/long-transaction-<UTC time>.json)")  # fmt: skip
    args = parser.parse_args(argv)
    url = fresh_database(DATABASE)
    results: dict[str, list[dict[str, Any]]] = {"no snapshot held": [], "a snapshot held": []}
    try:
        migrations.upgrade(url)
        for round_no in range(args.rounds):
            for name in in_round_order(results, round_no):
                got = drain(url, args.jobs, hold=name == "a snapshot held")
                results[name].append(got)
                print(f"round {round_no}, {name}: {got['jobs_per_s']:,.0f} jobs/s; claims of {CLAIM_SIZE}: first 50 "
                      f"{got['first_50_claims_ms']:.2f} ms, last 50 {got['last_50_claims_ms']:.2f} ms, the empty "
                      f"one {got['empty_claim_ms']:.2f} ms", flush=True)  # fmt: skip
    finally:
        drop_database(DATABASE)
    save_aid_results("long-transaction", "python -m bench.long_transaction", args, results, args.output)


if __name__ == "__main__":
    main()
