"""The error tree: what a task failure means for its retries.

Actors raise these (wrapping driver errors with ``raise ... from exc``); the
``Retries`` middleware in :mod:`tasks.middleware.retries` reads them:

* :class:`TransientError` and any exception outside this tree are retried with
  Dramatiq's exponential backoff until ``max_attempts`` is spent;
* :class:`PermanentError` (and its subclasses) fail the job at once, no retry;
* :class:`Cancelled` is not raised by actors but into them, when an operator
  cancels a running job: the job ends ``cancelled``, no retry.
"""

from __future__ import annotations

from dramatiq.middleware import MiddlewareError, SkipMessage
from dramatiq.middleware.threading import Interrupt


class TaskError(Exception):
    """Base of every error this package raises on purpose."""


class TransientError(TaskError):
    """A failure that may go away by itself: a timeout, a 5xx, a lost connection.

    The attempt fails and the job is retried with backoff. ``retry_after`` (seconds), when
    given, is the least the next attempt waits: what a service's ``Retry-After`` asked for,
    up to the actor's ``max_backoff`` (``tasks.middleware.retries``).
    """

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


class PermanentError(TaskError):
    """A failure that retrying cannot fix: bad input, a conflict, a rejected credential.

    The job fails at once and is never retried.
    """


class InvalidPayload(PermanentError):
    """The arguments of a job are invalid; ``field`` names the offending one (the message says
    ``invalid <field>: <problem>``, or ``text`` when given)."""

    def __init__(self, field: str, problem: str, *, text: str | None = None) -> None:
        super().__init__(text or f"invalid {field}: {problem}")
        self.field = field
        self.problem = problem


class Conflict(PermanentError):
    """The job asks for something that contradicts what already exists."""


class Cancelled(Interrupt):
    """An operator cancelled the job (``control_plane.cancel_job``) while it ran.

    Raised asynchronously in the worker thread that runs the job, as Dramatiq's
    ``TimeLimitExceeded`` is (see :mod:`tasks.middleware.cancellation`). Like
    every Dramatiq ``Interrupt`` it is a ``BaseException``, so ``except
    Exception`` does not swallow it; an actor may catch it to clean up and
    should re-raise it. The job ends ``cancelled`` and is never retried.
    """


class WorkerLost(SkipMessage):
    """A job's last attempt was lost with its worker (killed, cut off) and RabbitMQ delivered
    it again: it is failed, not run again (the Postgres broker's reaper fails such a job
    itself, and stores a ``WorkerLost`` failure as its result the same way)."""


class FollowUpNotSent(TaskError):
    """A job ran, but what was to follow it could not be sent: its pipeline's next step, or its
    count on its group's barrier (with the group's completion callbacks, when it is the last).

    Its job ends ``failed`` with this error instead of ``completed``, so that ``control_plane.jobs``
    shows the pipeline or group that stopped there; ``retry_job`` runs the job again, and what
    follows it with it (:mod:`tasks.middleware.canvas`). Not retried by itself: what reaches it is
    no outage nor deadlock (those are tried again for up to ten minutes) but a fault a retry
    would meet again.
    """


class NotSerializable(TypeError):
    """Arguments of a message cannot be encoded as JSON; nothing was enqueued."""


class InvalidUniqueKey(MiddlewareError, ValueError):
    """A message's unique key (its ``unique_key`` option, or what its actor's
    ``unique_key_from`` returned or raised) is not one; nothing was enqueued."""


class InvalidOption(MiddlewareError, ValueError):
    """An actor's or a message's option (or its name, or its queue's) has a value its workers
    could not use; the actor was not declared, or nothing was enqueued
    (:mod:`tasks.middleware.option_checks`)."""


class ConfigurationError(TaskError):
    """A setting read from the environment is missing or malformed."""
