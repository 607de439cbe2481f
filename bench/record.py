"""What every benchmark job does: append one line to the run's record file.

A job is a no-op apart from this: ``record(sent)`` writes
``"<sent> <started> <pid>\\n"`` (Unix time, seconds) to the file named by
``BENCH_RECORD_FILE``, with one ``write`` on an ``O_APPEND`` descriptor, which
is atomic for lines this short, so the threads and processes of every system
share one file without locks. The harness counts the lines to know when a
backlog is drained and reads the timestamps for rates and pickup latency.

``sent`` is the sender's ``time.time()`` taken just before the send call (0
for backlog jobs); ``started`` is the worker's ``time.time()`` when the job
function starts. Both use the same clock (one machine, ``CLOCK_REALTIME``).

Standard library only: the peers' virtualenvs import this module.
"""

from __future__ import annotations

import os
import threading
import time

ENV_VAR = "BENCH_RECORD_FILE"

_fd: int | None = None
_lock = threading.Lock()


def _descriptor() -> int:
    global _fd
    if _fd is None:
        with _lock:
            if _fd is None:
                _fd = os.open(os.environ[ENV_VAR], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    return _fd


def record(sent: float) -> None:
    """Note that a job sent at ``sent`` started now, in this process."""
    started = time.time()
    os.write(_descriptor(), b"%.6f %.6f %d\n" % (sent, started, os.getpid()))
