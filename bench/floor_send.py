"""How long floor's send takes when paced as the latency phase sends (50/s): ``python -m bench.floor_send [--n 600]``.

Floor's send is one autocommit ``INSERT`` whose statement trigger NOTIFYs. To set beside the
send part of ``python -m bench.latency_parts`` (ours' send, paced the same way into idle 2x8
workers), floor's own workers run meanwhile (``--workers 2`` processes of 8 threads, each
LISTENing, as in the latency phase; ``--tuned``: ``floor_tuned``'s; ``--workers 0`` for none)
and take each job. Runs on a scratch database of :mod:`bench.scratch`'s server, dropped at the
end; writes ``bench/results/floor-send-<UTC time>.json``.
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

from bench.drivers import floor_driver
from bench.harness import RESULTS, WorkerGroup, percentile
from bench.record import ENV_VAR
from bench.scratch import drop_database, fresh_database
from bench.server import admin_url
from bench.systems import ROOT, SYSTEMS
from tasks.redaction import redact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="sends (default 600)")
    parser.add_argument("--rate", type=float, default=50.0, help="sends per second (default 50, the harness's)")
    parser.add_argument("--workers", type=int, default=2, help="floor worker processes of 8 threads (default 2)")
    parser.add_argument("--tuned", action="store_true", help="floor_tuned's workers instead")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/floor-send-<time>.json)")
    args = parser.parse_args()
    system = SYSTEMS["floor_tuned" if args.tuned else "floor"]
    database = f"bench_floor_send_{os.getpid()}"  # (its own: two runs at once on a shared server)
    url = fresh_database(database)
    try:
        floor_driver.setup(url)
        with tempfile.TemporaryDirectory() as scratch:
            env = {**os.environ, "PYTHONPATH": str(ROOT), ENV_VAR: os.devnull}
            commands = system.worker_commands(url, args.workers, 8) if args.workers else []
            workers = WorkerGroup(commands, env, Path(scratch) / "worker.log", ROOT)
            try:
                if commands:
                    time.sleep(1.0)  # a moment for the workers to connect and LISTEN before the first send
                    workers.check_alive()
                times = _timed_sends(url, args.n, args.rate)
            finally:
                workers.stop()
    finally:
        drop_database(database)
    p50, p95, p99 = (percentile(times, p) for p in (50, 95, 99))
    print(f"floor's send at {args.rate:g}/s, {args.workers}x8 {system.name} workers: "
          f"p50 {p50:.2f} ms, p95 {p95:.2f}, p99 {p99:.2f} ({args.n} sends)")  # fmt: skip
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = args.output or RESULTS / f"floor-send-{stamp}.json"
    output.write_text(json.dumps({
        "kind": "floor_send", "written_at": stamp,
        "command": " ".join(["python -m bench.floor_send", *sys.argv[1:]]), "server": redact(admin_url()),
        "n": args.n, "rate": args.rate, "workers": args.workers, "tuned": args.tuned,
        "send_ms": {"p50": p50, "p95": p95, "p99": p99, "max": max(times)}, "loadavg": os.getloadavg(),
    }, indent=2) + "\n")  # fmt: skip
    print(f"results: {output}")


def _timed_sends(url: str, n: int, rate: float) -> list[float]:
    """Milliseconds each of ``n`` sends took, sent ``rate`` per second on one connection."""
    conn = floor_driver.connect(url)
    times = []
    try:
        with conn.cursor() as cur:
            for _ in range(n):
                start = time.perf_counter()
                cur.execute(floor_driver.INSERT_ONE, (json.dumps({"sent": time.time()}),))
                took = time.perf_counter() - start
                times.append(took * 1000)
                time.sleep(max(0.0, 1 / rate - took))
    finally:
        conn.close()
    return times


if __name__ == "__main__":
    main()
