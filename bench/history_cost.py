"""What a big history costs a send: ``python -m bench.history_cost [TREE ...] [--history 2000000]``.

A measurement aid, like :mod:`bench.ab_enqueue`: two fresh databases at head,
one whose ``control_plane.jobs`` holds ``--history`` completed jobs (their ids
random, as Dramatiq's uuid4 message ids are) and one with none. Then, in
alternating order, every source tree (default: this one; snapshots as for
``--ours-root``, ``TREE::VAR=VALUE`` adds environment) sends into each database,
in its own Python process per round: the message table emptied (a queue the
workers keep up with), a ``CHECKPOINT``, ``--single`` jobs through
``actor.send`` and ``--n`` through ``broker.enqueue_batch`` in batches of 500.
So every round pays what the first writes after a checkpoint pay: PostgreSQL
logs a whole page (a full-page image) the first time it changes after a
checkpoint, and a random id lands on a random leaf of the primary key's index;
the bigger the history, the fewer of its leaves were written since.

One unrecorded round per tree and database comes first (``--no-warm-up``: none).
Printed per round and as medians: µs per job, the PostgreSQL backend's CPU per job, WAL bytes per
job, and, where the ``pg_walinspect`` extension can be created (PostgreSQL 15
and newer, a superuser), the full-page images per job of each relation (a temporary
replication slot keeps each round's WAL until it is read: a checkpoint may recycle it).
Results go to ``bench/results/history-cost-<UTC time>.json`` (or ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors

import migrations
from bench.harness import RESULTS
from bench.scratch import drop_database, fresh_database, tree_spec
from bench.send_child import measure
from bench.systems import ROOT
from tasks import db

DATABASES = {"empty": "bench_history_empty", "history": "bench_history_big"}

FILL = """
INSERT INTO control_plane.jobs (id, type, queue, payload, status, attempts, scheduled_at, created_at,
                                started_at, completed_at, updated_at)
