"""What Dramatiq itself costs per message: ``python -m bench.dramatiq_floor [--n 20000]``.

Dramatiq's in-memory ``StubBroker`` with Dramatiq's default middleware, one
process, a ``Worker`` of 8 threads, a no-op actor: no database, no network.
The CPU time per message this process spends is the least any Dramatiq broker
can cost per message in Python on this machine, so it bounds what ours can
reach: ``drain jobs/s <= cores / (this + our broker's own Python + PostgreSQL's
CPU per job)``. Reported with the wall-clock rate.
"""

from __future__ import annotations

import argparse
import time

import dramatiq
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dramatiq_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="messages (default 20000)")
    args = parser.parse_args(argv)
    broker = StubBroker()
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name="floor", max_retries=0)
    def noop(i: int) -> None:
        del i

    for i in range(args.n):
        noop.send(i)
    worker = Worker(broker, worker_threads=8)
    cpu, wall = time.process_time(), time.perf_counter()
    worker.start()
    broker.join("floor")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    worker.stop()
    middleware = ", ".join(type(m).__name__ for m in broker.middleware)
    print(f"{args.n:,} messages: {cpu / args.n * 1e6:.0f} µs of CPU per message, {args.n / wall:,.0f} messages/s "
          f"(middleware: {middleware})")


if __name__ == "__main__":
    main()
