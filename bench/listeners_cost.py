"""What idle consumers cost every send: ``python -m bench.listeners_cost [--listeners 2,30,90]``.

A measurement aid, like :mod:`bench.notify_cost`. Every consumer ``LISTEN``s on
one channel (``models.queries.NOTIFY_CHANNEL``) on its own connection, and a send
NOTIFYs while a consumer of its queue waits. PostgreSQL signals every backend
listening in the database at each notifying commit, whatever the channel, and each
reads the notification queue. This opens ``--listeners`` connections that listen as
idle consumers do (the first waits on the measured queue, so every send NOTIFYs; the
others wait on queues of their own), then sends ``--sends`` messages one per
statement (``ENQUEUE_ONE``, what ``actor.send`` runs) and reports the wall time and
PostgreSQL's CPU per send, on a fresh database, for ``--rounds`` interleaved rounds.
Results go to ``bench/results/listeners-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import select
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg2

import migrations
from bench.harness import in_round_order, save_aid_results
from bench.procfs import postgres_cpu_seconds, server_postmaster
from bench.scratch import drop_database, fresh_database
from models import queries

DATABASE = "bench_listeners_cost"
QUEUE = "bench"


def _listen(url: str, n: int, ready: Any, stop: Any) -> None:
    """Hold ``n`` idle consumers' connections: LISTEN, and WAITING_LOCK on a queue each."""
    conns = []
    for i in range(n):
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"LISTEN {queries.NOTIFY_CHANNEL}")
            cur.execute(f"SELECT pg_advisory_lock_shared({queries.WAITING_LOCK}, hashtext(%s))",
                        (QUEUE if i == 0 else f"idle{i}",))  # fmt: skip
        conns.append(conn)
    ready.set()
    while not stop.is_set():
        readable, _, _ = select.select(conns, [], [], 0.2)
        for conn in readable:
            conn.poll()
            conn.notifies.clear()
    for conn in conns:
        conn.close()


def run_once(url: str, listeners: int, sends: int) -> tuple[float, float]:
    """Wall and PostgreSQL CPU milliseconds per send with ``listeners`` idle consumers listening."""
    ready, stop = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(target=_listen, args=(url, listeners, ready, stop))
    holder.start()
    try:
        while not ready.wait(0.5):
            if not holder.is_alive():  # its error is above (max_connections, usually)
                raise RuntimeError(f"{listeners} listeners could not connect: is max_connections lower?")
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            postmaster = server_postmaster(conn)  # (this server's CPU alone, when it runs here)
            cpu, started = postgres_cpu_seconds(postmaster), time.perf_counter()
            for i in range(sends):
                message_id = str(uuid.uuid4())
                body = json.dumps({"queue_name": QUEUE, "actor_name": "bench.noop", "args": [i], "kwargs": {},
                                   "options": {}, "message_id": message_id, "message_timestamp": 0})  # fmt: skip
                cur.execute(queries.ENQUEUE_ONE, {
                    "ids": message_id, "queues": QUEUE, "actors": "bench.noop", "priorities": 0, "etas": None,
                    "delays": None, "bodies": body, "max_attempts": 3, "default_attempts": 3, "always_wake": False,
                })  # fmt: skip
                if cur.fetchone()[0] != 1:
                    raise RuntimeError("a send did not NOTIFY: the waiting consumer is not seen")
            wall = time.perf_counter() - started
            cpu = postgres_cpu_seconds(postmaster) - cpu
            cur.execute("TRUNCATE control_plane.messages, control_plane.jobs")
        conn.close()
    finally:
        stop.set()
        holder.join()
    return wall / sends * 1000, cpu / sends * 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.listeners_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listeners", default="2,30,90",
                        help="idle consumer counts (default 2,30,90; max_connections bounds them)")
    parser.add_argument("--sends", type=int, default=1000, help="sends per measurement (default 1,000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/listeners-<UTC time>.json)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.listeners.split(",")]
    url = fresh_database(DATABASE)
    results: dict[int, dict[str, list[float]]] = {n: {"wall_ms": [], "postgres_cpu_ms": []} for n in counts}
    try:
        migrations.upgrade(url)
        for round_no in range(args.rounds):
            for n in in_round_order(counts, round_no):
                wall, cpu = run_once(url, n, args.sends)
                results[n]["wall_ms"].append(wall)
                results[n]["postgres_cpu_ms"].append(cpu)
                print(f"round {round_no} {n:>4} listeners: {wall:.2f} ms per send, PostgreSQL CPU {cpu:.2f} ms",
                      flush=True)  # fmt: skip
    finally:
        drop_database(DATABASE)
    print("\n| listening consumers | ms per send | PostgreSQL CPU ms per send |\n|---:|---:|---:|")
    for n, got in results.items():
        print(f"| {n} | {statistics.median(got['wall_ms']):.2f} | {statistics.median(got['postgres_cpu_ms']):.2f} |")
    save_aid_results("listeners", "python -m bench.listeners_cost", args, results, args.output)


if __name__ == "__main__":
    main()
