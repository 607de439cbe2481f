"""Interleaved A/B of ours' sends: ``python -m bench.ab_enqueue ROOT[::ENV=V,...] ROOT2 ... [--rounds 2]``.

A measurement aid for the broker's authors, like :mod:`bench.ab_drain`: for each
round and each source tree (a ``git archive`` snapshot with tasks/, models/ and
migrations/), a fresh database gets ``--n`` jobs through
``broker.enqueue_batch`` in batches of ``--batch`` (the messages built inside
the timed loop, as the harness does), then ``--single`` jobs through
``actor.send``, each tree in its own Python process. Prints microseconds per
job for both, and the CPU time per job of the sending process and of its
PostgreSQL backend, which moves much less than the wall time when commits wait
on a shared disk. ``ROOT::CONTROLPLANE_PREPARED_STATEMENTS=off`` runs a tree
with extra environment, as in :mod:`bench.ab_drain`.
"""

from __future__ import annotations

import argparse
import statistics

from bench.scratch import drop_database, fresh_database, interleaved
from bench.send_child import measure

DATABASE = "bench_ab_enqueue"
#: What is printed of each part, in µs per job.
COLUMNS = ("us_per_job", "sender_cpu_us_per_job", "server_cpu_us_per_job")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", help="source trees (each with tasks/, models/, migrations/)")
    parser.add_argument("--n", type=int, default=20000, help="jobs sent in batches (default 20000)")
    parser.add_argument("--batch", type=int, default=500, help="jobs per batch (default 500)")
    parser.add_argument("--single", type=int, default=1000, help="jobs sent one per call (default 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    ns = parser.parse_args()
    results: list[list[tuple[list[float], list[float]]]] = [[] for _ in ns.trees]
    for round_no, index, path, extra in interleaved(ns.trees, ns.rounds):
        tree = ns.trees[index]
        url = fresh_database(DATABASE)
        res = measure(url, path, extra, f"batch={ns.n}", f"single={ns.single}", "--batch", str(ns.batch))
        batch, single = ([res[part][column] for column in COLUMNS] for part in ("batch", "single"))
        results[index].append((batch, single))
        (b_wall, b_cpu, b_server), (s_wall, s_cpu, s_server) = batch, single
        print(
            f"round {round_no} {tree} ({res['tasks']}): batch {b_wall:.1f} µs/job "
            f"(CPU: sender {b_cpu:.1f}, PostgreSQL {b_server:.1f}), one per call {s_wall:.0f} µs/job "
            f"(CPU: sender {s_cpu:.0f}, PostgreSQL {s_server:.0f})"
        )
    drop_database(DATABASE)
    for tree, rounds in zip(ns.trees, results, strict=True):
        batch, single = _summary([b for b, _ in rounds]), _summary([s for _, s in rounds])
        print(f"{tree}: median batch {batch}; one per call {single}")


def _summary(samples: list[list[float]]) -> str:
    """Medians of (wall, sender CPU, PostgreSQL CPU) µs per job, with each round's wall time."""
    wall, cpu, server = (statistics.median(column) for column in zip(*samples, strict=True))
    rounds = [round(s[0], 1) for s in samples]
    return f"{wall:.1f} µs/job {rounds} (CPU: sender {cpu:.1f}, PostgreSQL {server:.1f})"


if __name__ == "__main__":
    main()
