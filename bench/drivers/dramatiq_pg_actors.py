"""The actor dramatiq-pg's benchmark workers run: ``dramatiq bench.drivers.dramatiq_pg_actors``.

dramatiq-pg 0.12 at its defaults (its results backend on, as its broker
enables by default), database from ``BENCH_DATABASE_URL``. Its own command
line (``dramatiq-pg``) only manages the schema and imports ``pkg_resources``
and ``distutils``, which Python 3.12+ and recent setuptools no longer ship, so
the schema is applied from its ``generate_init_sql()`` instead.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq_pg import PostgresBroker

from bench.record import record

broker = PostgresBroker(url=os.environ["BENCH_DATABASE_URL"])
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench.noop", queue_name="bench")
def noop(sent: float = 0.0) -> None:
    """A no-op job: it only notes when it started."""
    record(sent)
