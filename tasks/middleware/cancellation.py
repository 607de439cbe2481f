"""Cancelling a running job: ``control_plane.cancel_job`` reaches the thread that runs it.

``cancel_job`` marks a running message (``messages.cancel_requested_at``) and
sends a NOTIFY. The consumer thread of the worker process that holds the
message learns it from its next heartbeat (run at once on that NOTIFY, see
``tasks.broker``) and calls :func:`interrupt`; this middleware then raises
:class:`tasks.errors.Cancelled` in the worker thread running the message, with
Dramatiq's asynchronous-exception mechanism (as its ``TimeLimit`` does). A
message claimed but not started yet is refused when it starts. ``Retries`` does
not retry ``Cancelled`` and the broker settles the attempt as ``cancel``: the
job ends ``cancelled``.

Limits, shared with Dramatiq's ``TimeLimit``: the exception lands at the
thread's next Python bytecode, so a system call (a long ``time.sleep``, a
blocking read) finishes first; and it may land just after the actor returned,
in which case the attempt is cancelled although its work was done. To keep that
window small this middleware is the last one installed (its after hook runs
first), and a thread whose actor already raised is not interrupted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware
from dramatiq.middleware.threading import raise_thread_exception

from tasks.errors import Cancelled

logger = logging.getLogger(__name__)


class Cancellation(Middleware):
    """Knows which worker thread runs which message, and interrupts it on request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: message_id -> (thread id, message proxy) of every message being processed now.
        self._running: dict[str, tuple[int, Any]] = {}

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        with self._lock:
            # Cancelled while it waited in this process's prefetch: do not start it.
            if getattr(message, "cancel_requested", False):
                raise Cancelled("cancelled before it started")
            self._running[message.message_id] = (threading.get_ident(), message)

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        try:
            with self._lock:
                self._running.pop(message.message_id, None)
        except Cancelled:
            # The interrupt landed here, after the actor had returned: too late, the outcome stands.
            logger.info("message %s: the cancellation arrived after it had finished", message.message_id)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self.after_process_message(broker, message)

    def cancel(self, messages: Iterable[Any]) -> None:
        """Interrupt the threads running ``messages`` (claimed message proxies); refuse them if not started."""
        with self._lock:
            for message in messages:
                message.cancel_requested = True
                # Popped so that each running message is interrupted once, however many heartbeats ask.
                entry = self._running.pop(message.message_id, None)
                if entry is None:
                    continue  # not started yet: before_process_message refuses it
                thread_id, running = entry
                if running._exception is not None:
                    continue  # its actor already raised: that failure is being recorded (and not retried)
                logger.warning(
                    "message %s: cancelled by an operator; interrupting worker thread %d",
                    message.message_id,
                    thread_id,
                )
                raise_thread_exception(thread_id, Cancelled)


def interrupt(broker: dramatiq.Broker, messages: Iterable[Any]) -> None:
    """Hand ``messages`` to the broker's :class:`Cancellation` middleware (the consumer thread calls this)."""
    for middleware in broker.middleware:
        if isinstance(middleware, Cancellation):
            middleware.cancel(messages)
            return
    logger.warning("jobs were cancelled, but the broker has no Cancellation middleware to interrupt them")
