"""How long floor's send takes when paced as the latency phase sends (50/s): ``python -m bench.floor_send [--n 600]``.

Floor's send is one autocommit ``INSERT`` whose statement trigger NOTIFYs; compare with the
send part of ``python -m bench.latency_parts`` (ours' send, paced the same way). Runs on a
scratch database ``bench_floor_send`` of ``DATABASE_URL``'s server (default: the local one),
dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import psycopg2

from bench.drivers import floor_driver
from tasks import db

NAME = "bench_floor_send"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=600, help="sends (default 600)")
    parser.add_argument("--rate", type=float, default=50.0, help="sends per second (default 50, the harness's)")
    args = parser.parse_args()
    admin_url = os.environ.get("DATABASE_URL") or "postgresql://root@127.0.0.1:5432/postgres"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    try:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {NAME}")
            cur.execute(f"CREATE DATABASE {NAME}")
        url = db.with_database(admin_url, NAME)
        floor_driver.setup(url)
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
        p50, p95, p99 = (times[min(len(times) - 1, int(p * len(times)))] for p in (0.5, 0.95, 0.99))
        print(f"floor's send at {args.rate:g}/s: p50 {p50:.2f} ms, p95 {p95:.2f}, p99 {p99:.2f} ({args.n} sends)")
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {NAME} WITH (FORCE)")
        admin.close()


if __name__ == "__main__":
    main()
