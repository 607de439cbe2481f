"""The Dramatiq application: importing ``tasks`` configures the broker.

Run workers with ``dramatiq tasks your_module`` (your module declares actors
with ``@dramatiq.actor``); send with ``actor.send(...)``, inside your own
transaction with ``with tasks.enqueue_in(conn): ...``.

The broker is ours (PostgreSQL) unless ``BROKER_URL=amqp://...`` names a
RabbitMQ server; either way the jobs mirror, results, schedules
(:mod:`tasks.periodic`) and rate limits (``tasks.rate_limiter_backend``) live
in PostgreSQL, reached with ``tasks.connection()``. ``BROKER_URL=stub://`` is
Dramatiq's StubBroker for unit tests: messages, results and rate limits in
memory, no database (refused by the ``controlplane`` and ``dramatiq`` commands).

Nothing here connects to the database (or to RabbitMQ): connections are opened
on first use, in the process (or forked worker) that uses them.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import AbstractContextManager
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import AgeLimit, CurrentMessage, Middleware, ShutdownNotifications, TimeLimit
from dramatiq.rate_limits import RateLimiterBackend
from dramatiq.rate_limits.backends import StubBackend as StubRateLimiterBackend
from dramatiq.results import Results
from dramatiq.results.backends import StubBackend as StubResultBackend

from tasks import db
from tasks.broker import PostgresBroker, enqueue_in
from tasks.errors import ConfigurationError
from tasks.middleware import (
    AsyncActors,
    Callbacks,
    Cancellation,
    GroupCallbacks,
    JobsMirror,
    LogContext,
    OptionChecks,
    Pipelines,
    Retries,
    SendOptionChecks,
    TimeOrderedIds,
    UniqueKeys,
)
from tasks.rate_limits import PostgresRateLimiterBackend
from tasks.redaction import redact
from tasks.results import FailureWithOutcome, PostgresBackend
from tasks.settings import Settings


def _command() -> str | None:
    """``controlplane`` or ``dramatiq`` when this process is one of those commands."""
    argv = sys.orig_argv
    module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    if module == "tasks.cli" or name == "controlplane":
        return "controlplane"
    if module == "dramatiq" or name == "dramatiq":
        return "dramatiq"
    return None


def _settings() -> Settings:
    """The settings from the environment; in the ``controlplane`` command, a bad one is one line."""
    try:
        found = Settings.from_env()
        command = _command()
        if found.stub_broker and command is not None:
            raise ConfigurationError(
                f"BROKER_URL=stub:// is Dramatiq's in-memory StubBroker, for unit tests: `{command}` would "
                "work on messages no other process sees; unset BROKER_URL"
            )
        if found.broker_url is not None and not found.stub_broker:
            try:  # Dramatiq's RabbitMQ broker needs pika, an optional dependency of Dramatiq's
                import pika  # noqa: F401
            except ImportError as exc:
                raise ConfigurationError(
                    f"BROKER_URL names RabbitMQ, but its client library is not installed ({exc}): "
                    "pip install 'controlplane-tasks[rabbitmq]'"
                ) from None
        return found
    except ConfigurationError as exc:
        if _command() == "controlplane":
            # Raised while `controlplane` imports this package, before its main() could catch it.
            print(f"controlplane: error: {redact(str(exc))}", file=sys.stderr)
            raise SystemExit(1) from None
        raise


settings = _settings()

#: Connections to the control plane's database when another broker carries the
#: messages (with the Postgres broker, its own pool serves: see :func:`connection`).
_pool = db.Pool(lambda: db.database_url(settings), settings.pool_size, application_name="controlplane")


def connection() -> AbstractContextManager[Any]:
    """A pooled autocommit connection to the control plane's database, whichever broker carries the messages.

    ``with tasks.connection() as conn: ...``. With the Postgres broker it is the
    broker's pool (``CONTROLPLANE_POOL_SIZE`` connections per process).
    """
    if isinstance(broker, PostgresBroker):
        return broker.connection()
    return _pool.connection()


def database_url() -> str:
    """The libpq URL of the control plane's database (this may start the embedded server)."""
    if isinstance(broker, PostgresBroker):
        return broker.url()
    return db.database_url(settings)


#: Dramatiq's rate limiters and group barriers on PostgreSQL (``control_plane.rate_limits``):
#: ``ConcurrentRateLimiter(tasks.rate_limiter_backend, "key", limit=1)``. In memory with the StubBroker.
rate_limiter_backend: RateLimiterBackend = (
    StubRateLimiterBackend() if settings.stub_broker else PostgresRateLimiterBackend(connection)
)


