"""Interleaved A/B of ours' sends: ``python -m bench.ab_enqueue ROOT ROOT2 ... [--rounds 2]``.

A measurement aid for the broker's authors, like :mod:`bench.ab_drain`: for each
round and each source tree (a ``git archive`` snapshot with tasks/, models/ and
migrations/), a fresh database gets ``--n`` jobs through
``broker.enqueue_batch`` in batches of ``--batch`` (the messages built inside
the timed loop, as the harness does), then ``--single`` jobs through
``actor.send``, each tree in its own Python process. Prints microseconds per
job for both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.systems import ROOT
from tests.support import query

ADMIN_URL = os.environ.get("DATABASE_URL") or "postgresql://root@127.0.0.1:5432/postgres"
DATABASE = "bench_ab_enqueue"

_CHILD = """
import json, os, sys, time
import migrations, tasks
from bench.drivers.ours_actors import noop
n, batch, single = (int(a) for a in sys.argv[1:4])
migrations.upgrade(os.environ["DATABASE_URL"])
broker = tasks.broker
with broker.connection():
    pass
started = time.perf_counter()
for _ in range(n // batch):
    broker.enqueue_batch([noop.message(0.0) for _ in range(batch)])
batch_us = (time.perf_counter() - started) / n * 1e6
started = time.perf_counter()
for _ in range(single):
    noop.send(0.0)
single_us = (time.perf_counter() - started) / single * 1e6
print(json.dumps({"tasks": tasks.__file__, "batch_us": batch_us, "single_us": single_us}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", help="source trees (each with tasks/, models/, migrations/)")
    parser.add_argument("--n", type=int, default=20000, help="jobs sent in batches (default 20000)")
    parser.add_argument("--batch", type=int, default=500, help="jobs per batch (default 500)")
    parser.add_argument("--single", type=int, default=1000, help="jobs sent one per call (default 1000)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    ns = parser.parse_args()
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + DATABASE
    for round_no in range(ns.rounds):
        for tree in ns.trees if round_no % 2 == 0 else list(reversed(ns.trees)):
            query(ADMIN_URL, f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
            query(ADMIN_URL, f"CREATE DATABASE {DATABASE}")
            env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": f"{os.path.abspath(tree)}{os.pathsep}{ROOT}"}
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(ns.n), str(ns.batch), str(ns.single)],
                env=env, cwd=tree, check=True, capture_output=True, text=True,
            )  # fmt: skip
            res = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"round {round_no} {tree} ({res['tasks']}): batch {res['batch_us']:.1f} µs/job, "
                f"one per call {res['single_us']:.0f} µs/job"
            )
    query(ADMIN_URL, f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")


if __name__ == "__main__":
    main()
