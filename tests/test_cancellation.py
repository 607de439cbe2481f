"""The Cancellation middleware's interrupts against the moments Dramatiq's worker can be in.

A real Dramatiq ``Worker`` on a ``StubBroker``: the windows these tests open (an interrupt
arriving after the actor raised, the same message id held twice by one process) are a few
bytecodes wide in a real worker process, so each is forced here by running the cancel from
inside the moment it concerns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import dramatiq
import pytest
from dramatiq.broker import MessageProxy
from dramatiq.brokers.stub import StubBroker

from tasks.errors import Cancelled
from tasks.middleware.cancellation import Cancellation


class _Outcomes(dramatiq.Middleware):
    """Records each processed message's outcome as Dramatiq's after hooks report it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.done = threading.Condition()

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        with self.done:
            self.seen.append((message.actor_name, type(exception).__name__ if exception else None))
            self.done.notify_all()

    def wait_for(self, count: int) -> list[tuple[str, str | None]]:
        with self.done:
            assert self.done.wait_for(lambda: len(self.seen) >= count, timeout=30), self.seen
            return list(self.seen)


@pytest.fixture
def stub() -> Iterator[tuple[StubBroker, Cancellation, _Outcomes]]:
    outcomes = _Outcomes()
    broker = StubBroker(middleware=[outcomes])
    cancellation = Cancellation()
    broker.add_middleware(cancellation)
    yield broker, cancellation, outcomes
    broker.close()


def test_a_cancel_arriving_after_the_actor_raised_leaves_the_failure_and_the_thread_alone(
    stub: tuple[StubBroker, Cancellation, _Outcomes], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker, cancellation, outcomes = stub
    died: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_type.__name__))

    # Given an operator's cancel that reaches the worker just after the actor raised, while
    # Dramatiq's worker records the exception (an interrupt there is outside every handler)
    stuff_exception = MessageProxy.stuff_exception

    def cancel_while_recording(self: MessageProxy, exception: BaseException) -> None:
        if isinstance(exception, ValueError):
            canceller = threading.Thread(target=cancellation.cancel, args=([self],))
            canceller.start()
            canceller.join()
        stuff_exception(self, exception)

    monkeypatch.setattr(MessageProxy, "stuff_exception", cancel_while_recording)

    @dramatiq.actor(broker=broker, actor_name="fails")
    def fails() -> None:
        raise ValueError("the actor's own failure")

    @dramatiq.actor(broker=broker, actor_name="after")
    def after() -> None:
        pass

    worker = dramatiq.Worker(broker, worker_threads=1, worker_timeout=50)
    worker.start()
    try:
        # When the job runs, then another one on the same (only) thread
        fails.send()
        outcomes.wait_for(1)
        after.send()
        seen = outcomes.wait_for(2)
    finally:
        worker.stop()
    # Then the attempt ends with the actor's failure, recorded by the after hooks, the thread
    # survives to run the next job, and nothing escaped a worker thread
    assert seen == [("fails", "ValueError"), ("after", None)]
    assert died == []


def test_the_same_message_running_twice_in_a_process_stays_cancellable_when_the_stale_run_ends(
    stub: tuple[StubBroker, Cancellation, _Outcomes],
) -> None:
    broker, cancellation, _ = stub
    entered = threading.Event()
    outcome: list[str] = []

    @dramatiq.actor(broker=broker, actor_name="long")
    def long() -> None:
        entered.set()
        stop = threading.Event()
        while not stop.wait(0.01):  # interruptible between waits, as a real job's Python is
            if len(outcome) > 0:
                return

    message = long.message()
    # Given one process holding the same message twice: a run whose lease expired (stale)
    # and the run that claimed it again (live), each on a thread of its own
    stale, live = MessageProxy(message), MessageProxy(message)
    cancellation.before_process_message(broker, stale)

    def run_live() -> None:
        cancellation.before_process_message(broker, live)
        try:
            broker.actors["long"].fn()
            outcome.append("finished")
        except Cancelled:
            outcome.append("cancelled")

    thread = threading.Thread(target=run_live)
    thread.start()
    try:
        assert entered.wait(30)
        # When the stale run finishes, and then an operator cancels the job
        cancellation.after_process_message(broker, stale)
        cancellation.cancel([live])
        thread.join(30)
    finally:
        outcome.append("gave up")  # ends the actor's loop if nothing interrupted it
        thread.join(30)
    # Then the live run is interrupted
    assert outcome[0] == "cancelled"


