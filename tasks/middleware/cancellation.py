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

A thread is interrupted only while it runs an actor's function (each actor's
``fn`` is wrapped when its first message starts here): an exception raised
into Dramatiq's own bookkeeping after the actor raised would escape
``process_message``, kill the worker thread and ack the message as completed.
A message cancelled after it was handed to a thread, before its function
began, is refused when the function is entered.

Limits, shared with Dramatiq's ``TimeLimit``: the exception lands at the
thread's next Python bytecode, so a system call (a long ``time.sleep``, a
blocking read) finishes first; and it may land just after the function
returned, in which case the attempt is cancelled although its work was done.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware
from dramatiq.middleware.threading import Interrupt, raise_thread_exception

from tasks.errors import Cancelled
from tasks.middleware.option_checks import INTERRUPTIBLE

logger = logging.getLogger(__name__)

#: Marks an actor function wrapped by :meth:`Cancellation._interruptible`.
_WRAPPED = INTERRUPTIBLE


class Cancellation(Middleware):
    """Knows which worker thread runs which message, and interrupts it on request."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: message_id -> (thread id, message proxy) of every message being processed now.
        self._running: dict[str, tuple[int, Any]] = {}
        #: thread id -> how many actor functions it is inside now (an actor may call another).
        self._in_actor: dict[int, int] = {}
        #: The message each worker thread processes now.
        self._current = threading.local()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        with self._lock:
            # Cancelled while it waited in this process's prefetch: do not start it.
            if getattr(message, "cancel_requested", False):
                raise Cancelled("cancelled before it started")
            self._running[message.message_id] = (threading.get_ident(), message)
            self._current.message = message
            # In no actor's function yet, whatever an interrupt cut short before (see _interruptible).
            self._in_actor.pop(threading.get_ident(), None)
            actor = broker.actors.get(message.actor_name)
            if actor is not None and not getattr(actor.fn, _WRAPPED, False):
                actor.fn = self._interruptible(actor.fn)

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
                self._current.message = None
                self._in_actor.pop(threading.get_ident(), None)
                # Only its own entry: the same id may run again in another thread of this
                # process (a lease that expired while it ran), and that one stays cancellable.
                entry = self._running.get(message.message_id)
                if entry is not None and entry[1] is message:
                    del self._running[message.message_id]
        except Cancelled:
            # The interrupt landed here, after the actor had returned: too late, the outcome stands.
            logger.info("message %s: the cancellation arrived after it had finished", message.message_id)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        self.after_process_message(broker, message)

    def _interruptible(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, recording that the calling thread is inside it (see :meth:`cancel`)."""

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            thread_id = threading.get_ident()
            with self._lock:
                message = getattr(self._current, "message", None)
                if message is not None and getattr(message, "cancel_requested", False):
                    raise Cancelled("cancelled before it started")
                self._in_actor[thread_id] = self._in_actor.get(thread_id, 0) + 1
            try:
                return fn(*args, **kwargs)
            except RuntimeError as exc:
                # An async actor (Dramatiq's async_to_sync): interrupted (a cancel, its time limit),
                # Dramatiq cancels the coroutine, waits 1 s for it to finish and then raises
                # RuntimeError("Timed out while waiting for coroutine.") from the interrupt. The
                # interrupt is what ended the attempt: a cancel must end the job cancelled, with its
                # on_final_failure and its caller's result, not be retried as a RuntimeError.
                cause = exc.__cause__
                if not isinstance(cause, Interrupt):
                    raise
                logger.warning(
                    "%s: the coroutine did not stop within 1 s of its %s; it goes on in the event loop",
                    getattr(fn, "__name__", "actor"), type(cause).__name__,
                )
                raise cause from None
            finally:
                # An interrupt raised while this waited for the lock lands in here: tolerated (the
                # count may be left off by one until the message's after hook clears it; the only
                # cancel it could mislead is its own message's, already asked for).
                with self._lock:
                    depth = self._in_actor.pop(thread_id, 0) - 1
                    if depth > 0:
                        self._in_actor[thread_id] = depth

        setattr(run, _WRAPPED, True)
        return run

    def cancel(self, messages: Iterable[Any]) -> list[Any]:
        """Interrupt the threads running ``messages`` (claimed message proxies); refuse them if not
        started. Returns those no thread had begun: from now on, any thread refuses them."""
        refused = []
        with self._lock:
            for message in messages:
                if getattr(message, "cancel_requested", False):
                    continue  # asked already: each running message is interrupted once
                message.cancel_requested = True
                entry = self._running.get(message.message_id)
                if entry is None or entry[1] is not message:
                    refused.append(message)
                    continue  # not started yet: before_process_message refuses it
                thread_id = entry[0]
                if thread_id not in self._in_actor:
                    # Not in its function: before it (refused on entry) or after it (its outcome stands).
                    continue
                logger.warning(
                    "message %s: cancelled by an operator; interrupting worker thread %d",
                    message.message_id,
                    thread_id,
                )
                raise_thread_exception(thread_id, Cancelled)
        return refused


def interrupt(broker: dramatiq.Broker, messages: Iterable[Any]) -> list[Any]:
    """Hand ``messages`` to the broker's :class:`Cancellation` middleware (the consumer thread calls
    this); returns those it will refuse, as no thread had begun them (see :meth:`Cancellation.cancel`)."""
    for middleware in broker.middleware:
        if isinstance(middleware, Cancellation):
            return middleware.cancel(messages)
    logger.warning("jobs were cancelled, but the broker has no Cancellation middleware to interrupt them")
    return []
