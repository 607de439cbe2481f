"""The Celery app and task of the benchmark: Redis broker from ``BENCH_REDIS_URL``, no result backend.

Celery's defaults otherwise (prefetch multiplier 4, early acks, JSON).
"""

from __future__ import annotations

import os

from celery import Celery

from bench.record import record

app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)


@app.task(name="bench.noop")
def noop(sent: float = 0.0) -> None:
    """A no-op job: it only notes when it started."""
    record(sent)
