"""Actors the end-to-end tests run in real worker processes.

Each records what it did in ``test_support.effects`` (same database), so that a
test can check from SQL what ran, how often, and in which process.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time

import dramatiq
from dramatiq.middleware import CurrentMessage
from dramatiq.rate_limits import ConcurrentRateLimiter

import tasks
from tasks.errors import PermanentError
from tests.effects import gate_open, record


@dramatiq.actor(actor_name="tests.noop", store_results=True)
def noop(value: object = None) -> object:
    record("noop")
    return value


#: A file name that is not UTF-8, as os.listdir() decodes it (an unpaired surrogate).
NOT_UTF8_NAME = b"report-\xff.csv".decode("utf-8", "surrogateescape")

#: Return values that jsonb cannot hold (NaN, a NUL, an unpaired surrogate) and one that only looks like a NUL.
AWKWARD_RESULTS = {"nan": float("nan"), "nul": "a\x00b", "surrogate": NOT_UTF8_NAME, "escaped": "C:\\u0000 is text"}


@dramatiq.actor(actor_name="tests.returns_awkward", store_results=True, max_attempts=1)
def returns_awkward(kind: str) -> object:
    record("returns_awkward", kind)
    return AWKWARD_RESULTS[kind]


@dramatiq.actor(actor_name="tests.wait_for_gate", max_attempts=3)
def wait_for_gate(name: str) -> str:
    """Runs until a test opens the gate (a row in test_support.gates)."""
    record("started", name)
    while not gate_open(name):
        time.sleep(0.05)
    record("finished", name)
    return name


@dramatiq.actor(actor_name="tests.always_fails", max_attempts=3, min_backoff=200, max_backoff=1000)
def always_fails(reason: str) -> None:
    record("attempt", reason)
    raise RuntimeError(f"failed on purpose: {reason}")


def _two_retries(retries: int, exception: BaseException) -> bool:
    return retries < 2


@dramatiq.actor(actor_name="tests.retried_when", retry_when=_two_retries, min_backoff=50, max_backoff=100)
def retried_when(reason: str) -> None:
    record("attempt", reason)
    raise RuntimeError(f"failed on purpose: {reason}")


@dramatiq.actor(actor_name="tests.fails_then_succeeds", max_attempts=5, min_backoff=100, max_backoff=400)
def fails_then_succeeds(times: int) -> str:
    message = CurrentMessage.get_current_message()
    retries = int(message.options.get("retries", 0)) if message else 0
    record("attempt", str(retries))
    if retries < times:
        raise ConnectionError(f"transient failure {retries + 1} of {times}")
    return "ok"


@dramatiq.actor(actor_name="tests.permanent", max_attempts=5, min_backoff=100)
def permanent() -> None:
    record("attempt")
    raise PermanentError("the input can never work")


@dramatiq.actor(actor_name="tests.fails_with_a_nul", max_attempts=1)
def fails_with_a_nul() -> None:
    raise PermanentError("a driver quoted raw bytes: \x00\x01 and went on")


#: What a driver's error might quote: a URL with its password.
LEAKY_ERROR = "could not connect to postgresql://admin:hunter2@db.internal/prod"


@dramatiq.actor(actor_name="tests.callback_sink")
def callback_sink(message: object, info: object) -> None:
    record("callback")


@dramatiq.actor(actor_name="tests.keyed_sink", unique_key_from=lambda args, kwargs: "tests.keyed_sink")
def keyed_sink(message: object, info: object) -> None:
    record("callback")


@dramatiq.actor(actor_name="tests.fails_quoting_a_password", max_attempts=2, min_backoff=50, max_backoff=100,
                on_retry_exhausted="tests.callback_sink", on_failure="tests.callback_sink")
def fails_quoting_a_password() -> None:
    record("attempt")
    raise RuntimeError(LEAKY_ERROR)


@dramatiq.actor(actor_name="tests.fails_with_a_surrogate", max_attempts=1)
def fails_with_a_surrogate() -> None:
    raise PermanentError(f"cannot open {NOT_UTF8_NAME}")


@dramatiq.actor(actor_name="tests.too_slow", time_limit=300, max_attempts=1)
def too_slow() -> None:
    record("attempt")
    for _ in range(200):
        time.sleep(0.05)


@dramatiq.actor(actor_name="tests.quick_with_a_time_limit", time_limit=1000, max_attempts=2, min_backoff=50,
                max_backoff=100, store_results=True)
def quick_with_a_time_limit() -> str:
    record("attempt")
    return "done"


@dramatiq.actor(actor_name="tests.returns_a_datetime", store_results=True, max_attempts=1)
def returns_a_datetime() -> object:
    import datetime

    return {"at": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)}


@dramatiq.actor(actor_name="tests.holds_the_gil", max_attempts=1)
def holds_the_gil(seconds: int) -> None:
    """Hold the GIL ``seconds`` in one call into C (libc's ``sleep`` through ``ctypes.PyDLL``, which
    keeps it, as a backtracking regex or a huge sort does): no other thread of its process runs."""
    record("holds_the_gil", str(seconds))
    ctypes.PyDLL(None).sleep(seconds)
    time.sleep(1)  # (then a second in Python: its claim still held when the other threads run again)


@dramatiq.actor(actor_name="tests.sleeps_then_holds_the_gil", max_attempts=1)
def sleeps_then_holds_the_gil(sleep: float, seconds: int) -> None:
    """Sleep ``sleep`` s (its worker heartbeats meanwhile), then hold the GIL ``seconds`` in one call into C."""
    record("sleeps_then_holds_the_gil", str(seconds))
    time.sleep(sleep)
    ctypes.PyDLL(None).sleep(seconds)


@dramatiq.actor(actor_name="tests.forks_a_sleeper", max_attempts=1)
def forks_a_sleeper(seconds: int) -> None:
    """Fork a child that sleeps ``seconds`` (as ``multiprocessing``'s fork does: it inherits the
    worker process's open files) and records its pid."""
    pid = os.fork()
    if pid == 0:
        time.sleep(seconds)
        os._exit(0)
    record("forks_a_sleeper", str(pid))


@dramatiq.actor(actor_name="tests.slow_noop", queue_name="slow")
def slow_noop(seconds: float) -> None:
    record("started")
    time.sleep(seconds)
    record("finished")


#: A distributed mutex on control_plane.rate_limits: one tests.limited job at a time, across processes.
LIMITED_MUTEX = ConcurrentRateLimiter(tasks.rate_limiter_backend, "tests.limited", limit=1, ttl=60_000)


@dramatiq.actor(actor_name="tests.limited", max_attempts=100, min_backoff=50, max_backoff=300)
def limited(seconds: float) -> None:
    """Holds the mutex for ``seconds``; when another job holds it, RateLimitExceeded retries this one."""
    with LIMITED_MUTEX.acquire():
        record("started")
        time.sleep(seconds)  # the work: long enough for the other process to try the mutex
        record("finished")


@dramatiq.actor(actor_name="tests.group_done")
def group_done(label: str) -> None:
    """A group's completion callback."""
    record("group_done", label)


@dramatiq.actor(actor_name="tests.async_double", store_results=True)
async def async_double(x: int) -> dict[str, object]:
    """An ``async def`` actor (Dramatiq's AsyncIO, on by default here)."""
    await asyncio.sleep(0)
    message = CurrentMessage.get_current_message()
    logging.getLogger("tests.actors").info("async_double of %d", x)
    return {"double": x * 2, "message_id": message.message_id if message else None}


@dramatiq.actor(actor_name="tests.async_slow_to_stop", max_attempts=3, min_backoff=100, store_results=True,
                on_final_failure="tests.callback_sink")  # fmt: skip
async def async_slow_to_stop(name: str) -> None:
    """Waits for a gate; cancelled, its clean-up takes longer than the second Dramatiq gives a
    coroutine to stop (its worker thread then raises a RuntimeError from the interrupt)."""
    record("started", name)
    try:
        while not gate_open(name):
            await asyncio.sleep(0.05)
    finally:
        await asyncio.sleep(5)
