"""Interleaved A/B of ours' drain: ``python -m bench.ab_drain ROOT[::ENV=V,...] ROOT2 ... [--n 20000]``.

A measurement aid for the broker's authors, quicker than a harness run: for
each round and each source tree (a ``git archive`` snapshot, or this checkout),
a fresh database gets ``--n`` no-op jobs in batches, then ``dramatiq tasks
bench.drivers.ours_actors --processes P --threads 8`` starts, and the rate is
the jobs drained from the first one taken until ``control_plane.messages`` is
empty. The order alternates every round. It also reports CPU per job of the
worker process tree and of its PostgreSQL backends (``/proc``), which moves
less than the rate on a shared machine, and how many statements the server
rolled back as deadlocks and how often a consumer restarted (from the workers' log).
``--group-size G`` sends the backlog as groups of G, each with a completion callback.

``ROOT::dramatiq_queue_prefetch=48`` runs a tree with extra environment.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import psycopg2

from bench import procfs
from bench.scratch import drop_database, fresh_database, interleaved
from bench.systems import ROOT

DATABASE = "bench_ab_drain"


def _hot_share(cur: Any) -> float:
    """The share of ``control_plane.jobs`` row updates that were HOT (wrote no index entry)."""
    cur.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'control_plane.jobs'::regclass")
    updates, hot = cur.fetchone()
    return hot / updates if updates else 0.0


class Drain(NamedTuple):
    rate: float  # jobs/s
    worker_cpu: float  # µs per job, the worker process tree
    pg_cpu: float  # µs per job, their PostgreSQL backends
    wal: float  # bytes per job
    hot: float  # share of the jobs rows' updates that were HOT
    deadlocks: int  # lines of the workers' log that report a deadlock
    restarts: int  # consumers Dramatiq restarted after an error


def run_once(
    spec: str, path: str, extra: dict[str, str], n: int, processes: int,
    fill_batch: int = 500, rate: float | None = None, store_results: bool = False, group_size: int = 0,
) -> Drain:  # fmt: skip
    """Drain ``n`` jobs with the tree at ``path`` and the ``extra`` environment (``spec``, parsed),
    sent in batches of ``fill_batch`` (1: one ``send`` per job) before the workers start, or,
    with ``rate``, one per call at that many per second while they run (its rate is then about the
    sends' rate). With ``store_results`` each job stores its (None) result for ``get_result``. With
    ``group_size`` the jobs are sent as Dramatiq groups of that many, each with a completion
    callback (one more no-op job, not counted in the rate), by ``group.run()``."""
    url = fresh_database(DATABASE)
    env = dict(os.environ, DATABASE_URL=url, PYTHONPATH=f"{path}{os.pathsep}{ROOT}", BENCH_RECORD_FILE=os.devnull)
    env.update(extra)
    setup = f"import migrations, tasks\nfrom bench.drivers.ours_actors import noop\nmigrations.upgrade({url!r})\n"
    options = "store_results=True" if store_results else ""
    if rate is not None:  # the schema now, the sends (the harness's paced loop) once the workers run
        subprocess.run([sys.executable, "-c", setup], env=env, cwd=path, check=True)
        fill = setup + (f"from bench.drivers.common import paced_send\n"
                        f"send = lambda *a: noop.send_with_options(args=a, {options})\n"
                        f"paced_send({n}, {rate}, send, warm_up=False)\n")  # fmt: skip
    elif group_size:
        member = f"noop.message_with_options(args=(0.0,), {options})"
        fill = setup + (f"from dramatiq import group\nfor _ in range({n} // {group_size}):\n"
                        f"    g = group([{member} for _ in range({group_size})])\n"
                        f"    g.add_completion_callback(noop.message(0.0))\n    g.run()\n")  # fmt: skip
    elif fill_batch == 1:
        fill = setup + f"for _ in range({n}): noop.send_with_options(args=(0.0,), {options})\n"
    else:
        message = f"noop.message_with_options(args=(0.0,), {options})"
        fill = setup + (f"for _ in range({n} // {fill_batch}): "
                        f"tasks.broker.enqueue_batch([{message} for _ in range({fill_batch})])\n")  # fmt: skip
    if rate is None:
        subprocess.run([sys.executable, "-c", fill], env=env, cwd=path, check=True)
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT pg_current_wal_lsn()::text")
        (wal_start,) = cur.fetchone()
    dramatiq = str(Path(sys.executable).with_name("dramatiq"))
    log = tempfile.TemporaryFile("w+")
    workers = subprocess.Popen(
        [dramatiq, "tasks", "bench.drivers.ours_actors", "--processes", str(processes), "--threads", "8"],
        env=env, cwd=path, stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        started: tuple[float, int] | None = None
        if rate is not None:  # the sends, paced, while the workers run
            started = (time.monotonic(), n)
            subprocess.run([sys.executable, "-c", fill], env=env, cwd=path, check=True, stdout=subprocess.DEVNULL)
        with conn.cursor() as cur:
            while True:
                cur.execute("SELECT count(*) FROM control_plane.messages")
                (left,) = cur.fetchone()
                if started is None and left < n:
                    started = (time.monotonic(), left)
                if left == 0:
                    break
                if workers.poll() is not None:
                    raise SystemExit(f"{spec}: the workers exited with {workers.returncode}")
                time.sleep(0.02)
            assert started is not None
            rate = started[1] / (time.monotonic() - started[0])
            cur.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (wal_start,))
            (wal,) = cur.fetchone()
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (DATABASE,))
            backends = [row[0] for row in cur.fetchall()]
        worker_cpu = sum(procfs.cpu_seconds(pid) for pid in procfs.tree(workers.pid))
        pg_cpu = sum(procfs.cpu_seconds(pid) for pid in backends)
        workers.terminate()
        workers.wait(timeout=60)
        with conn.cursor() as cur:  # the backends report their table statistics as they exit
            for _ in range(100):
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                            (DATABASE,))
                if cur.fetchone()[0] == 0:
                    break
                time.sleep(0.05)
            hot = _hot_share(cur)
        log.seek(0)
        text = log.read()
        return Drain(rate, worker_cpu / n * 1e6, pg_cpu / n * 1e6, float(wal) / n, hot,
                     sum("deadlock" in line.lower() for line in text.splitlines()), text.count("Restarting consumer"))
    finally:
        log.close()
        if workers.poll() is None:
            workers.terminate()
            workers.wait(timeout=60)
        conn.close()
        drop_database(DATABASE)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ab_drain", description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="source trees (each with tasks/, models/, migrations/)")
    parser.add_argument("--n", type=int, default=20000, help="jobs per drain (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes of 8 threads (default 2)")
    parser.add_argument("--fill-batch", type=int, default=500,
                        help="jobs per send while filling the backlog (default 500; 1: one send per job)")  # fmt: skip
    parser.add_argument("--rate", type=float,
                        help="no backlog: send one per call at this many jobs/s while the workers run")  # fmt: skip
    parser.add_argument("--group-size", type=int, default=0,
                        help="send the jobs as groups of this many, each with a completion callback")  # fmt: skip
    parser.add_argument("--store-results", action="store_true",
                        help="the jobs store their results for get_result (store_results=True)")
    args = parser.parse_args(argv)
    results: list[list[Drain]] = [[] for _ in args.trees]  # by position: an A/A run keeps two lines
    for round_no, index, path, extra in interleaved(args.trees, args.rounds):
        spec = args.trees[index]
        d = run_once(spec, path, extra, args.n, args.processes, args.fill_batch, args.rate, args.store_results,
                      args.group_size)  # fmt: skip
        results[index].append(d)
        print(f"round {round_no} {spec}: {d.rate:,.0f} jobs/s, CPU per job: workers {d.worker_cpu:.0f} µs, "
              f"PostgreSQL {d.pg_cpu:.0f} µs; WAL {d.wal:,.0f} B/job, HOT jobs updates {d.hot:.0%}; "
              f"deadlocks {d.deadlocks}, consumer restarts {d.restarts}", flush=True)
    for spec, rows in zip(args.trees, results, strict=True):
        rates = [r.rate for r in rows]
        print(f"{spec}: median {statistics.median(rates):,.0f} jobs/s {[round(r) for r in rates]}, CPU per job: "
              f"workers {statistics.median(r.worker_cpu for r in rows):.0f} µs, "
              f"PostgreSQL {statistics.median(r.pg_cpu for r in rows):.0f} µs; "
              f"WAL {statistics.median(r.wal for r in rows):,.0f} B/job, "
              f"HOT jobs updates {statistics.median(r.hot for r in rows):.0%}; "
              f"deadlocks {sum(r.deadlocks for r in rows)}, consumer restarts {sum(r.restarts for r in rows)} in all")


if __name__ == "__main__":
    main()
