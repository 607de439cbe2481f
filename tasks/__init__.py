"""The Dramatiq application: importing ``tasks`` configures the broker.

Run workers with ``dramatiq tasks your_module`` (your module declares actors
with ``@dramatiq.actor``); send with ``actor.send(...)``, inside your own
transaction with ``with tasks.enqueue_in(conn): ...``.

Nothing here connects to the database: connections are opened on first use,
in the process (or forked worker) that uses them.
"""

from __future__ import annotations

import dramatiq
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Pipelines,
    ShutdownNotifications,
    TimeLimit,
)

from tasks.broker import PostgresBroker, enqueue_in
from tasks.middleware import JobsMirror, LogContext, Retries
from tasks.results import PostgresBackend, Results
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
    ],
)
broker.add_middleware(
    Results(backend=PostgresBackend(broker), result_ttl=settings.result_ttl_ms)  # type: ignore[no-untyped-call]
)
dramatiq.set_broker(broker)

__all__ = ["broker", "enqueue_in", "settings"]
