"""The command line every driver shares, and the timing loops behind it.

``python -m bench.drivers.<system>_driver COMMAND --url URL ...``:

* ``setup``: create the system's schema in an empty database.
* ``enqueue --n N --batch B``: send N backlog jobs (``sent`` = 0), B per call
  (B = 1: the system's one-job call); prints ``{"seconds": ...}`` for the
  sending loop alone (imports and connecting excluded).
* ``latency --n N --rate R``: send one untimed job (``sent`` = 0) and pause,
  then N jobs, one per call, R per second on a fixed schedule, each carrying
  ``time.time()`` read just before its send call; pause again before exiting.
* ``worker --threads T``: one worker process (for systems whose worker is not
  a ``dramatiq`` command line); runs until SIGTERM. The floor driver's worker
  takes ``--claim``, ``--async-commit`` and ``--one-listener`` too.

Standard library only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Args:
    """Parsed driver arguments."""

    command: str
    url: str
    n: int
    batch: int
    rate: float
    threads: int
    claim: int
    async_commit: bool = False
    one_listener: bool = False


def parse(argv: Sequence[str] | None = None) -> Args:
    """Parse a driver command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["setup", "enqueue", "latency", "worker"])
    parser.add_argument("--url", required=True, help="libpq URL of the database (or redis:// for Celery)")
    parser.add_argument("--n", type=int, default=0, help="jobs to send")
    parser.add_argument("--batch", type=int, default=1, help="jobs per send call (enqueue)")
    parser.add_argument("--rate", type=float, default=50.0, help="jobs per second (latency)")
    parser.add_argument("--threads", type=int, default=8, help="worker threads (worker)")
    parser.add_argument("--claim", type=int, default=1, help="jobs claimed per statement (floor worker)")
    parser.add_argument(
        "--async-commit",
        action="store_true",
        help="worker connections run SET synchronous_commit = off (floor worker; sends stay synchronous)",
    )
    parser.add_argument(
        "--one-listener",
        action="store_true",
        help="one LISTEN connection per process wakes one idle thread per notification (floor worker)",
    )
    ns = parser.parse_args(argv)
    return Args(ns.command, ns.url, ns.n, ns.batch, ns.rate, ns.threads, ns.claim, ns.async_commit, ns.one_listener)


def emit(result: dict[str, object]) -> None:
    """Print the driver's result as the last line of its output."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _calls(n: int, batch: int) -> Iterator[int]:
    """The number of jobs in each send call when ``n`` are sent ``batch`` per call."""
    batch = max(batch, 1)
    for first in range(0, n, batch):
        yield min(batch, n - first)


def timed_enqueue(n: int, batch: int, send_one: Callable[[float], object], send_many: Callable[[int], object]) -> None:
    """Send ``n`` backlog jobs, ``batch`` per call, and emit the seconds the loop took."""
    started = time.perf_counter()
    for count in _calls(n, batch):
        if batch <= 1:
            send_one(0.0)
        else:
            send_many(count)
    emit({"seconds": time.perf_counter() - started, "n": n, "batch": batch})


async def atimed_enqueue(
    n: int, batch: int, send_one: Callable[[float], Awaitable[object]], send_many: Callable[[int], Awaitable[object]]
) -> None:
    """:func:`timed_enqueue` for asyncio clients."""
    started = time.perf_counter()
    for count in _calls(n, batch):
        if batch <= 1:
            await send_one(0.0)
        else:
            await send_many(count)
    emit({"seconds": time.perf_counter() - started, "n": n, "batch": batch})


#: Seconds between the untimed first send of ``paced_send`` and its timed ones:
#: the workers run the warm-up job and go idle again.
WARM_UP_PAUSE = 1.0
#: Seconds ``paced_send`` waits after its last send, so that the sender's exit
#: (closing connections, tearing the interpreter down) does not compete for the
#: CPU with the last jobs' pickups.
TAIL_PAUSE = 0.5


class _Pace:
    """The fixed schedule of a paced send: send ``i`` is due ``i / rate`` seconds after the start."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.start = time.perf_counter()
        self.late = 0  # sends that went out more than one interval after they were due

    def wait(self, i: int) -> float:
        """Seconds to sleep before send ``i`` (0 when it is due or overdue: no sleep then)."""
        late = time.perf_counter() - (self.start + i * self.interval)
        if late > self.interval:
            self.late += 1
        return max(-late, 0.0)

    def result(self, n: int, warm_up: bool) -> dict[str, object]:
        return {"seconds": time.perf_counter() - self.start, "n": n, "late": self.late, "warm_up": int(warm_up)}


def paced_send(n: int, rate: float, send_one: Callable[[float], object], *, warm_up: bool = True) -> None:
    """Send ``n`` jobs at ``rate`` per second, each stamped just before its send call.

    With ``warm_up``, one untimed job (``sent`` = 0) goes first: a client's first
    call pays for what later ones reuse (a lazily opened connection, a statement
    prepared on first use, caches filled), which is not the queue's pickup
    latency. Emits ``warm_up``, the number of such jobs, for the caller's count."""
    if warm_up:
        send_one(0.0)
        time.sleep(WARM_UP_PAUSE)
    pace = _Pace(rate)
    for i in range(n):
        if (pause := pace.wait(i)) > 0:
            time.sleep(pause)
        send_one(time.time())
    result = pace.result(n, warm_up)
    time.sleep(TAIL_PAUSE)
    emit(result)


async def apaced_send(n: int, rate: float, send_one: Callable[[float], Awaitable[object]]) -> None:
    """:func:`paced_send` for asyncio clients (warm-up job included)."""
    await send_one(0.0)
    await asyncio.sleep(WARM_UP_PAUSE)
    pace = _Pace(rate)
    for i in range(n):
        if (pause := pace.wait(i)) > 0:
            await asyncio.sleep(pause)
        await send_one(time.time())
    result = pace.result(n, True)
    await asyncio.sleep(TAIL_PAUSE)
    emit(result)
