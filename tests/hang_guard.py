"""A guard that ends a hung test instead of letting it hold the suite forever.

``install(config)`` from a ``pytest_configure`` hook (``tests/conftest.py`` calls it).

Two stages, both armed when a test's setup starts and cancelled when its teardown ends:

1. After ``CONTROLPLANE_TEST_TIMEOUT`` seconds (300 unless set; 0 turns the guard off),
   SIGALRM prints every thread's stack and fails the test from the main thread, and the
   suite goes on with the next test.
2. ``CONTROLPLANE_TEST_TIMEOUT_GRACE`` seconds later (60 unless set), if the test has
   still not ended, faulthandler's own thread prints every stack and ends the process
   (exit status 1; under xdist the worker is reported crashed while running the test).
   This stage needs no Python code to run in any thread: it ends hangs in which the main
   thread cannot take the signal, such as a thread holding the GIL while it waits for a
   lock (CPython gh-106883, seen in this suite on 3.11.7).

The stacks are written with faulthandler, which reads them without calling into Python,
to a copy of the standard error taken before pytest captures it. The limit is a guard
against hangs, not a measure of speed: the slowest test takes about 20 s here.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

import pytest

DEFAULT_TIMEOUT = 300.0
DEFAULT_GRACE = 60.0


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name) or ""
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        raise pytest.UsageError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise pytest.UsageError(f"{name} must not be negative, got {raw!r}")
    return value


class HangGuard:
    def __init__(self, timeout: float, grace: float, stderr_fd: int) -> None:
        self.timeout = timeout
        self.grace = grace
        self.stderr_fd = stderr_fd
        self.running: str | None = None

    def _alarm(self, signum: int, frame: FrameType | None) -> None:
        test = self.running or "a test"
        os.write(self.stderr_fd, f"\n{test} still running after {self.timeout:g} s; every thread:\n".encode())
        faulthandler.dump_traceback(file=self.stderr_fd, all_threads=True)
        pytest.fail(
            f"{test} still running after {self.timeout:g} s (CONTROLPLANE_TEST_TIMEOUT); stacks on stderr",
            pytrace=False,
        )

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
        self.running = item.nodeid
        previous = signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        faulthandler.dump_traceback_later(self.timeout + self.grace, exit=True, file=self.stderr_fd)
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
            signal.setitimer(signal.ITIMER_REAL, 0)
            # (None: a handler not installed from Python, which cannot be put back from it)
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
            self.running = None


def install(config: pytest.Config) -> None:
    """Register the guard as a plugin, unless ``CONTROLPLANE_TEST_TIMEOUT`` is 0. Call it from
    ``pytest_configure``: by then pytest has stopped capturing the standard error it copies."""
    timeout = _seconds("CONTROLPLANE_TEST_TIMEOUT", DEFAULT_TIMEOUT)
    if timeout == 0:
        return
    grace = _seconds("CONTROLPLANE_TEST_TIMEOUT_GRACE", DEFAULT_GRACE)
    stream = sys.__stderr__
    assert stream is not None, "the hang guard needs a standard error to write stacks to"
    config.pluginmanager.register(HangGuard(timeout, grace, os.dup(stream.fileno())), "controlplane-hang-guard")
