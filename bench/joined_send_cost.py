"""What planning costs a send inside a transaction: ``python -m bench.joined_send_cost [--sends 800]``.

A measurement aid, like :mod:`bench.notify_cost`. A send inside a caller's
transaction (``tasks.enqueue_in(conn)``: every hand-over between the steps of
``provision_project``, and the transactional sends of an app) runs ``ENQUEUE_ONE``
as a plain statement, planned each time, where the broker's own sends run it
prepared (:mod:`tasks.prepared`). This sends ``--sends`` messages, each in its
own ``BEGIN``/``COMMIT`` on one of the broker's pooled connections, once as
``enqueue_in`` runs it and once with the statement prepared, interleaved for
``--rounds``, on a fresh database with ``synchronous_commit`` off (so the flush
of the WAL does not hide the difference), and reports the backend's CPU and the
wall time per send. Results go to ``bench/results/joined-send-<UTC time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import migrations
from bench.harness import RESULTS, in_round_order
from bench.procfs import cpu_seconds
from bench.scratch import drop_database, fresh_database

DATABASE = "bench_joined_send_cost"
VARIANTS = ("plain (as enqueue_in runs it)", "prepared")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.joined_send_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=800, help="sends per variant and round (default 800)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (default 4)")
    parser.add_argument("--output", type=Path, help="results file (default bench/results/joined-send-<UTC time>.json)")
    args = parser.parse_args(argv)
    url = fresh_database(DATABASE)
    results: dict[str, dict[str, list[float]]] = {name: {"cpu_us": [], "wall_us": []} for name in VARIANTS}
    try:
        migrations.upgrade(url)
        import dramatiq

        from tasks.broker import PostgresBroker, enqueue_in
        from tasks.prepared import Statement
        from tasks.prepared import _prepared as prepared_on

        def forget_prepared(conn: Any) -> None:
            """After DEALLOCATE ALL: the connection prepares again at its next prepared send."""
            prepared_on.pop(conn, None)

        broker = PostgresBroker(url=url)
        dramatiq.set_broker(broker)

        @dramatiq.actor(actor_name="bench.joined_noop", queue_name="bench")
        def noop(n: int) -> None: ...

        plain = Statement.execute

        def prepared(self: Statement, cur: Any, params: dict[str, Any], *, prepare: bool = True) -> None:
            plain(self, cur, params, prepare=True)

        for round_no in range(args.rounds):
            for name in in_round_order(VARIANTS, round_no):
                Statement.execute = prepared if name == "prepared" else plain  # type: ignore[method-assign]
                with broker.connection() as conn:
                    with conn.cursor() as cur:
                        cur.execute("SET synchronous_commit = off; SELECT pg_backend_pid()")
                        pid = cur.fetchone()[0]
                    cpu, start = cpu_seconds(pid), time.perf_counter()
                    for n in range(args.sends):
                        with conn.cursor() as cur:
                            cur.execute("BEGIN")
                        with enqueue_in(conn):
                            noop.send(n)
                        with conn.cursor() as cur:
                            cur.execute("COMMIT")
                    wall, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
                    with conn.cursor() as cur:
                        # what ran: every send stored, and ENQUEUE_ONE prepared on this session or not
                        cur.execute("SELECT count(*) FROM control_plane.jobs")
                        stored = cur.fetchone()[0]
                        cur.execute(
                            "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'control_plane_enqueue%'"
                        )
                        was_prepared = cur.fetchone()[0] > 0
                        cur.execute("DEALLOCATE ALL; RESET synchronous_commit; DELETE FROM control_plane.messages; "
                                    "DELETE FROM control_plane.jobs")  # fmt: skip
                    forget_prepared(conn)
                if stored != args.sends or was_prepared != (name == "prepared"):
                    raise SystemExit(f"{name}: {stored} of {args.sends} sends stored, prepared: {was_prepared}")
                Statement.execute = plain  # type: ignore[method-assign]
                results[name]["cpu_us"].append(cpu / args.sends * 1e6)
                results[name]["wall_us"].append(wall / args.sends * 1e6)
                print(f"round {round_no} {name}: backend CPU {results[name]['cpu_us'][-1]:.0f} µs, "
                      f"wall {results[name]['wall_us'][-1]:.0f} µs per send", flush=True)  # fmt: skip
        broker.close()
    finally:
        drop_database(DATABASE)
    print("\n| per send | " + " | ".join(VARIANTS) + " |\n|---|---:|---:|")
    for measure in ("cpu_us", "wall_us"):
        cells = [
            f"{statistics.median(results[name][measure]):.0f} µs "
            f"({', '.join(f'{v:.0f}' for v in results[name][measure])})"
            for name in VARIANTS
        ]
        print(f"| {'backend CPU' if measure == 'cpu_us' else 'wall'} | " + " | ".join(cells) + " |")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.output or RESULTS / f"joined-send-{stamp}.json"
    out.write_text(json.dumps({"command": "python -m bench.joined_send_cost", "args": vars(args),
                               "per_send": results}, indent=2, default=str) + "\n")  # fmt: skip
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
