"""Dramatiq's Retries, plus ``max_attempts`` and permanent errors.

``max_attempts`` (per actor or per message) counts every attempt, the first
included: ``max_attempts=3`` is Dramatiq's ``max_retries=2``. Any
:class:`tasks.errors.PermanentError` fails the job at once, with no retry,
whether or not the actor lists it in ``throws``; a :class:`tasks.errors.Cancelled`
interrupt is never retried either. Under an actor's ``retry_when`` the predicate
decides, as in Dramatiq, and only an explicit ``max_attempts`` bounds it too.
An attempt whose worker was lost counts as one: the jobs mirror's count of the
job's attempts is read when an attempt fails (Dramatiq counts only the failures).

``on_final_failure`` (an actor name, per actor or per message) is sent once
when a job fails for good, permanent error or retries spent (Dramatiq's
``on_failure`` fires on every failed attempt), and when the reaper ends a job
whose worker died on its last attempt (``worker_lost_hooks``). It receives
``{"message_id", "actor_name", "args", "kwargs"}`` and ``{"type", "message"}``,
the message redacted, never the traceback.

Dramatiq's Retries writes the attempt's traceback into the message's options
(``traceback``), which travel with the retried message and in the message
Dramatiq's ``on_retry_exhausted`` sends; both are stored in PostgreSQL. The
traceback is redacted (:func:`tasks.redaction.redact`) and made storable (a NUL
as ``\\x00``, an unpaired surrogate as U+FFFD) before either sees it, as every
error text is.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

import dramatiq
from dramatiq.common import compute_backoff
from dramatiq.middleware import retries as dramatiq_retries

from tasks.db import loggable_error
from tasks.errors import Cancelled, PermanentError, TransientError
from tasks.redaction import persistable
from tasks.settings import UNLIMITED_ATTEMPTS as UNLIMITED_ATTEMPTS

logger = logging.getLogger(__name__)


class _RedactedTracebacks:
    """Dramatiq's Retries' view of the ``traceback`` module: ``format_exc`` redacted.

    ``dramatiq.middleware.retries`` calls ``traceback.format_exc(limit=30)`` and puts the
    text in the message's options before it re-enqueues the message or sends it to
    ``on_retry_exhausted``, with nothing between the two for a subclass to hook into.
    """

    def format_exc(self, limit: int | None = None, chain: bool = True) -> str:
        return persistable(traceback.format_exc(limit, chain))

    def __getattr__(self, name: str) -> Any:
        return getattr(traceback, name)


_TRACEBACKS = _RedactedTracebacks()
setattr(dramatiq_retries, "traceback", _TRACEBACKS)  # noqa: B010 (Dramatiq does not export it)


def _as_attempts(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _from_retries(options: dict[str, Any]) -> int | None:
    """Attempts from Dramatiq's ``max_retries`` in ``options``: its value plus the first
    attempt; an explicit ``None`` is Dramatiq's "retry forever"; None when it is not set."""
    if "max_retries" not in options:
        return None
    if options["max_retries"] is None:
        return UNLIMITED_ATTEMPTS
    retries = _as_attempts(options["max_retries"])
    return None if retries is None else retries + 1


def max_attempts_for(broker: dramatiq.Broker, message: Any) -> int:
    """How many attempts ``message`` gets: message options, then actor options, then the default;
    ``max_retries=None`` (Dramatiq's "retry forever") gets :data:`UNLIMITED_ATTEMPTS`.

    Under ``retry_when`` the predicate decides, as in Dramatiq, where it takes precedence over
    ``max_retries``: only an explicit ``max_attempts`` bounds such a job, else it gets
    :data:`UNLIMITED_ATTEMPTS` (the default of 20 would be a number the job does not obey)."""
    options = message.options
    actor = broker.actors.get(message.actor_name)
    decided = retry_when_of(broker, actor) is not None
    found = _as_attempts(options.get("max_attempts"))
    if found is None and not decided:
        found = _from_retries(options)
    if found is None and actor is not None:
        found = _as_attempts(actor.options.get("max_attempts"))
        if found is None and not decided:
            found = _from_retries(actor.options)
    if found is None:
        found = UNLIMITED_ATTEMPTS if decided else default_attempts(broker)
    return min(max(found or 1, 1), UNLIMITED_ATTEMPTS)  # more would not fit the jobs row's int


