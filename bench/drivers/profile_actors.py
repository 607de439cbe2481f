"""``ours``' benchmark actor plus counters on the consumer thread (for :mod:`bench.profile_ours`).

Wraps ``_PostgresConsumer._claim`` and ``_flush`` in this worker process only
(the broker's source is not changed) and writes, every second, to
``$BENCH_PROFILE_DIR/consumer.<pid>.json``: statements run, jobs they carried,
the distribution of batch sizes and the seconds the consumer thread spent in them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter
from typing import Any

import tasks  # noqa: F401  (configures the broker; ``tasks.broker`` is then the instance)
from bench.drivers.ours_actors import noop  # noqa: F401  (declares the actor)

_module: Any = sys.modules["tasks.broker"]
_consumer: Any = _module._PostgresConsumer
_sizes: dict[str, Counter[int]] = {"claim": Counter(), "settle": Counter()}
_seconds = {"claim": 0.0, "settle": 0.0}
_claim, _flush = _consumer._claim, _consumer._flush


def _counted_claim(self: Any, limit: int) -> int:
    began = time.perf_counter()
    got: int = _claim(self, limit)
    _seconds["claim"] += time.perf_counter() - began
    _sizes["claim"][got] += 1
    return got


def _counted_flush(self: Any, conn: Any = None) -> None:
    with self.state.lock:
        pending = len(self.state.outcomes)
    began = time.perf_counter()
    _flush(self, conn)  # the settler thread passes its own connection
    if pending:
        _seconds["settle"] += time.perf_counter() - began
        _sizes["settle"][pending] += 1


def _dump() -> None:
    report = {}
    for kind, sizes in _sizes.items():
        statements, jobs = sum(sizes.values()), sum(k * v for k, v in sizes.items())
        report[kind] = {
            "statements": statements,
            "jobs": jobs,
            "jobs_per_statement": round(jobs / max(statements, 1), 1),
            "seconds_in_statements": round(_seconds[kind], 2),
            "commonest_sizes": sizes.most_common(4),
        }
    path = os.path.join(os.environ["BENCH_PROFILE_DIR"], f"consumer.{os.getpid()}.json")
    with open(path, "w") as f:
        json.dump(report, f)


def _dump_every_second() -> None:
    # Dramatiq's worker processes leave with os._exit: atexit would never run.
    while True:
        time.sleep(1.0)
        _dump()


_consumer._claim = _counted_claim
_consumer._flush = _counted_flush
threading.Thread(target=_dump_every_second, daemon=True, name="bench-profile").start()