def test_a_cancel_between_the_hand_over_and_the_actors_function_refuses_the_function(
    stub: tuple[StubBroker, Cancellation, _Outcomes],
) -> None:
    broker, cancellation, _ = stub
    ran: list[str] = []

    @dramatiq.actor(broker=broker, actor_name="quick")
    def quick() -> None:
        ran.append("ran")

    proxy = MessageProxy(quick.message())
    outcome: list[str] = []

    def process() -> None:
        # Given a message its worker thread has begun (the before hooks ran)
        cancellation.before_process_message(broker, proxy)
        # When the cancel arrives before the thread enters the actor's function
        cancellation.cancel([proxy])
        try:
            broker.actors["quick"].fn()
            outcome.append("ran")
        except Cancelled as exc:
            outcome.append(str(exc))
        cancellation.after_process_message(broker, proxy)

    thread = threading.Thread(target=process)
    thread.start()
    thread.join(30)
    # Then the function is refused, not started
    assert outcome == ["cancelled before it started"]
    assert ran == []


def _frame_name(ident: int | None) -> str:
    """The function thread ``ident`` is in. With garbage collection off: a collection that
    runs inside ``sys._current_frames()`` and frees an object holding a ``threading.local``
    deadlocks the interpreter on CPython before 3.11.9 (gh-106883; it hung a full run here:
    ``local_clear`` waiting for the runtime's head lock that ``_PyThread_CurrentFrames`` held)."""
    import gc
    import sys

    assert ident is not None
    collecting = gc.isenabled()
    gc.disable()
    try:
        return sys._current_frames()[ident].f_code.co_name
    finally:
        if collecting:
            gc.enable()


def test_a_cancel_landing_as_an_actor_called_by_another_returns_cancels_the_job(
    stub: tuple[StubBroker, Cancellation, _Outcomes],
) -> None:
    import time

    from dramatiq.middleware.threading import raise_thread_exception

    broker, cancellation, _ = stub
    go, returned = threading.Event(), threading.Event()

    @dramatiq.actor(broker=broker, actor_name="inner")
    def inner() -> str:
        go.wait(30)
        returned.set()
        return "inner"

    @dramatiq.actor(broker=broker, actor_name="outer")
    def outer() -> str:
        return inner() + " via outer"  # one actor calling another directly

    # (the inner actor's function is wrapped once one of its messages has started here)
    warm = MessageProxy(inner.message())
    cancellation.before_process_message(broker, warm)
    cancellation.after_process_message(broker, warm)
    proxy = MessageProxy(outer.message())
    outcome: list[str] = []

    def process() -> None:
        cancellation.before_process_message(broker, proxy)
        try:
            outcome.append(broker.actors["outer"].fn())
        except BaseException as exc:  # what escapes is what this test is about
            outcome.append(type(exc).__name__)
        cancellation.after_process_message(broker, proxy)

    thread = threading.Thread(target=process)
    thread.start()
    # Given the inner actor returning while an operator's cancel holds the middleware's lock
    # (so the interrupt lands as the inner wrapper takes the lock to leave)
    with cancellation._lock:
        go.set()
        deadline = time.monotonic() + 30
        while not (returned.is_set() and _frame_name(thread.ident) == "run"):
            assert time.monotonic() < deadline, "the inner actor did not return"
            time.sleep(0.001)
        proxy.cancel_requested = True
        raise_thread_exception(thread.ident, Cancelled)
    thread.join(30)
    # Then the job is cancelled (not failed by a bookkeeping error, which would be retried),
    # and the thread is left counted in no actor's function
    assert outcome == ["Cancelled"]
    assert cancellation._in_actor == {}