def _retries_middleware(broker: dramatiq.Broker) -> dramatiq_retries.Retries | None:
    """The broker's Retries middleware (Dramatiq's or this one), if it has one."""
    return next((m for m in broker.middleware if isinstance(m, dramatiq_retries.Retries)), None)


def retry_when_of(broker: dramatiq.Broker, actor: Any) -> Any:
    """The ``retry_when`` predicate Dramatiq's Retries applies to ``actor``'s failures (the
    actor's option when it sets one, None included, else the middleware's), or None."""
    if actor is not None and "retry_when" in actor.options:
        return actor.options["retry_when"]
    middleware = _retries_middleware(broker)
    return middleware.retry_when if middleware is not None else None


def default_attempts(broker: dramatiq.Broker) -> int:
    """The attempts of a job neither its message nor its actor sets: the Retries middleware's."""
    middleware = _retries_middleware(broker)
    if middleware is None:
        return 1
    if middleware.max_retries is None:
        return UNLIMITED_ATTEMPTS
    return min(middleware.max_retries + 1, UNLIMITED_ATTEMPTS)


def hook_target(broker: dramatiq.Broker, message: Any, option: str) -> str | None:
    """The actor a hook option (``on_failure``, ``on_final_failure``, ...) names: the message's,
    else its actor's (when this process declares it); None when neither sets it."""
    actor = broker.actors.get(message.actor_name)
    target = message.options.get(option) or (actor.options.get(option) if actor else None)
    return str(target) if target else None


def _thrown(broker: dramatiq.Broker, message: Any, exception: BaseException) -> bool:
    """Whether ``exception`` is one the message's or its actor's ``throws`` lists."""
    actor = broker.actors.get(message.actor_name)
    throws = message.options.get("throws") or (actor.options.get("throws") if actor else None)
    if not throws:
        return False
    return isinstance(exception, throws)


def hooks_of_lost(
    broker: dramatiq.Broker, message: Any, failure: dict[str, str], *, attempts: int, max_attempts: int
) -> list[tuple[str, tuple[Any, ...]]]:
    """What each middleware's ``worker_lost_hooks`` says the worker of ``message``, lost on its
    last attempt, would have sent (as (the hook's actor, its arguments)), in middleware order."""
    hooks: list[tuple[str, tuple[Any, ...]]] = []
    for middleware in broker.middleware:
        of_lost = getattr(middleware, "worker_lost_hooks", None)
        if of_lost is not None:
            hooks += of_lost(broker, message, failure, attempts=attempts, max_attempts=max_attempts)
    return hooks


def _count_lost_attempts(message: Any, attempts: int) -> None:
    """Count the attempts of this run of the job whose worker was lost (killed, cut off) in
    the message's ``retries``, which Dramatiq's count of retried failures never saw: without
    them a job whose worker died twice ran ``max_attempts`` more times after (the jobs mirror
    counts them; the reaper ends a job lost on its last attempt). One read per failed attempt
    that may be retried; none with the StubBroker, which keeps no mirror."""
    import tasks
    from models import queries

    retries = message.options.get("retries", 0)
    if tasks.settings.stub_broker or attempts >= UNLIMITED_ATTEMPTS or retries + 1 >= attempts:
        return
    try:
        with tasks.connection() as conn, conn.cursor() as cur:
            cur.execute(queries.ATTEMPTS_BEFORE, {"id": message.message_id})
            row = cur.fetchone()
    except Exception as exc:  # Dramatiq's own count decides, as before
        logger.warning("message %s: could not read its lost attempts: %s", message.message_id, loggable_error(exc))
        return
    if row is not None and row[0] is not None and row[0] > retries:
        message.options["retries"] = row[0]


