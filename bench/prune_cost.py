"""What pruning a large history costs the queue meanwhile: ``python -m bench.prune_cost [--history 2000000]``.

A measurement aid, like :mod:`bench.long_transaction`. The daily prune deletes a day's
worth of finished jobs. Done as one ``DELETE`` (``control_plane.prune_jobs``, which
``controlplane.prune`` called until the twenty-ninth session), it holds one snapshot for
its whole length, and every claim meanwhile walks the dead index entries of the jobs
drained since it began (docs/operations.md, "A long transaction slows every queue").
Done in batches (``tasks.maintenance.prune_rows``, ``queries.PRUNE_BATCH`` rows per
transaction), no snapshot outlives a batch.

Each measurement fills ``--history`` jobs completed 8 days ago and ``--jobs`` queued
no-op messages, then drains them with the broker's own ``CLAIM`` and ``SETTLE`` (as
:mod:`bench.long_transaction` does) while the prune runs on another connection: ``none``
(no prune, the reference), ``one statement`` or ``batches``. It reports the prune's time,
the drain's rate, and the claims' mean time during the prune and at the end of the drain,
on a fresh database. Results go to ``bench/results/prune-cost-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2

import migrations
from bench.harness import in_round_order, save_aid_results
from bench.long_transaction import CLAIM_SIZE, claim_and_settle_all, fill
from bench.scratch import drop_database, fresh_database

DATABASE = "bench_prune_cost"
MODES = ("none", "one statement", "batches")


def _prune(url: str, mode: str) -> int:
    from tasks.maintenance import prune_rows

    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            if mode == "one statement":
                cur.execute("SELECT control_plane.prune_jobs('7 days', '30 days')")
                return int(cur.fetchone()[0])
            return prune_rows(cur, "7 days", "30 days")["jobs_and_results"]
    finally:
        conn.close()


def measure(url: str, jobs: int, history: int, mode: str) -> dict[str, Any]:
    """Drain ``jobs`` messages beside ``history`` old jobs while ``mode`` prunes them."""
    fill(url, jobs, history)
    drained: dict[str, Any] = {}

    def drain() -> None:
        drained["times"], drained["starts"], drained["wall"] = claim_and_settle_all(url)

    drainer = threading.Thread(target=drain)
    started = time.perf_counter()
    drainer.start()
    pruned, prune_s = 0, 0.0
    if mode != "none":
        pruned = _prune(url, mode)
        prune_s = time.perf_counter() - started
    drainer.join()
    times: list[float] = drained["times"]
    during = [t for t, at in zip(times[:-1], drained["starts"], strict=False) if at - started < prune_s]
    # Jobs drained while the prune ran: the claims begun meanwhile, of CLAIM_SIZE each (the last may be short).
    during_per_s = min(len(during) * CLAIM_SIZE, jobs) / prune_s if prune_s else None
    return {
        "pruned": pruned,
        "prune_s": prune_s,
        "jobs_per_s": jobs / drained["wall"],
        "jobs_per_s_during_prune": during_per_s,
        "claims_during_prune_ms": statistics.mean(during) if during else None,
        "last_50_claims_ms": statistics.mean(times[-51:-1]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prune_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=2_000_000, help="old jobs to prune (default 2,000,000)")
    parser.add_argument("--jobs", type=int, default=50_000, help="jobs drained meanwhile (default 50,000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/prune-cost-<UTC time>.json)")
    args = parser.parse_args(argv)
    url = fresh_database(DATABASE)
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    try:
        migrations.upgrade(url)
        for round_no in range(args.rounds):
            for mode in in_round_order(MODES, round_no):
                got = measure(url, args.jobs, args.history, mode)
                results[mode].append(got)
                during = got["claims_during_prune_ms"]
                rate = got["jobs_per_s_during_prune"]
                print(f"round {round_no}, {mode}: pruned {got['pruned']:,} in {got['prune_s']:.1f} s; drain "
                      f"{got['jobs_per_s']:,.0f} jobs/s in all, {'-' if rate is None else f'{rate:,.0f}'} while the "
                      f"prune ran; claims of {CLAIM_SIZE} meanwhile {'-' if during is None else f'{during:.2f} ms'}, "
                      f"the last 50 {got['last_50_claims_ms']:.2f} ms", flush=True)  # fmt: skip
    finally:
        drop_database(DATABASE)
    save_aid_results("prune-cost", "python -m bench.prune_cost", args, results, args.output)


if __name__ == "__main__":
    main()
