"""Timed sends from one source tree: the child process of :mod:`bench.ab_enqueue` and :mod:`bench.history_cost`.

``python -m bench.send_child PART=JOBS ... [--batch 500] [--empty-and-checkpoint]``, run
with ``DATABASE_URL`` set and the tree to measure first on ``PYTHONPATH`` (this
repository's root after it, for ``bench``). The tree's migrations are applied,
then each part in the order given: ``batch=N`` sends N jobs (rounded down to
whole batches) through ``broker.enqueue_batch`` in batches of ``--batch``, the
messages built inside the timed loop, as the harness does; ``single=N`` sends N
through ``actor.send``. ``--empty-and-checkpoint`` first empties the message
table (a queue the workers keep up with) and runs a ``CHECKPOINT``.

Prints one JSON line: ``tasks`` (the ``tasks`` package measured) and per part
``jobs``, ``us_per_job`` (wall), ``sender_cpu_us_per_job``,
``server_cpu_us_per_job`` (its PostgreSQL backend's, from ``/proc``) and
``wal`` (the WAL positions before and after it, as text).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.systems import ROOT

PARTS = ("batch", "single")


def measure(url: str, tree: str, extra: dict[str, str], *args: str) -> dict[str, Any]:
    """Run this module from ``tree`` (with ``extra`` environment) on the database ``url``;
    ``args`` are its command line. Returns what it printed."""
    if not os.path.isdir(os.path.join(tree, "tasks")):
        raise SystemExit(f"{tree}: not a source tree (no tasks/ in it); see --ours-root in docs/performance.md")
    env = {**os.environ, **extra, "DATABASE_URL": url, "PYTHONPATH": f"{os.path.abspath(tree)}{os.pathsep}{ROOT}"}
    out = subprocess.run(
        [sys.executable, "-m", "bench.send_child", *args],
        env=env, cwd=tree, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"the sends from {tree} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def part(spec: str) -> tuple[str, int]:
    """``PART=JOBS`` as (PART, JOBS)."""
    name, _, jobs = spec.partition("=")
    if name not in PARTS or not jobs.isdigit():
        raise argparse.ArgumentTypeError(f"expected batch=N or single=N, got {spec!r}")
    return name, int(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="+", type=part, metavar="PART=JOBS", help="batch=N or single=N, in order")
    parser.add_argument("--batch", type=int, default=500, help="jobs per batch (default 500)")
    parser.add_argument("--empty-and-checkpoint", action="store_true",
                        help="empty control_plane.messages and CHECKPOINT first")  # fmt: skip
    ns = parser.parse_args()
    # Imported here, from the tree measured: the parent imports this module for measure() only.
    import migrations
    import tasks
    from bench.drivers.ours_actors import noop
    from bench.procfs import cpu_seconds

    migrations.upgrade(os.environ["DATABASE_URL"])  # this tree's migrations, if newer
    broker: Any = tasks.broker
    with broker.connection() as conn, conn.cursor() as cur:  # the pool holds this one connection
        cur.execute("SELECT pg_backend_pid()")
        (backend,) = cur.fetchone()
        if ns.empty_and_checkpoint:
            cur.execute("TRUNCATE control_plane.messages")
            conn.commit()
            cur.execute("CHECKPOINT")

    def lsn() -> str:
        with broker.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_current_wal_lsn()::text")
            return str(cur.fetchone()[0])

    def batches(jobs: int) -> None:
        for _ in range(jobs // ns.batch):
            broker.enqueue_batch([noop.message(0.0) for _ in range(ns.batch)])

    def singles(jobs: int) -> None:
        for _ in range(jobs):
            noop.send(0.0)

    loops: dict[str, Callable[[int], None]] = {"batch": batches, "single": singles}
    out: dict[str, Any] = {"tasks": tasks.__file__}
    for name, jobs in ns.parts:
        if name == "batch":
            jobs = jobs // ns.batch * ns.batch
        start = lsn()
        wall, cpu, server = time.perf_counter(), time.process_time(), cpu_seconds(backend)
        loops[name](jobs)
        wall, cpu, server = time.perf_counter() - wall, time.process_time() - cpu, cpu_seconds(backend) - server
        out[name] = {
            "jobs": jobs,
            "us_per_job": wall / jobs * 1e6,
            "sender_cpu_us_per_job": cpu / jobs * 1e6,
            "server_cpu_us_per_job": server / jobs * 1e6,
            "wal": [start, lsn()],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
