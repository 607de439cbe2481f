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

What it cannot do, and what goes with it (a helper's review, with repros):

- Stage 1 cannot interrupt a call into libpq waiting on the server (a lock wait): libpq
  retries the interrupted system call in C, so the signal's handler runs only when it
  returns. Such a hang ends at stage 2.
- Under xdist, a worker ended by stage 2 must not be replaced: xdist 3.8's ``loadfile``
  scheduler hands the new worker the crashed one's whole workload again, files it had
  finished included, and the session then waits for ever (pytest-dev/pytest-xdist#1323).
  ``--max-worker-restart=0`` in pyproject's ``addopts``: the other worker runs what is left.
- pytest's faulthandler plugin cancels any ``dump_traceback_later`` timer when a phase
  fails, stage 1's own failure included; stage 2 is armed again after it
  (``pytest_exception_interact``), for what is left of the test's time. Its
  ``faulthandler_timeout`` setting would replace stage 2's timer: refused.
- An exception raised by the handler inside the suite's ``EnvironmentGuard`` could leave
  its lock held or its counts wrong, and every later test slow: the handler then tries
  again a millisecond later (the guard's own waits end within 30 s).
- A process forked by a test gets SIGALRM's default action back, as it would have had.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
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
        self.deadline: float | None = None  # (time.monotonic) when stage 2 ends the process

    def _alarm(self, signum: int, frame: FrameType | None) -> None:
        if _inside_environment_guard(frame):
            signal.setitimer(signal.ITIMER_REAL, 0.001)
            return
        test = self.running or "a test"
        os.write(self.stderr_fd, f"\n{test} still running after {self.timeout:g} s; every thread:\n".encode())
        faulthandler.dump_traceback(file=self.stderr_fd, all_threads=True)
        pytest.fail(
            f"{test} still running after {self.timeout:g} s (CONTROLPLANE_TEST_TIMEOUT); stacks on stderr",
            pytrace=False,
        )

    def _arm_exit(self) -> None:
        assert self.deadline is not None
        left = max(self.deadline - time.monotonic(), 0.1)
        faulthandler.dump_traceback_later(left, exit=True, file=self.stderr_fd)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
        self.running = item.nodeid
        self.deadline = time.monotonic() + self.timeout + self.grace
        previous = signal.signal(signal.SIGALRM, self._alarm)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        self._arm_exit()
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
            signal.setitimer(signal.ITIMER_REAL, 0)
            # (None: a handler not installed from Python, which cannot be put back from it)
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
            self.running = self.deadline = None

    @pytest.hookimpl(trylast=True)
    def pytest_exception_interact(self) -> None:
        # pytest's faulthandler plugin has just cancelled stage 2's timer (a phase failed)
        if self.deadline is not None:
            self._arm_exit()


def _inside_environment_guard(frame: FrameType | None) -> bool:
    """Whether ``frame`` or a caller of it runs the suite's ``EnvironmentGuard``
    (``tests.support``; by name: a signal handler imports nothing)."""
    while frame is not None:
        code, module = frame.f_code, frame.f_globals.get("__name__")
        if code.co_qualname.startswith("EnvironmentGuard.") and module == "tests.support":
            return True
        frame = frame.f_back
    return False


def install(config: pytest.Config) -> None:
    """Register the guard as a plugin, unless ``CONTROLPLANE_TEST_TIMEOUT`` is 0. Call it from
    ``pytest_configure``: by then pytest has stopped capturing the standard error it copies."""
    timeout = _seconds("CONTROLPLANE_TEST_TIMEOUT", DEFAULT_TIMEOUT)
    if timeout == 0:
        return
    grace = _seconds("CONTROLPLANE_TEST_TIMEOUT_GRACE", DEFAULT_GRACE)
    if float(config.getini("faulthandler_timeout") or 0) > 0:
        raise pytest.UsageError(
            "faulthandler_timeout would replace the hang guard's timer (tests/hang_guard.py): "
            "set CONTROLPLANE_TEST_TIMEOUT instead"
        )
    stream = sys.__stderr__
    assert stream is not None, "the hang guard needs a standard error to write stacks to"
    config.pluginmanager.register(HangGuard(timeout, grace, os.dup(stream.fileno())), "controlplane-hang-guard")
    os.register_at_fork(after_in_child=_default_alarm)


def _default_alarm() -> None:
    # (a test's forked child that sets an alarm to end itself gets the end it asked for)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
