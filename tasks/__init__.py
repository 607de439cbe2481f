"""The Dramatiq application: importing ``tasks`` configures the broker.

Run workers with ``dramatiq tasks your_module`` (your module declares actors
with ``@dramatiq.actor``); send with ``actor.send(...)``, inside your own
transaction with ``with tasks.enqueue_in(conn): ...``.

Nothing here connects to the database: connections are opened on first use,
in the process (or forked worker) that uses them.
"""

from __future__ import annotations

import logging

import dramatiq
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    ShutdownNotifications,
    TimeLimit,
)
from dramatiq.results import Results

from tasks.broker import PostgresBroker, enqueue_in
from tasks.middleware import Cancellation, JobsMirror, LogContext, Retries, UniqueKeys
from tasks.results import PostgresBackend
from tasks.settings import Settings

settings = Settings.from_env()

broker = PostgresBroker(
    settings=settings,
    # Declared in full, in order. Dramatiq runs "before" hooks top-down and
    # "after" hooks bottom-up, so LogContext, first, wraps everything else.
    middleware=[
        # message id + actor name on every log line of a message
        LogContext(),
        # drop messages older than their max_age (Dramatiq's)
        AgeLimit(),
        # interrupt attempts that run past their time_limit (Dramatiq's; 10 min default)
        TimeLimit(),
        # deliver Shutdown to actors that ask for it (Dramatiq's)
        ShutdownNotifications(),
        # on_success / on_failure callbacks (Dramatiq's)
        Callbacks(),
        # pipelines: message | message (Dramatiq's)
        Pipelines(),
        # exponential backoff, max_attempts, permanent errors
        Retries(
            max_retries=settings.max_attempts - 1,
            min_backoff=settings.min_backoff_ms,
            max_backoff=settings.max_backoff_ms,
        ),
        # the actor being run, for actors that need their own message id
        CurrentMessage(),
        # what started / returned / failed, for the jobs mirror writes
        JobsMirror(),
        # unique_key computed from the arguments (actor option unique_key_from)
        UniqueKeys(),
    ],
)
broker.add_middleware(
    Results(backend=PostgresBackend(broker), result_ttl=settings.result_ttl_ms)
)
# interrupt jobs an operator cancels (control_plane.cancel_job). Last, so that
# its before hook runs just before the actor and its after hook just after it:
# the window in which a cancel can land outside the actor stays as small as possible.
broker.add_middleware(Cancellation())
dramatiq.set_broker(broker)


def _not_discarded(record: logging.LogRecord) -> bool:
    # Dramatiq's Results warns that a return value "has been discarded" when an
    # actor does not store results; the jobs mirror keeps every return value in
    # control_plane.jobs.result, so the warning would be false.
    return "has been discarded" not in record.getMessage()


logging.getLogger("dramatiq.results.middleware.Results").addFilter(_not_discarded)

__all__ = ["broker", "enqueue_in", "settings"]