def _middleware() -> list[Middleware]:
    # Declared in full, in order. Dramatiq runs "before" hooks top-down and
    # "after" hooks bottom-up, so LogContext, first, wraps everything else.
    middleware: list[Middleware] = [
        # message id + actor name on every log line of a message
        LogContext(),
        # an actor whose options, name or queue its workers could not use is refused when it
        # is declared; under another broker, a message's options when it is sent (the Postgres
        # broker checks those itself, where it looks at the options anyway)
        SendOptionChecks() if not settings.postgres_broker else OptionChecks(),
        # new messages get time-ordered ids (UUIDv7): the jobs table's key index grows at its end
        TimeOrderedIds(),
        # drop messages older than their max_age (Dramatiq's)
        AgeLimit(),
        # deliver Shutdown to actors that ask for it (Dramatiq's)
        ShutdownNotifications(),
        # on_success / on_failure callbacks (Dramatiq's; on_failure gets the error redacted)
        Callbacks(),
        # pipelines: message | message (Dramatiq's)
        Pipelines(),
        # group(...).add_completion_callback(...): Dramatiq's, its barriers in control_plane.rate_limits
        GroupCallbacks(
            rate_limiter_backend if settings.stub_broker else PostgresRateLimiterBackend(connection, barriers=True)
        ),
        # exponential backoff, max_attempts, permanent errors
        Retries(
            max_retries=settings.max_attempts - 1,
            min_backoff=settings.min_backoff_ms,
            max_backoff=settings.max_backoff_ms,
        ),
        # the actor being run, for actors that need their own message id
        CurrentMessage(),
        # the event loop of `async def` actors (Dramatiq's AsyncIO, on by default here)
        AsyncActors(),
        # unique_key computed from the arguments (actor option unique_key_from); before
        # the mirror, whose before_enqueue checks the options the key is written in
        UniqueKeys(),
        # what started / returned / failed, for the jobs mirror writes (written on
        # its own connections when BROKER_URL names another broker); after Retries,
        # so that its after_process_message (run in reverse order) sees a failure first
        JobsMirror(connection),
        # the results backend, in control_plane.results
        Results(backend=PostgresBackend(connection), result_ttl=settings.result_ttl_ms),
        # a failure's result stored before its nack, to go with its outcome
        FailureWithOutcome(),
        # interrupt attempts that run past their time_limit (Dramatiq's; 10 min default). Near
        # the end, so its after hook clears the deadline before the others run: a slow results
        # or mirror write after the actor returned must not be interrupted as if the job ran over
        TimeLimit(),
    ]
    if settings.stub_broker:
        # Unit tests, in memory: no jobs mirror, results in memory (the options every actor may
        # use, max_attempts, unique_key_from, on_final_failure, are declared all the same).
        middleware = [m for m in middleware if not isinstance(m, (JobsMirror, Results))]
        middleware.insert(-1, Results(backend=StubResultBackend(), result_ttl=settings.result_ttl_ms))
    if settings.metrics_port and not settings.stub_broker:
        # Dramatiq's Prometheus metrics, served by the worker's main process on
        # CONTROLPLANE_METRICS_PORT. Second, so its timings include every other hook. Not
        # with the StubBroker: the process_boot it is given below would set the metrics'
        # environment variables in the importing process (a unit test's), which no server reads.
        from tasks.metrics import WorkerMetrics

        middleware.insert(1, WorkerMetrics())
    return middleware


broker: dramatiq.Broker
if settings.stub_broker:
    # BROKER_URL=stub://: Dramatiq's StubBroker, as its unit-testing guide uses it
    # (broker.join(queue, fail_fast=True), Worker(broker, worker_timeout=100)).
    broker = StubBroker(middleware=_middleware())
    broker.emit_after("process_boot")
elif settings.postgres_broker:
    broker = PostgresBroker(settings=settings, middleware=_middleware())
    # interrupt jobs an operator cancels (control_plane.cancel_job). Last, so that
    # its before hook runs just before the actor and its after hook just after it:
    # the window in which a cancel can land outside the actor stays as small as possible.
    broker.add_middleware(Cancellation())
else:
    # BROKER_URL=amqp://...: Dramatiq's RabbitMQ broker carries the messages;
    # control_plane.jobs, results, schedules and rate limits stay in PostgreSQL.
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    # confirm_delivery: a send returns once RabbitMQ has the message, not when it left the
    # socket; a publish lost as the connection dropped raises instead of leaving a pending
    # jobs row no worker will ever run.
    broker = RabbitmqBroker(url=settings.broker_url, middleware=_middleware(), confirm_delivery=True)
dramatiq.set_broker(broker)


def _not_discarded(record: logging.LogRecord) -> bool:
    # Dramatiq's Results warns that a return value "has been discarded" when an
    # actor does not store results; the jobs mirror keeps the return value in
    # control_plane.jobs.result (and says so itself when one is too long to keep).
    return "has been discarded" not in record.getMessage()


logging.getLogger("dramatiq.results.middleware.Results").addFilter(_not_discarded)


def _not_given_back(record: logging.LogRecord) -> bool:
    # Dramatiq's worker thread warns "Message ... was skipped." for each message it comes to
    # that its consumer had ended (a cancel) or given back (a paused queue) before any thread
    # started it: the consumer said so, in one line for them all.
    args = record.args
    return not (record.msg == "Message %s was skipped." and isinstance(args, tuple) and args
                and getattr(args[0], "ended_unstarted", False) is True)


logging.getLogger("dramatiq.worker.WorkerThread").addFilter(_not_given_back)

__all__ = ["broker", "connection", "database_url", "enqueue_in", "rate_limiter_backend", "settings"]