SELECT gen_random_uuid(), 'bench.noop', 'bench', '{"args": [0.0], "kwargs": {}}', 'completed', 1, t, t, t, t, t
FROM generate_series(%(history)s, 1, -1) AS g, LATERAL (SELECT now() - g * interval '10 ms') AS s(t)
"""

#: One block reference with a full-page image in ``pg_get_wal_records_info``'s ``block_ref``
#: (``blkref #0: rel 1663/16665/16680 fork main blk 441 (FPW); hole: ...``).
_FPW = re.compile(r"rel \d+/(\d+)/(\d+)[^#]*?FPW")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", default=[str(ROOT)], metavar="TREE[::VAR=VALUE,...]",
                        help="source trees to send from (default: this one)")  # fmt: skip
    parser.add_argument("--history", type=int, default=2_000_000, help="completed jobs in the history (2000000)")
    parser.add_argument("--single", type=int, default=2000, help="jobs sent one per call per round (default 2000)")
    parser.add_argument("--n", type=int, default=20000, help="jobs sent in batches of 500 per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (default 4)")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false", help="skip the unrecorded rounds")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/history-cost-<UTC time>.json)")
    ns = parser.parse_args()
    # (name, database, tree, extra environment)
    variants: list[tuple[str, str, str, dict[str, str]]] = []
    for spec in ns.trees:
        path, env = tree_spec(spec)
        prefix = f"{spec} " if len(ns.trees) > 1 else ""
        variants += [(prefix + key, key, path, env) for key in DATABASES]
    urls = {key: fresh_database(name) for key, name in DATABASES.items()}
    try:
        for key, url in urls.items():
            migrations.upgrade(url)
            with closing(_connect(url)) as conn, conn.cursor() as cur:
                if key == "history":
                    # Full pages: the free space of a page filled to the table's fillfactor (70) would
                    # take one of the measured sends each, each a full-page image of the heap.
                    cur.execute("SELECT reloptions FROM pg_class WHERE oid = 'control_plane.jobs'::regclass")
                    (options,) = cur.fetchone()
                    cur.execute("ALTER TABLE control_plane.jobs SET (fillfactor = 100)")
                    cur.execute(FILL, {"history": ns.history})
                    cur.execute(f"ALTER TABLE control_plane.jobs SET ({', '.join(options)})")
                cur.execute("VACUUM ANALYZE control_plane.jobs")
                cur.execute("SELECT pg_size_pretty(pg_total_relation_size('control_plane.jobs'))")
                print(f"{key}: control_plane.jobs {cur.fetchone()[0]}", flush=True)
        walinspect = all(_walinspect(url) for url in urls.values())
        for _, key, path, extra in variants if ns.warm_up else ():  # the fill's last pages, the first plans
            _round(urls[key], path, extra, ns.single, ns.n, False)
        samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _, _ in variants}
        order = list(range(len(variants)))
        for round_no in range(ns.rounds):
            for index in order if round_no % 2 == 0 else order[::-1]:
                name, key, path, extra = variants[index]
                sample = _round(urls[key], path, extra, ns.single, ns.n, walinspect)
                samples[name].append(sample)
                print(f"round {round_no} {name}: {_line(sample)}", flush=True)
        summary = {name: _medians(rounds) for name, rounds in samples.items()}
        for name, medians in summary.items():
            print(f"{name}: median {_line(medians)}")
    finally:
        for name in DATABASES.values():
            drop_database(name)
    path = ns.output or RESULTS / f"history-cost-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {**vars(ns), "output": str(path)}
    path.write_text(json.dumps({"config": config, "rounds": samples, "medians": summary}, indent=1) + "\n")
    print(f"results: {path}")


def _connect(url: str) -> Any:
    """An autocommit connection (VACUUM and CREATE EXTENSION outside a transaction)."""
    return db.connect(url, autocommit=True, application_name="bench.history_cost")


def _walinspect(url: str) -> bool:
    try:
        with closing(_connect(url)) as conn, conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        return True
    except psycopg2.Error as exc:
        print(f"no full-page image counts: {str(exc).strip()}", flush=True)
        return False


def _round(url: str, tree: str, extra: dict[str, str], single: int, n: int, walinspect: bool) -> dict[str, Any]:
    with closing(_connect(url)) as conn, conn.cursor() as cur:
        if walinspect:
            _hold_wal(cur)  # (until this connection closes, after the WAL is read)
        parts = measure(url, tree, extra, f"single={single}", f"batch={n}", "--empty-and-checkpoint")
        del parts["tasks"]
        for part in parts.values():
            start, end = part.pop("wal")
            cur.execute("SELECT pg_wal_lsn_diff(%s, %s)", (end, start))
            part["wal_bytes_per_job"] = float(cur.fetchone()[0]) / part["jobs"]
            if walinspect:
                part["fpi_per_job"] = _full_page_images(cur, start, end, part["jobs"])
    return parts


def _hold_wal(cur: Any) -> None:
    """Keep the server's WAL from now until this session ends, with a temporary replication slot.

    A checkpoint between the sends and the reading of their WAL (another session's, or
    the server's own) may recycle the segments the reading needs; with a slot it may not.
    Without the right to create one (a role without REPLICATION), the reading may fail
    and that part is reported without its full-page images.
    """
    try:
        cur.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (f"bench_history_{os.getpid()}",))
    except psycopg2.Error as exc:
        print(f"WAL not held for the full-page image counts: {str(exc).strip()}", flush=True)


def _full_page_images(cur: Any, start: str, end: str, jobs: int) -> dict[str, float]:
    """Full-page images written between two LSNs for this database's relations, per job, by relation name."""
    cur.execute("SELECT oid FROM pg_database WHERE datname = current_database()")
    (database,) = cur.fetchone()
    try:
        cur.execute("SELECT block_ref FROM pg_get_wal_records_info(%s, %s) WHERE block_ref LIKE '%%FPW%%'",
                    (start, end))  # fmt: skip
    except psycopg2.errors.UndefinedFile as exc:  # (a segment recycled before it was read: see _hold_wal)
        print(f"no full-page image counts for this part: {str(exc).strip()}", flush=True)
        return {}
    counts: dict[int, int] = {}
    for (block_ref,) in cur.fetchall():
        for db_oid, node in _FPW.findall(block_ref):
            if int(db_oid) == database:
                counts[int(node)] = counts.get(int(node), 0) + 1
    names: dict[str, float] = {}
    for node, count in counts.items():
        cur.execute("SELECT coalesce((SELECT relname::text FROM pg_class WHERE relfilenode = %s), %s)",
                    (node, str(node)))  # fmt: skip
        names[cur.fetchone()[0]] = round(count / jobs, 3)
    return dict(sorted(names.items(), key=lambda item: -item[1]))


def _medians(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    medians: dict[str, Any] = {}
    for part in ("single", "batch"):
        values = [r[part] for r in rounds]
        medians[part] = {
            key: statistics.median(v[key] for v in values)
            for key in ("us_per_job", "server_cpu_us_per_job", "wal_bytes_per_job")
        }
        relations = {name for v in values for name in v.get("fpi_per_job", {})}
        if relations:
            medians[part]["fpi_per_job"] = {
                name: statistics.median(v["fpi_per_job"].get(name, 0.0) for v in values) for name in sorted(relations)
            }
    return medians


def _line(sample: dict[str, Any]) -> str:
    text = []
    for part in ("single", "batch"):
        p = sample[part]
        fpi = ", ".join(f"{name} {count:g}" for name, count in p.get("fpi_per_job", {}).items() if count >= 0.01)
        text.append(
            f"{part} {p['us_per_job']:.1f} µs/job (PostgreSQL CPU {p['server_cpu_us_per_job']:.1f}), "
            f"WAL {p['wal_bytes_per_job']:.0f} B/job" + (f", full-page images/job: {fpi}" if fpi else "")
        )
    return "; ".join(text)


if __name__ == "__main__":
    main()
