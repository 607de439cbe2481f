"""What the NOTIFY of a send costs concurrent senders: ``python -m bench.notify_cost [--senders 1,4,16]``.

A measurement aid, like :mod:`bench.ab_drain`. PostgreSQL serializes the
commits of transactions that NOTIFY (one lock, held through the commit's WAL
flush, so that notifications are queued in commit order), and every send
(``ENQUEUE_ONE``, what ``actor.send`` runs) NOTIFYed its queue until sends
learned to NOTIFY only a queue whose consumer waits (``models.queries.
WAITING_LOCK``). This runs ``--senders`` processes, each sending one message
per statement on its own connection for ``--seconds``, with three variants of
the statement: NOTIFY always (``CONTROLPLANE_WAKE_ONLY_WAITING=off``), NOTIFY
only a waiting consumer (the default; here none waits, so the advisory locks
are taken and no NOTIFY is sent), and no NOTIFY at all; interleaved for
``--rounds``, on a fresh database. No worker runs: only the sending is
measured. Results go to ``bench/results/notify-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
from tasks.prepared import Statement

DATABASE = "bench_notify_cost"
NOTIFY = "count(pg_notify('control_plane_messages', q.queue))"
#: name: (statement, always_wake)
VARIANTS = {
    "NOTIFY always": (queries.ENQUEUE_ONE, True),
    "NOTIFY a waiting consumer (none)": (queries.ENQUEUE_ONE, False),
    "no NOTIFY": (queries.ENQUEUE_ONE.replace(NOTIFY, "count(*)"), True),
}
BODY = json.dumps({"queue_name": "bench", "actor_name": "bench.noop", "args": [0.0], "kwargs": {},
                   "options": {}, "message_id": "x", "message_timestamp": 0})  # fmt: skip


def _sender(url: str, variant: str, start_at: float, stop_at: float, counts: Any, slot: int) -> None:
    sql, always_wake = VARIANTS[variant]
    statement = Statement("bench_notify_cost", sql)
    conn = psycopg2.connect(url)
    conn.autocommit = True
    sent = 0
    with conn.cursor() as cur:
        while time.time() < start_at:
            time.sleep(0.001)
        while time.time() < stop_at:
            params = {"ids": str(uuid.uuid4()), "queues": "bench", "actors": "bench.noop", "priorities": 0,
                      "etas": None, "delays": None, "bodies": BODY, "max_attempts": 3,
                      "default_attempts": 3, "always_wake": always_wake}  # fmt: skip
            statement.execute(cur, params)
            cur.fetchone()
            sent += 1
    conn.close()
    counts[slot] = sent


def run_once(url: str, variant: str, senders: int, seconds: float) -> float:
    """Sends per second of ``senders`` processes sending with ``variant`` for ``seconds``."""
    counts = multiprocessing.Array("l", senders)
    start_at = time.time() + 1.0  # every process connected before the clock starts
    procs = [
        multiprocessing.Process(target=_sender, args=(url, variant, start_at, start_at + seconds, counts, i))
        for i in range(senders)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return sum(counts) / seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.notify_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--senders", default="1,4,16", help="sender process counts (default 1,4,16)")
    parser.add_argument("--seconds", type=float, default=4.0, help="sending time per measurement (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/notify-<UTC time>.json)")
    args = parser.parse_args(argv)
    url = fresh_database(DATABASE)
    results: dict[str, dict[int, list[float]]] = {name: {} for name in VARIANTS}
    try:
        migrations.upgrade(url)
        for round_no in range(args.rounds):
            names = in_round_order(VARIANTS, round_no)
            for senders in (int(n) for n in args.senders.split(",")):
                for name in names:
                    rate = run_once(url, name, senders, args.seconds)
                    results[name].setdefault(senders, []).append(rate)
                    print(f"round {round_no} {senders:>3} senders, {name}: {rate:,.0f} sends/s", flush=True)
    finally:
        drop_database(DATABASE)
    print("\n| senders | " + " | ".join(VARIANTS) + " |\n|---:|" + "---:|" * len(VARIANTS))
    for senders in results["NOTIFY always"]:
        cells = []
        for name in VARIANTS:
            rates = results[name][senders]
            cells.append(f"{statistics.median(rates):,.0f} ({', '.join(f'{r:,.0f}' for r in rates)})")
        print(f"| {senders} | " + " | ".join(cells) + " |")
    save_aid_results("notify", "python -m bench.notify_cost", args, results, args.output)


if __name__ == "__main__":
    main()
