"""The ``control_plane.jobs`` mirror.

With the Postgres broker, the mirror's writes ride on the broker's own
statements (see :mod:`models.queries`), so broker and mirror can never
disagree. This middleware feeds those statements what only the worker thread
knows: that a message started, what it returned, and why it failed, as one safe
line (secrets redacted, bounded length).

With any other broker (``BROKER_URL=amqp://...``: Dramatiq's RabbitMQ broker),
nothing else writes the mirror, so this middleware does, on its own pooled
connections: :class:`StandaloneMirror`, one statement per event of a message's
life (sent, started, completed, retried, failed). That path is separate and
only taken when the broker is not a ``PostgresBroker``; it is best effort (a
write that fails is logged, the message goes on) and not transactional with
the broker: the mirror can lag behind RabbitMQ, or miss an event when the
database is down.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

import dramatiq
from dramatiq.common import q_name
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import Middleware, MiddlewareError, TimeLimit, TimeLimitExceeded

from models import queries
from tasks.db import loggable_error
from tasks.errors import Cancelled, NotSerializable, WorkerLost
from tasks.redaction import persistable
from tasks.settings import worker_id

logger = logging.getLogger(__name__)

#: ``consumer``: this thread is a Dramatiq consumer thread.
_thread = threading.local()

#: The longest error text kept in ``last_error`` and the errors history.
MAX_ERROR_LENGTH = 2000


def _time_limit_ms(broker: dramatiq.Broker | None, message: Any) -> int | None:
    limit = message.options.get("time_limit")
    if limit is None and broker is not None:
        actor = broker.actors.get(message.actor_name)
        if actor is not None:
            limit = actor.options.get("time_limit")
        if limit is None:
            for middleware in broker.middleware:
                if isinstance(middleware, TimeLimit):
                    limit = middleware.time_limit
    return int(limit) if isinstance(limit, (int, float)) else None


def describe_error(exc: BaseException, message: Any, broker: dramatiq.Broker | None = None) -> str:
    """One line that says why an attempt failed, safe to store and to log."""
    if isinstance(exc, TimeLimitExceeded):
        limit = _time_limit_ms(broker or dramatiq.get_broker(), message)
        text = "TimeLimitExceeded: the attempt ran longer than its time limit" + (
            f" of {limit} ms" if limit is not None else ""
        )
    elif isinstance(exc, Cancelled):
        text = "Cancelled: " + (str(exc).strip() or "an operator cancelled the job while it ran")
    elif isinstance(exc, ActorNotFound):
        text = (
            f"ActorNotFound: unknown actor {message.actor_name!r}: "
            "no actor of that name is declared in the worker that took this message"
        )
    else:
        detail = str(exc).strip()
        text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    # PostgreSQL text cannot hold NUL nor an unpaired surrogate (a file name decoded with
    # surrogateescape): written as an escape and U+FFFD, or the outcome could never be stored.
    text = persistable(" ".join(text.split()))
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text


#: The longest return value (JSON text, in characters) copied into ``control_plane.jobs.result``.
#: A longer one is left to the results backend: written by the queue's settle statement, on
#: the connection that also claims, a 50 MB value held up every job of its queue for seconds,
#: and was kept twice (52 MB in one jobs row, for the completed retention).
MAX_MIRRORED_RESULT_CHARS = 65_536

#: Actors whose too-long return value this process has warned about (once each).
_warned_too_long: set[str] = set()


def mirrored_result(result: Any, message: Any, broker: dramatiq.Broker) -> str | None:
    """What ``control_plane.jobs.result`` keeps of an actor's return value: its JSON text, or
    None when it has none or it is longer than ``MAX_MIRRORED_RESULT_CHARS`` (said once per actor)."""
    from tasks.broker import to_json

    if result is None:
        return None  # (most jobs': at once, this runs for every job)
    # (a value surely too long is not encoded only to be dropped: 50 MB more for a 50 MB string)
    if isinstance(result, str):
        too_long = len(result) + 2 > MAX_MIRRORED_RESULT_CHARS
    else:
        too_long = isinstance(result, list | tuple | dict) and _json_longer_than(result, MAX_MIRRORED_RESULT_CHARS)
    text = None if too_long else to_json(result)
    if text is not None and len(text) > MAX_MIRRORED_RESULT_CHARS:
        too_long = True  # (the count is a lower bound: escapes and digits are not counted)
    if not too_long:
        return text
    if message.actor_name not in _warned_too_long:
        _warned_too_long.add(message.actor_name)
        actor = broker.actors.get(message.actor_name)
        stored = message.options.get("store_results", actor.options.get("store_results") if actor else None)
        logger.warning(
            "the return value of %s (over %d characters of JSON) is longer than control_plane.jobs.result keeps "
            "(%d); %s (said once per actor)",
            message.actor_name, MAX_MIRRORED_RESULT_CHARS, MAX_MIRRORED_RESULT_CHARS,
            "the results backend keeps it for get_result" if stored
            else "it is not kept anywhere: store_results=True keeps it for get_result",
        )
    return None


def _json_longer_than(value: Any, limit: int) -> bool:
    """Whether ``value``'s JSON text is surely longer than ``limit`` characters, counting at most
    that far: each string its characters and quotes, anything else at least one character."""
    count = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            count += len(item) + 2
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
            count += 2
        elif isinstance(item, list | tuple):
            pending.extend(item)
            count += 2
        else:
            count += 1
        if count > limit:
            return True
    return False


def _skip_reason(message: Any, broker: dramatiq.Broker | None) -> str:
    """Why a middleware skipped ``message`` (``SkipMessage: Message age limit exceeded``), as
    Dramatiq stashed it for the results backend; else that one did."""
    exc = getattr(message, "_exception", None)
    return describe_error(exc, message, broker) if exc is not None else "skipped by middleware"


def _redelivered(message: Any) -> bool | None:
    """Whether RabbitMQ delivered ``message`` before (None: a broker that does not say)."""
    redelivered = getattr(message, "redelivered", None)
    return redelivered if isinstance(redelivered, bool) else None


def describe_failure(exc: BaseException, message: Any, broker: dramatiq.Broker) -> dict[str, str]:
    """What a failure callback receives: ``{"type", "message"}``, the message as ``last_error`` has it."""
    return {"type": type(exc).__name__, "message": describe_error(exc, message, broker)}


def _rides_on_broker(broker: dramatiq.Broker) -> bool:
    """True when the broker writes the mirror itself (our PostgresBroker)."""
    from tasks.broker import PostgresBroker

    return isinstance(broker, PostgresBroker)


class JobsMirror(Middleware):
    """Tells the broker's mirror writes when a message started, its result and its error.

    ``connection`` (a context manager factory giving an autocommit connection to
    the control plane's database, default ``tasks.connection``) is used only
    when the broker is not a ``PostgresBroker``: see :class:`StandaloneMirror`.
    """

    #: What a PostgresBroker's own statements record (its start marks, ENQUEUE and
    #: SETTLE) or check (its sends refuse what jsonb cannot hold): it does not call
    #: these hooks (see ``tasks.broker.COVERED_SIGNALS``).
    covered_by_postgres_broker = frozenset(
        {"after_consumer_thread_boot", "before_enqueue", "before_process_message", "after_enqueue", "after_ack",
         "after_nack"}
    )

    def __init__(self, connection: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        self._standalone = StandaloneMirror(connection)

    # -- the Postgres broker: hand what the worker knows to its SETTLE statement --

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if not _rides_on_broker(broker):
            self._standalone.started(broker, message)
            return
        if hasattr(message, "started"):
            message.started = True

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if not _rides_on_broker(broker):
            self._standalone.processed(broker, message, result=result, exception=exception)
            return
        if not hasattr(message, "result_json"):
            return
        if exception is None:
            message.result_json = mirrored_result(result, message, broker)
        else:
            message.error_text = describe_error(exception, message, broker)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if not _rides_on_broker(broker):
            self._standalone.skipped(message)
            return
        if hasattr(message, "error_text") and message.failed:
            message.error_text = _skip_reason(message, broker)

    # -- other brokers only (the Postgres broker's own statements cover these) --

    def after_consumer_thread_boot(self, broker: dramatiq.Broker, thread: Any) -> None:
        _thread.consumer = True

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        # Refused: a new message, as the Postgres broker refuses it (a caller's send, and what
        # middleware sends after a job: a pipeline's next step, a callback). Not a re-send of
        # a message already in the broker: a delayed one that came due (the consumer thread
        # sends it) or a retry (nobody to tell; the retry's mirror write is its options only).
        # The retry is known by the error recorded in after_process_message, which runs before
        # the Retries middleware's because this middleware comes after it in the list.
        if _rides_on_broker(broker) or getattr(_thread, "consumer", False) or self._standalone.failed_here(message):
            return
        refuse_unrecordable(message)

    def after_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        if not _rides_on_broker(broker):
            self._standalone.enqueued(broker, message, delay)

    def after_ack(self, broker: dramatiq.Broker, message: Any) -> None:
        if not _rides_on_broker(broker):
            self._standalone.acked(message)

    def after_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        if not _rides_on_broker(broker):
            self._standalone.nacked(message, broker)


#: Attributes a delivery (Dramatiq's MessageProxy) carries in the standalone mirror: the error of
#: its attempt, the number its start was recorded as.
_ATTEMPT_ERROR = "_controlplane_attempt_error"
_ATTEMPT_NUMBER = "_controlplane_attempt_number"
_SKIPPED_BECAUSE = "_controlplane_skipped_because"
#: What a statement that returns rows returned when it returned none.
_NO_ROW = object()
#: Why RabbitMQ's delivery of a job whose worker was lost on its last attempt is not run.
LOST_ON_ITS_LAST_ATTEMPT = (
    "delivered again after its worker did not finish its last attempt (killed, or cut off from RabbitMQ); "
    "not run again, its attempts are used up"
)


def _eta(message: Any) -> datetime | None:
    eta = message.options.get("eta")
    return datetime.fromtimestamp(eta / 1000, UTC) if isinstance(eta, (int, float)) else None


def _json(value: Any) -> str:
    # A value JSON cannot write is written as its str(); jsonb holds no NaN or infinity.
    return json.dumps(value, default=str, allow_nan=False)


def _payload(message: Any) -> str:
    return _json({"args": list(message.args), "kwargs": dict(message.kwargs)})


def _options(message: Any) -> str:
    # Tracebacks may quote secrets (errors are kept, redacted, in errors); eta is the broker's business.
    return _json({k: v for k, v in message.options.items() if k not in ("traceback", "eta")})


class Unrecordable(NotSerializable, MiddlewareError):
    """A send the standalone mirror refused: a ``NotSerializable`` to the sender, and a
    ``MiddlewareError`` so that Dramatiq's brokers let it stop the send (they log and
    ignore any other exception raised in a ``before_enqueue`` hook)."""


def refuse_unrecordable(message: Any) -> None:
    """Raise ``Unrecordable`` for a message whose job ``control_plane.jobs`` could not hold.

    The standalone mirror's payload and options are JSON with any other value
    written as its ``str()``; what is left that jsonb refuses (NaN, infinities,
    a NUL character) or that JSON cannot write (a circular reference) would
    leave a job running that the mirror never shows. The Postgres broker's
    sends refuse the same values with the same words.
    """
    from tasks.broker import jsonb_refuses, refused_reason, unserializable_reason

    try:
        texts = (_payload(message), _options(message))
    except (TypeError, ValueError) as exc:
        raise Unrecordable(unserializable_reason(message, stringified=True)) from exc
    for text in texts:
        if jsonb_refuses(text):
            raise Unrecordable(refused_reason(message, text))


def _worker() -> str:
    """This process as the mirror names a worker (:func:`tasks.settings.worker_id`)."""
    return worker_id(socket.gethostname())


class StandaloneMirror:
    """Writes ``control_plane.jobs`` when the broker does not (another broker than ours).

    The events, in the order Dramatiq emits them:

    * ``after_enqueue``: a new job, ``pending`` (``scheduled_at`` = its eta);
    * ``before_process_message``: ``running``, ``attempts + 1``, ``started_at``, ``worker``;
    * ``after_process_message``: ``completed`` with its result; on an exception
      the error is kept in memory until the next event says what became of it:
    * ``after_enqueue`` of the same message (``Retries`` re-enqueued it):
      ``pending`` again, ``last_error``, an ``errors`` entry, ``scheduled_at``
      = now + backoff;
    * ``after_nack`` (it failed for good): ``failed``, ``last_error``, an ``errors`` entry.
    """

    def __init__(self, connection: Callable[[], AbstractContextManager[Any]] | None = None) -> None:
        self._connection = connection
        #: Per worker thread: the delivery (MessageProxy) whose attempt just failed on it, for the
        #: retry Retries sends next on the same thread (it may send a copy of the message).
        #: What each delivery's attempt recorded (its number, its error) is kept on the delivery
        #: itself, not by message id: a retry of it may start, and fail, on another thread of
        #: this process before the consumer thread acks the first delivery, and that late ack
        #: must not take the retry's error for its own.
        self._failing = threading.local()

    def _write(self, what: str, message: Any, sql: str, params: Callable[[], dict[str, Any]]) -> Any:
        """Run ``sql``; its first row, if it returns rows (``_NO_ROW``: none; None when it could not be written)."""
        connection = self._connection
        if connection is None:
            import tasks

            connection = tasks.connection
        try:
            values = params()  # a message sent around the checks of before_enqueue may not encode
            with connection() as conn, conn.cursor() as cur:
                cur.execute(sql, values)
                if cur.description is None:
                    return None
                row = cur.fetchone()
                return _NO_ROW if row is None else row
        except Exception as exc:  # the mirror must never break sending or processing
            logger.warning(
                "message %s: the jobs mirror could not record %s: %s", message.message_id, what, loggable_error(exc)
            )
            return None

    def _job(self, broker: dramatiq.Broker, message: Any) -> dict[str, Any]:
        from tasks.middleware.retries import max_attempts_for

        actor = broker.actors.get(message.actor_name)
        priority = message.options.get("priority", actor.priority if actor is not None else 0)
        return {
            "id": message.message_id,
            "actor": message.actor_name,
            "queue": q_name(message.queue_name),
            "payload": _payload(message),
            "options": _options(message),
            "priority": priority if isinstance(priority, int) else 0,
            "max_attempts": max_attempts_for(broker, message),
        }

    @staticmethod
    def _take(delivery: Any) -> tuple[str | None, int | None]:
        """What this process kept of a delivery's attempt: its error (if it failed) and its
        number (if its start was recorded), forgotten now that the attempt's outcome is known."""
        error, attempt = getattr(delivery, _ATTEMPT_ERROR, None), getattr(delivery, _ATTEMPT_NUMBER, None)
        setattr(delivery, _ATTEMPT_ERROR, None)
        setattr(delivery, _ATTEMPT_NUMBER, None)
        return error, attempt

    def _failing_delivery(self, message: Any) -> Any | None:
        """The delivery of ``message`` whose attempt just failed on this thread, if any."""
        delivery = getattr(self._failing, "delivery", None)
        if delivery is None or delivery.message_id != message.message_id:
            return None
        return delivery if getattr(delivery, _ATTEMPT_ERROR, None) is not None else None

    def failed_here(self, message: Any) -> bool:
        """Whether an attempt of ``message`` just failed on this thread (a send of it is a retry)."""
        return self._failing_delivery(message) is not None

    def enqueued(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        delivery = self._failing_delivery(message)
        error, attempt = self._take(delivery) if delivery is not None else (None, None)
        self._failing.delivery = None
        if error is not None:
            # Retries re-enqueued the message whose attempt just failed here.
            self._write(
                "a retry",
                message,
                queries.MIRROR_RETRY,
                lambda: {
                    "id": message.message_id,
                    "error": error,
                    "delay_ms": delay or 0,
                    "options": _options(message),
                    "attempt": attempt,
                    "worker": _worker(),
                },
            )
            return
        self._write(
            "a send", message, queries.MIRROR_ENQUEUED, lambda: {**self._job(broker, message), "eta": _eta(message)}
        )

    def started(self, broker: dramatiq.Broker, message: Any) -> None:
        row = self._write(
            "a start",
            message,
            queries.MIRROR_STARTED,
            # RabbitMQ says whether it delivered the message before (None: a broker that does not
            # say): a copy sent again by hand while the job runs is not its lost attempt come back
            lambda: {**self._job(broker, message), "worker": _worker(), "redelivered": _redelivered(message)},
        )
        if row is _NO_ROW:  # (MIRROR_STARTED wrote nothing: the lost attempt was the job's last)
            message.fail()
            lost = WorkerLost(LOST_ON_ITS_LAST_ATTEMPT)
            setattr(message, _SKIPPED_BECAUSE, describe_error(lost, message, broker))
            logger.warning("message %s: %s", message.message_id, LOST_ON_ITS_LAST_ATTEMPT)
            self._send_hooks_of_lost(broker, message)
            raise lost
        if row is not None:
            setattr(message, _ATTEMPT_NUMBER, row[0])

    @staticmethod
    def _send_hooks_of_lost(broker: dramatiq.Broker, message: Any) -> None:
        """``on_failure``, ``on_retry_exhausted`` and ``on_final_failure`` of a job failed because
        its worker was lost on its last attempt, as the Postgres broker's reaper sends them
        (``worker_lost_hooks``): no attempt ran here to send them. One that cannot be sent is logged."""
        from tasks.middleware.retries import hooks_of_lost, max_attempts_for

        attempts = max_attempts_for(broker, message)
        failure = {"type": WorkerLost.__name__, "message": LOST_ON_ITS_LAST_ATTEMPT}
        for target, args in hooks_of_lost(broker, message, failure, attempts=attempts, max_attempts=attempts):
            try:
                broker.get_actor(target).send(*args)
            except Exception as exc:
                logger.warning("message %s: its hook %s was not sent (%s)", message.message_id, target,
                               loggable_error(exc))  # fmt: skip

    def processed(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        if exception is None:
            self._write(
                "a success",
                message,
                queries.MIRROR_COMPLETED,
                lambda: {"id": message.message_id, "result": mirrored_result(result, message, broker)},
            )
            return
        setattr(message, _ATTEMPT_ERROR, describe_error(exception, message, broker))
        self._failing.delivery = message

    def skipped(self, message: Any) -> None:
        if message.failed:
            setattr(message, _ATTEMPT_ERROR, getattr(message, _SKIPPED_BECAUSE, None) or _skip_reason(message, None))

    def acked(self, message: Any) -> None:
        error, attempt = self._take(message)
        if error is not None:
            # The attempt failed and Dramatiq acked it without a retry being sent: Retries could
            # not publish one (RabbitMQ refused or was unreachable; Dramatiq logged it). Nothing
            # will run the job again: recorded as failed, not left running for good.
            self._failed(message, f"{error} (its retry could not be sent: see the worker's log)", attempt)

    def nacked(self, message: Any, broker: dramatiq.Broker) -> None:
        error, attempt = self._take(message)
        if error is None and message.actor_name not in broker.actors:
            # The worker rejected it before any attempt: no actor of that name here.
            error = describe_error(ActorNotFound(message.actor_name), message, broker)
        self._failed(message, error or "rejected by middleware", attempt)

    def _failed(self, message: Any, error: str, attempt: int | None) -> None:
        self._write(
            "a failure",
            message,
            queries.MIRROR_FAILED,
            lambda: {
                "id": message.message_id,
                "error": error,
                "attempt": attempt,
                # a message rejected before any attempt: no worker of it to name
                "worker": _worker() if attempt is not None else None,
            },
        )
