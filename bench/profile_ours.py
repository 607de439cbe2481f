"""Where ``ours`` spends a drain: ``python -m bench.profile_ours [--n 20000] [--processes 2]``.

A measurement aid for the broker's authors, not part of the benchmark. It
drains ``--n`` no-op jobs with ``--processes`` x 8 threads on a fresh database
and reports, per worker process, how many claim and settle statements the
consumer thread ran, how many jobs each carried and how long the thread spent
in them; then the server's own view of one claim, one settle and one batch
enqueue (``EXPLAIN (ANALYZE, WAL)``: planning time, execution time, WAL bytes).

The counters come from :mod:`bench.drivers.profile_actors`, which wraps the
consumer's ``_claim`` and ``_flush`` in the worker processes only; the broker's
code is not changed. Run it beside ``py-spy record --subprocesses`` on the
worker command (printed) for the Python side.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg2

from bench.scratch import drop_database, fresh_database
from bench.systems import ROOT


def _wal_bytes(plan: dict[str, Any]) -> int:
    """WAL bytes a whole statement wrote, from its JSON plan.

    A node's WAL counts what its subtree wrote, including CTEs it pulled rows
    from; a data-modifying CTE nobody reads runs on its own and is added.
    """
    ctes: dict[str, int] = {}
    read: set[str] = set()

    def walk(node: dict[str, Any]) -> None:
        name = node.get("Subplan Name", "")
        if name.startswith("CTE "):
            ctes[name[4:]] = int(node.get("WAL Bytes", 0))
        if node.get("Node Type") == "CTE Scan":
            read.add(str(node.get("CTE Name")))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan)
    return int(plan.get("WAL Bytes", 0)) + sum(b for name, b in ctes.items() if name not in read)


def _explain(url: str) -> dict[str, Any]:
    """Planning time, execution time and WAL bytes of ENQUEUE (500), CLAIM (16) and SETTLE (16)."""
    os.environ["DATABASE_URL"] = url
    import tasks
    from bench.drivers.ours_actors import noop
    from models import queries

    out: dict[str, Any] = {}
    conn = psycopg2.connect(url)
    conn.autocommit = True

    def explain(label: str, sql: str, params: dict[str, Any], rows: int) -> None:
        with conn.cursor() as cur:
            cur.execute("EXPLAIN (ANALYZE, WAL, SUMMARY, FORMAT JSON) " + sql, params)
            plan = cur.fetchone()[0][0]
        out[label] = {
            "jobs": rows,
            "planning_ms": round(plan["Planning Time"], 3),
            "execution_ms": round(plan["Execution Time"], 3),
            "wal_bytes_per_job": round(_wal_bytes(plan["Plan"]) / rows),
        }

    messages = [noop.message(0.0) for _ in range(500)]
    fields = ("ids", "queues", "actors", "priorities", "etas", "delays", "bodies", "max_attempts", "unique_keys")
    arrays: dict[str, list[Any]] = {k: [] for k in fields}
    for m in messages:
        values = (m.message_id, "bench", "bench.noop", 0, None, None, m.encode().decode(), 20, None)
        for key, value in zip(fields, values, strict=True):
            arrays[key].append(value)
    explain("enqueue_500", queries.ENQUEUE, {**arrays, "default_attempts": 20, "always_wake": False}, 500)
    token = str(uuid.uuid4())
    claim = {"queue": "bench", "limit": 16, "token": token, "worker": "profile:1", "lease": 30}
    with conn.cursor() as cur:
        cur.execute(queries.CLAIM, claim)
        ids = [r[0] for r in cur.fetchall()]
    claim["token"] = str(uuid.uuid4())
    explain("claim_16", queries.CLAIM, claim, 16)
    settle = {
        "ids": ids, "tokens": [token] * len(ids), "kinds": ["ack"] * len(ids), "delays": [0] * len(ids),
        "bodies": [None] * len(ids), "errors": [None] * len(ids), "results": [None] * len(ids),
        "started_ms": [1] * len(ids), "markers": None, "worker": "profile:1",
    }  # fmt: skip
    explain("settle_16", queries.SETTLE, settle, len(ids))
    conn.close()
    tasks.broker.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000, help="jobs to drain (default 20000)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes of 8 threads (default 2)")
    ns = parser.parse_args()
    name = f"bench_profile_{uuid.uuid4().hex[:8]}"
    url = fresh_database(name)
    scratch = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "DATABASE_URL": url,
        "BENCH_RECORD_FILE": str(scratch / "records"), "BENCH_PROFILE_DIR": str(scratch),
    }  # fmt: skip
    py = sys.executable
    try:
        subprocess.run([py, "-m", "bench.drivers.ours_driver", "setup", "--url", url], env=env, cwd=ROOT, check=True)
        subprocess.run(
            [py, "-m", "bench.drivers.ours_driver", "enqueue", "--url", url, "--n", str(ns.n), "--batch", "500"],
            env=env, cwd=ROOT, check=True, capture_output=True,
        )  # fmt: skip
        (scratch / "records").touch()
        command = [py, "-m", "dramatiq", "tasks", "bench.drivers.profile_actors",
                   "--processes", str(ns.processes), "--threads", "8"]  # fmt: skip
        print("workers:", " ".join(command), flush=True)
        worker = subprocess.Popen(command, env=env, cwd=ROOT, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with (scratch / "records").open("rb") as f:
                    if sum(1 for _ in f) >= ns.n:
                        break
                time.sleep(0.1)
            time.sleep(1.5)  # one more dump of the counters
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        starts = [float(line.split()[1]) for line in (scratch / "records").read_text().splitlines()]
        print(f"drained {len(starts)} jobs at {(len(starts) - 1) / (max(starts) - min(starts)):.0f} jobs/s")
        for path in sorted(scratch.glob("consumer.*.json")):
            print(f"worker process {path.stem.split('.')[1]}: {path.read_text().strip()}")
        print("server side:", json.dumps(_explain(url), indent=2))
    finally:
        drop_database(name)


if __name__ == "__main__":
    main()
