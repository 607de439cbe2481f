"""``ours``: this project's broker, sending through the public API.

One job per call is ``actor.send(...)``; a batch is
``tasks.broker.enqueue_batch([actor.message(...), ...])`` (one statement per
batch). The schema comes from ``migrations.upgrade(url)``. Workers are the
``dramatiq`` command line on :mod:`bench.drivers.ours_actors` (the harness
starts them), so this driver has no ``worker`` command.
"""

from __future__ import annotations

import os

from bench.drivers import common


def main() -> None:
    args = common.parse()
    # The broker reads DATABASE_URL when ``tasks`` is imported.
    os.environ["DATABASE_URL"] = args.url
    if args.command == "setup":
        import migrations

        migrations.upgrade(args.url)
        return
    import tasks
    from bench.drivers.ours_actors import noop
    from tasks.broker import PostgresBroker

    broker = tasks.broker
    assert isinstance(broker, PostgresBroker)
    with broker.connection():
        pass  # open the pooled connection before the clock starts, as the other drivers do

    if args.command == "enqueue":
        common.timed_enqueue(
            args.n,
            args.batch,
            lambda sent: noop.send(sent),
            lambda count: broker.enqueue_batch([noop.message(0.0) for _ in range(count)]),
        )
    elif args.command == "latency":
        common.paced_send(args.n, args.rate, lambda sent: noop.send(sent))
    else:
        raise SystemExit("ours runs its workers with: dramatiq tasks bench.drivers.ours_actors")
    broker.close()


if __name__ == "__main__":
    main()
