"""Every log line written while a message runs carries its id and actor name.

The same filter redacts secrets from every line and every traceback it sees
(see :mod:`tasks.redaction`): an exception that quotes a password must not put
it in a log file. A line or traceback longer than ``REDACT_MAX_CHARS`` is cut there:
redacting a failed job's 10 MB of arguments, which Dramatiq's failure line quotes,
held every thread of the worker for seconds.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from tasks.redaction import redact_head

#: The message being processed: a context variable, not a thread-local, so that an async
#: actor's log lines (written in the event loop thread, in a copy of the worker thread's
#: context, see Dramatiq's async_to_sync) carry it too.
_current: contextvars.ContextVar[Any] = contextvars.ContextVar("controlplane_log_message", default=None)


class MessageContextFilter(logging.Filter):
    """Adds ``message_id`` and ``actor_name`` to records, prefixes the line with them, redacts."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_controlplane_done", False):
            return True
        message = _current.get()
        record.message_id = message.message_id if message is not None else "-"
        record.actor_name = message.actor_name if message is not None else "-"
        text = redact_head(record.getMessage())
        if message is not None:
            text = f"[{message.actor_name} {message.message_id}] {text}"
        record.msg, record.args = text, ()
        # A handler that ran before this one (on the record's own logger) may have formatted
        # the traceback already: its cached text is what every later handler prints.
        if record.exc_text:
            record.exc_text = redact_head(record.exc_text)
        elif record.exc_info:
            record.exc_text = redact_head(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact_head(record.stack_info)
        record._controlplane_done = True
        return True


class LogContext(Middleware):
    """Installs :class:`MessageContextFilter` on the root handlers of each worker process."""

    def after_process_boot(self, broker: dramatiq.Broker) -> None:
        install_filter()

    def after_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        install_filter()

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
        _current.set(message)

    def after_process_message(
        self, broker: dramatiq.Broker, message: Any, *, result: Any = None, exception: BaseException | None = None
    ) -> None:
        _current.set(None)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        _current.set(None)


def install_filter() -> None:
    """Put the filter on every root handler once (Dramatiq's CLI sets the handlers up)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, MessageContextFilter) for f in handler.filters):
            handler.addFilter(MessageContextFilter())
