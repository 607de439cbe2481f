"""The ``control_plane.jobs`` mirror.

With the Postgres broker, the mirror's writes ride on the broker's own
statements (see :mod:`models.queries`), so broker and mirror can never
disagree. This middleware feeds those statements what only the worker thread
knows: that a message started, what it returned, and why it failed, as one safe
line (secrets redacted, bounded length).
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.errors import ActorNotFound
from dramatiq.middleware import Middleware, TimeLimit, TimeLimitExceeded

from tasks.errors import Cancelled
from tasks.redaction import redact

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
    text = redact(" ".join(text.split()))
    if len(text) > MAX_ERROR_LENGTH:
        text = text[: MAX_ERROR_LENGTH - 1] + "…"
    return text


class JobsMirror(Middleware):
    """Tells the broker's mirror writes when a message started, its result and its error."""

    def before_process_message(self, broker: dramatiq.Broker, message: Any) -> None:
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
        if not hasattr(message, "result_json"):
            return
        from tasks.broker import to_json

        if exception is None:
            message.result_json = to_json(result)
        else:
            message.error_text = describe_error(exception, message, broker)

    def after_skip_message(self, broker: dramatiq.Broker, message: Any) -> None:
        if hasattr(message, "error_text") and message.failed:
            message.error_text = "skipped by middleware"
