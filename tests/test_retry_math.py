"""Retry policy arithmetic under a frozen clock: max_attempts, exponential backoff, permanent errors."""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from freezegun import freeze_time

from tasks.errors import PermanentError, TransientError
from tasks.middleware.retries import UNLIMITED_ATTEMPTS, Retries, max_attempts_for


class RecordingBroker(StubBroker):
    def __init__(self) -> None:
        super().__init__(middleware=[Retries(max_retries=19, min_backoff=1000, max_backoff=30_000)])
        self.delays: list[int | None] = []

    def enqueue(self, message: Any, *, delay: int | None = None) -> Any:
        self.delays.append(delay)
        return message


def fail(broker: RecordingBroker, message: Any, exc: BaseException) -> None:
    for m in broker.middleware:
        m.after_process_message(broker, message, exception=exc)


@freeze_time("2026-11-24 12:00:00")
def test_backoff_doubles_within_dramatiqs_bounds_and_stamps_the_frozen_clock() -> None:
    # Given an actor allowed 6 attempts, with a 1 s minimum backoff
    broker = RecordingBroker()

    @dramatiq.actor(broker=broker, actor_name="math.flaky", max_attempts=6, min_backoff=1000, max_backoff=30_000)
    def flaky() -> None: ...

    proxy = dramatiq.MessageProxy(flaky.message())
    # When it fails six times
    for _ in range(6):
        fail(broker, proxy, RuntimeError("boom"))
    # Then five retries were scheduled, each delay in [b/2, b] with b = 1000 * 2^n, capped at 30 s
    assert len(broker.delays) == 5
    for n, delay in enumerate(broker.delays, start=1):
        upper = min(1000 * 2**n, 30_000)
        assert delay is not None and upper // 2 <= delay <= upper, (n, delay)
    # And the sixth failure failed the message for good, stamped with the frozen clock
    assert proxy.failed
    assert proxy.options["retries"] == 6
    assert proxy.options["requeue_timestamp"] == 1_795_521_600_000


def test_a_permanent_error_is_never_retried() -> None:
    broker = RecordingBroker()

    @dramatiq.actor(broker=broker, actor_name="math.permanent", max_attempts=5)
    def permanent() -> None: ...

    proxy = dramatiq.MessageProxy(permanent.message())
    fail(broker, proxy, PermanentError("never"))
    assert proxy.failed and broker.delays == []


def test_max_attempts_precedence() -> None:
    broker = RecordingBroker()

    @dramatiq.actor(broker=broker, actor_name="math.a", max_attempts=4)
    def a() -> None: ...

    @dramatiq.actor(broker=broker, actor_name="math.b", max_retries=2)
    def b() -> None: ...

    @dramatiq.actor(broker=broker, actor_name="math.c")
    def c() -> None: ...

    assert max_attempts_for(broker, a.message()) == 4
    assert max_attempts_for(broker, a.message_with_options(max_attempts=9)) == 9
    assert max_attempts_for(broker, b.message()) == 3
    assert max_attempts_for(broker, c.message()) == 20


def test_max_retries_none_retries_forever_as_in_dramatiq_and_says_so_in_a_number() -> None:
    # Given actors with Dramatiq's "retry forever", as an actor option and as a message option
    broker = RecordingBroker()

    @dramatiq.actor(broker=broker, actor_name="math.forever", max_retries=None, min_backoff=1, max_backoff=2)
    def forever() -> None: ...

    @dramatiq.actor(broker=broker, actor_name="math.bounded", max_attempts=2, min_backoff=1, max_backoff=2)
    def bounded() -> None: ...

    for message in (forever.message(), bounded.message_with_options(max_retries=None)):
        # Then the jobs row's number is the unlimited one, not the default of 20
        assert max_attempts_for(broker, message) == UNLIMITED_ATTEMPTS
        proxy = dramatiq.MessageProxy(message)
        # And when it fails past the default's 20 attempts, every failure is retried
        broker.delays.clear()
        for _ in range(25):
            fail(broker, proxy, RuntimeError("boom"))
        assert not proxy.failed and len(broker.delays) == 25, message.options


def test_attempts_beyond_the_jobs_rows_integer_are_the_unlimited_number() -> None:
    broker = RecordingBroker()

    @dramatiq.actor(broker=broker, actor_name="math.huge", max_attempts=2**40)
    def huge() -> None: ...

    assert max_attempts_for(broker, huge.message()) == UNLIMITED_ATTEMPTS
    assert max_attempts_for(broker, huge.message_with_options(max_retries=2**40)) == UNLIMITED_ATTEMPTS


