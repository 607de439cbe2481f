"""How long floor's send takes when paced as the latency phase sends (50/s): ``python -m bench.floor_send [--n 600]``.

Floor's send is one autocommit ``INSERT`` whose statement trigger NOTIFYs. To set beside the
send part of ``python -m bench.latency_parts`` (ours' send, paced the same way into idle 2x8
workers), floor's own workers run meanwhile (``--workers 2`` processes of 8 threads, each
LISTENing, as in the latency phase; ``--tuned``: ``floor_tuned``'s; ``--workers 0`` for none)
and take each job. Runs on a
scratch database ``bench_floor_send_<pid>`` of ``DATABASE_URL``'s server (default: the local
one), dropped at the end; writes ``bench/results/floor-send-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg2

from bench import record
from bench.drivers import floor_driver
from tasks import db
from tasks.redaction import redact

ROOT = Path(__file__).resolve().parent.parent


def _percentile(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=600, help="sends (default 600)")
    parser.add_argument("--rate", type=float, default=50.0, help="sends per second (default 50, the harness's)")
    parser.add_argument("--workers", type=int, default=2, help="floor worker processes of 8 threads (default 2)")
    parser.add_argument("--tuned", action="store_true", help="floor_tuned's workers instead")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/floor-send-<time>.json)")
    args = parser.parse_args()
    admin_url = os.environ.get("DATABASE_URL") or "postgresql://root@127.0.0.1:5432/postgres"
    name = f"bench_floor_send_{os.getpid()}"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    workers: list[subprocess.Popen[bytes]] = []
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        url = db.with_database(admin_url, name)
        floor_driver.setup(url)
        command = [sys.executable, "-m", "bench.drivers.floor_driver", "worker", "--url", url, "--threads", "8"]
        command += ["--async-commit", "--one-listener"] if args.tuned else []
        env = {**os.environ, "PYTHONPATH": str(ROOT), record.ENV_VAR: os.devnull}
        workers = [subprocess.Popen(command, cwd=ROOT, env=env) for _ in range(args.workers)]
        if workers:
            time.sleep(1.0)  # a moment for the workers to connect and LISTEN before the first send
        conn = floor_driver.connect(url)
        times = []
        try:
            with conn.cursor() as cur:
                for _ in range(args.n):
                    start = time.perf_counter()
                    cur.execute(floor_driver.INSERT_ONE, (json.dumps({"sent": time.time()}),))
                    took = time.perf_counter() - start
                    times.append(took * 1000)
                    time.sleep(max(0.0, 1 / args.rate - took))
        finally:
            conn.close()
        times.sort()
        p50, p95, p99 = (_percentile(times, p) for p in (0.5, 0.95, 0.99))
        print(f"floor's send at {args.rate:g}/s, {args.workers}x8 {'floor_tuned' if args.tuned else 'floor'} workers: "
              f"p50 {p50:.2f} ms, p95 {p95:.2f}, p99 {p99:.2f} ({args.n} sends)")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        output = args.output or ROOT / "bench" / "results" / f"floor-send-{stamp}.json"
        output.write_text(json.dumps({
            "kind": "floor_send", "written_at": stamp,
            "command": " ".join(["python -m bench.floor_send", *sys.argv[1:]]), "server": redact(admin_url),
            "n": args.n, "rate": args.rate, "workers": args.workers, "tuned": args.tuned,
            "send_ms": {"p50": p50, "p95": p95, "p99": p99, "max": times[-1]}, "loadavg": os.getloadavg(),
        }, indent=2) + "\n")  # fmt: skip
        print(f"results: {output}")
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


if __name__ == "__main__":
    main()