class Retries(dramatiq_retries.Retries):
    """Exponential backoff (Dramatiq's), bounded by ``max_attempts``; permanent errors never retry."""

    @property
    def actor_options(self) -> set[str]:
        return set(super().actor_options) | {"max_attempts", "on_final_failure"}

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            return
        if isinstance(exception, Cancelled):
            # An operator stopped it (control_plane.cancel_job): running it again would undo that.
            # on_final_failure still fires below, so a workflow can undo its half-done work.
            logger.info("message %s was cancelled; not retrying", message.message_id)
            message.fail()
        elif isinstance(exception, PermanentError):
            logger.info("message %s failed permanently; not retrying", message.message_id)
            message.fail()
        else:
            attempts = max_attempts_for(broker, message)
            _count_lost_attempts(message, attempts)
            if "max_retries" not in message.options:
                message.options["max_retries"] = attempts - 1
            if (
                message.options.get("retries", 0) + 1 >= attempts
                # retry_when decides (Dramatiq's Retries then ignores every bound): apply max_attempts here
                and retry_when_of(broker, broker.actors.get(message.actor_name)) is not None
                and not _thrown(broker, message, exception)  # (Dramatiq's fails those quietly)
            ):
                self._spent(broker, message, attempts)
            else:
                super().after_process_message(  # type: ignore[no-untyped-call]
                    broker, message, result=result, exception=self._waiting_at_least(broker, message, exception)
                )
        if message.failed:
            self.send_final_failure(broker, message, exception)

    def send_final_failure(self, broker: dramatiq.Broker, message: Any, exception: BaseException) -> None:
        """Send ``message``'s ``on_final_failure`` hook, if it has one: it failed for good with ``exception``."""
        from tasks.middleware.jobs_mirror import describe_failure

        target = hook_target(broker, message, "on_final_failure")
        if target:
            failure = describe_failure(exception, message, broker)
            broker.get_actor(target).send(*self._final_failure_args(message, failure))

    def _waiting_at_least(self, broker: dramatiq.Broker, message: Any, exception: BaseException) -> BaseException:
        """``exception``, or for a ``TransientError`` with a ``retry_after`` (a service's
        ``Retry-After``), a Dramatiq ``Retry`` whose delay is Dramatiq's backoff for this
        attempt, or that wait if longer, up to the actor's ``max_backoff``. (Not with a
        ``retry_when``, which is handed the exception itself, nor one ``throws`` lists.)"""
        wait = getattr(exception, "retry_after", None) if isinstance(exception, TransientError) else None
        actor = broker.actors.get(message.actor_name)
        if not wait or actor is None or retry_when_of(broker, actor) is not None or _thrown(broker, message, exception):
            return exception
        min_backoff = message.options.get("min_backoff", actor.options.get("min_backoff", self.min_backoff))
        max_backoff = message.options.get("max_backoff", actor.options.get("max_backoff", self.max_backoff))
        max_backoff = min(max_backoff, dramatiq_retries.DEFAULT_MAX_BACKOFF)
        _, backoff = compute_backoff(message.options.get("retries", 0), factor=min_backoff, max_backoff=max_backoff)
        return dramatiq.Retry(str(exception), delay=int(min(max(backoff, wait * 1000), max_backoff)))

    def _spent(self, broker: dramatiq.Broker, message: Any, attempts: int) -> None:
        """What Dramatiq's Retries does when a message's retries are exceeded, for a job whose
        ``retry_when`` would retry it past its explicit ``max_attempts``."""
        retries = message.options.setdefault("retries", 0)
        message.options["retries"] = retries + 1
        message.options["traceback"] = _TRACEBACKS.format_exc(limit=30)
        message.options["requeue_timestamp"] = int(time.time() * 1000)
        logger.warning("Retries exceeded for message %r (max_attempts %d).", message.message_id, attempts)
        message.fail()
        target = hook_target(broker, message, "on_retry_exhausted")
        if target:
            broker.get_actor(target).send(message.asdict(), {"retries": retries, "max_retries": attempts - 1})

    def worker_lost_hooks(
        self, broker: dramatiq.Broker, message: Any, failure: dict[str, str], *, attempts: int, max_attempts: int
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """What the reaper sends, as (the hook's actor, its arguments), for a job it ended: its
        worker lost on its last attempt (``on_retry_exhausted`` and ``on_final_failure``, as a
        failure with its retries spent sends them), or after a cancel (``on_final_failure``, as a
        ``Cancelled`` interrupt does)."""
        hooks: list[tuple[str, tuple[Any, ...]]] = []
        exhausted = hook_target(broker, message, "on_retry_exhausted")
        if exhausted and failure["type"] != "Cancelled":
            hooks.append((exhausted, (message.asdict(), {"retries": attempts - 1, "max_retries": max_attempts - 1})))
        final = hook_target(broker, message, "on_final_failure")
        if final:
            hooks.append((final, self._final_failure_args(message, failure)))
        return hooks

    @staticmethod
    def _final_failure_args(message: Any, failure: dict[str, str]) -> tuple[Any, ...]:
        return (
            {
                "message_id": message.message_id,
                "actor_name": message.actor_name,
                "args": list(message.args),
                "kwargs": dict(message.kwargs),
            },
            failure,
        )
