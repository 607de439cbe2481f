"""Where ours' pickup latency goes: ``python -m bench.latency_parts [--n 1000] [--rate 50]``.

A measurement aid, like :mod:`bench.ab_drain`. The harness's pickup latency of a
job runs from just before its ``actor.send`` to the start of the job in a worker,
so it holds the send itself (one statement and a synchronous commit, which waits
for the WAL flush) as well as the queue's part (the NOTIFY, the claim, Dramatiq's
hand-off to a worker thread). This starts ``dramatiq tasks bench.drivers.ours_actors
--processes 2 --threads 8`` on a fresh database, lets it go idle, sends ``--n``
no-op jobs at ``--rate`` per second as the harness does, also noting when each send
returned, and prints both parts' percentiles and the slowest jobs taken apart.
Results go to ``bench/results/latency-parts-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import migrations
import tasks
from bench.drivers.common import paced_send
from bench.drivers.ours_actors import noop
from bench.harness import RESULTS, BenchError, Records, WorkerGroup, percentile
from bench.scratch import drop_database, fresh_database
from bench.systems import ROOT
from tasks.broker import PostgresBroker

DATABASE = "bench_latency_parts"
WARM_UP = 64
#: Seconds without a job run before the workers count as stalled.
STALL_TIMEOUT = 60.0


def measure(n: int, rate: float) -> dict[str, Any]:
    if not isinstance(tasks.broker, PostgresBroker):
        raise SystemExit("bench.latency_parts measures the PostgreSQL broker: unset BROKER_URL")
    url = fresh_database(DATABASE)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            record_file = Path(scratch) / "records.txt"
            env = dict(os.environ, DATABASE_URL=url, PYTHONPATH=str(ROOT), BENCH_RECORD_FILE=str(record_file))
            migrations.upgrade(url)
            tasks.broker.reconfigure(url)
            command = [sys.executable, "-m", "dramatiq", "tasks", "bench.drivers.ours_actors",
                       "--processes", "2", "--threads", "8"]  # fmt: skip
            worker = WorkerGroup([command], env, Path(scratch) / "worker.log", ROOT)
            records = Records(record_file)
            returned: dict[float, float] = {}
            try:
                for _ in range(WARM_UP):
                    noop.send(0.0)
                records.wait_for(WARM_UP, worker, STALL_TIMEOUT)
                time.sleep(1.0)  # idle: the consumers wait for a NOTIFY

                def send(sent: float) -> None:  # the harness's latency driver's send, noting its return
                    noop.send(sent)
                    returned[float(f"{sent:.6f}")] = time.time()  # keyed as bench.record writes it back

                paced_send(n, rate, send, warm_up=False)  # warmed up above, in this process
                records.wait_for(WARM_UP + n, worker, STALL_TIMEOUT)
            finally:
                worker.stop(grace=60)
                tasks.broker.close()
            jobs = [(sent, returned[sent], started) for sent, started, _ in records.rows() if sent > 0]
    finally:
        drop_database(DATABASE)
    parts = {
        "pickup": [(started - sent) * 1000 for sent, _, started in jobs],
        "send": [(back - sent) * 1000 for sent, back, _ in jobs],
        "after the send returned": [(started - back) * 1000 for _, back, started in jobs],
    }
    slowest = sorted(jobs, key=lambda j: j[2] - j[0])[-max(1, n // 100) :]
    return {
        "n": len(jobs),
        "rate": rate,
        "percentiles_ms": {
            name: {p: percentile(v, float(p[1:])) for p in ("p50", "p95", "p99")} | {"max": max(v)}
            for name, v in parts.items()
        },
        "slowest_ms": [
            {"pickup": (s - t) * 1000, "send": (b - t) * 1000, "after": (s - b) * 1000} for t, b, s in slowest
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="jobs sent into the idle workers (default 1000)")
    parser.add_argument("--rate", type=float, default=50.0, help="sends per second (default 50, the harness's)")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/latency-parts-<time>.json)")
    args = parser.parse_args()
    try:
        result = measure(args.n, args.rate)
    except BenchError as exc:  # the workers died or stalled
        raise SystemExit(str(exc)) from None
    for name, p in result["percentiles_ms"].items():
        print(f"{name}: p50 {p['p50']:.2f} ms, p95 {p['p95']:.2f}, p99 {p['p99']:.2f}, max {p['max']:.1f}")
    print(f"the slowest {len(result['slowest_ms'])} pickups, ms = send + after the send returned:")
    for job in result["slowest_ms"]:
        print(f"  {job['pickup']:.2f} = {job['send']:.2f} + {job['after']:.2f}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = args.output or RESULTS / f"latency-parts-{stamp}.json"
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {output}")


if __name__ == "__main__":
    main()
