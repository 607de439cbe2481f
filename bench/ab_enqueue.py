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
import json
import os
import statistics
import subprocess
import sys

from bench.scratch import drop_database, fresh_database, interleaved
from bench.systems import ROOT

DATABASE = "bench_ab_enqueue"

_CHILD = """
import json, os, sys, time
import migrations, tasks
from bench.drivers.ours_actors import noop
from bench.procfs import cpu_seconds
n, batch, single = (int(a) for a in sys.argv[1:4])
migrations.upgrade(os.environ["DATABASE_URL"])
broker = tasks.broker
with broker.connection() as conn, conn.cursor() as cur:  # the pool holds this one connection
    cur.execute("SELECT pg_backend_pid()")
    (backend,) = cur.fetchone()

def timed(loop, jobs):
    wall, cpu, server = time.perf_counter(), time.process_time(), cpu_seconds(backend)
    loop()
    wall, cpu, server = time.perf_counter() - wall, time.process_time() - cpu, cpu_seconds(backend) - server
    return wall / jobs * 1e6, cpu / jobs * 1e6, server / jobs * 1e6

def batches():
    for _ in range(n // batch):
        broker.enqueue_batch([noop.message(0.0) for _ in range(batch)])

def singles():
    for _ in range(single):
        noop.send(0.0)

print(json.dumps({"tasks": tasks.__file__, "batch": timed(batches, n), "single": timed(singles, single)}))
"""


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
        env = {**os.environ, **extra, "DATABASE_URL": url,
               "PYTHONPATH": f"{os.path.abspath(path)}{os.pathsep}{ROOT}"}  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(ns.n), str(ns.batch), str(ns.single)],
            env=env, cwd=path, check=True, capture_output=True, text=True,
        )  # fmt: skip
        res = json.loads(out.stdout.strip().splitlines()[-1])
        (b_wall, b_cpu, b_server), (s_wall, s_cpu, s_server) = res["batch"], res["single"]
        results[index].append((res["batch"], res["single"]))
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