def test_retry_when_decides_and_the_row_says_unlimited_unless_max_attempts_bounds_it() -> None:
    # Given actors whose retry_when retries every failure: one bounded by an explicit max_attempts
    broker = RecordingBroker()
    exhausted: list[dict[str, Any]] = []

    @dramatiq.actor(broker=broker, actor_name="math.exhausted")
    def on_exhausted(message: dict[str, Any], info: dict[str, Any]) -> None: ...

    def always(retries: int, exception: BaseException) -> bool:
        return True

    @dramatiq.actor(broker=broker, actor_name="math.decided", retry_when=always, min_backoff=1, max_backoff=2)
    def decided() -> None: ...

    @dramatiq.actor(broker=broker, actor_name="math.capped", retry_when=always, max_attempts=3, max_retries=50,
                    min_backoff=1, max_backoff=2, on_retry_exhausted="math.exhausted")  # fmt: skip
    def capped() -> None: ...

    broker.enqueue = lambda message, *, delay=None: (  # type: ignore[method-assign]
        exhausted.append(message.args[1]) if message.actor_name == "math.exhausted" else broker.delays.append(delay)
    )
    # Then the unbounded one's jobs row says unlimited, not the default of 20 it would not obey
    assert max_attempts_for(broker, decided.message()) == UNLIMITED_ATTEMPTS
    assert max_attempts_for(broker, decided.message_with_options(max_retries=2)) == UNLIMITED_ATTEMPTS
    # And it is retried past 20 failures, as Dramatiq's retry_when would
    proxy = dramatiq.MessageProxy(decided.message())
    for _ in range(25):
        fail(broker, proxy, RuntimeError("boom"))
    assert not proxy.failed and len(broker.delays) == 25
    # And the bounded one says 3 and fails on its third failure, with on_retry_exhausted told
    assert max_attempts_for(broker, capped.message()) == 3
    assert max_attempts_for(broker, capped.message_with_options(max_attempts=2)) == 2
    broker.delays.clear()
    proxy = dramatiq.MessageProxy(capped.message())
    for _ in range(3):
        fail(broker, proxy, RuntimeError("boom"))
    assert proxy.failed and len(broker.delays) == 2
    assert proxy.options["retries"] == 3
    assert exhausted == [{"retries": 2, "max_retries": 2}]


def test_a_retry_when_that_declines_fails_the_job_before_its_max_attempts() -> None:
    broker = RecordingBroker()

    @dramatiq.actor(broker=broker, actor_name="math.choosy", max_attempts=10, min_backoff=1, max_backoff=2,
                    retry_when=lambda retries, exception: isinstance(exception, ConnectionError))  # fmt: skip
    def choosy() -> None: ...

    proxy = dramatiq.MessageProxy(choosy.message())
    fail(broker, proxy, ConnectionError("flaky"))
    assert not proxy.failed and len(broker.delays) == 1
    fail(broker, proxy, ValueError("bad input"))
    assert proxy.failed and len(broker.delays) == 1


def test_a_thrown_exception_on_the_last_attempt_of_a_bounded_retry_when_fails_quietly() -> None:
    # Given a retry_when actor bounded to 2 attempts, whose throws lists ValueError
    broker = RecordingBroker()
    exhausted: list[Any] = []

    @dramatiq.actor(broker=broker, actor_name="math.exhausted_too")
    def on_exhausted(message: dict[str, Any], info: dict[str, Any]) -> None: ...

    @dramatiq.actor(broker=broker, actor_name="math.throwing", retry_when=lambda r, e: True, max_attempts=2,
                    throws=(ValueError,), min_backoff=1, on_retry_exhausted="math.exhausted_too")  # fmt: skip
    def throwing() -> None: ...

    broker.enqueue = lambda message, *, delay=None: exhausted.append(message)  # type: ignore[method-assign]
    proxy = dramatiq.MessageProxy(throwing.message())
    fail(broker, proxy, RuntimeError("retried"))
    # When its last attempt raises the thrown exception
    fail(broker, proxy, ValueError("expected"))
    # Then it fails as Dramatiq fails a thrown exception, on any attempt: quietly, no hook
    assert proxy.failed
    assert [m.actor_name for m in exhausted] == ["math.throwing"]  # the first failure's retry only


def test_a_transient_errors_retry_after_is_the_least_the_next_attempt_waits_up_to_max_backoff() -> None:
    # Given an actor with a 1 s minimum and a 30 s maximum backoff
    broker = RecordingBroker()

    @dramatiq.actor(broker=broker, actor_name="math.throttled", max_attempts=6, min_backoff=1000, max_backoff=30_000)
    def throttled() -> None: ...

    proxy = dramatiq.MessageProxy(throttled.message())
    # When a service asks it to come back in 20 s, then in an hour, then says nothing
    fail(broker, proxy, TransientError("HTTP 429", retry_after=20))
    fail(broker, proxy, TransientError("HTTP 429", retry_after=3600))
    fail(broker, proxy, TransientError("HTTP 503"))
    # Then the first retry waits the 20 s (Dramatiq's backoff would be 1-2 s), the second the
    # actor's max_backoff, and the third Dramatiq's own backoff for its third retry (at most 8 s)
    assert broker.delays[:2] == [20_000, 30_000]
    assert broker.delays[2] is not None and broker.delays[2] <= 8_000
    assert not proxy.failed
