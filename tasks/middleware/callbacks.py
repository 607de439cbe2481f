"""Dramatiq's Callbacks, with the failure's text made safe to store.

Dramatiq's ``on_failure`` callback receives ``{"type", "message": str(exception)}``:
the exception's raw text, which a connection error quotes with its URL and a
failed DDL with its password, stored as the callback job's arguments in
``control_plane.jobs``. Here ``message`` is :func:`describe_error`'s line (the
text of ``last_error``: one line, redacted, what PostgreSQL can store);
``on_success`` is Dramatiq's, unchanged.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import callbacks as dramatiq_callbacks

from tasks.middleware.jobs_mirror import describe_failure
from tasks.middleware.retries import hook_target


class Callbacks(dramatiq_callbacks.Callbacks):
    """``on_success`` and ``on_failure`` callbacks (Dramatiq's), the failure's text redacted."""

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        if exception is None:
            super().after_process_message(broker, message, result=result)  # type: ignore[no-untyped-call]
            return
        for target, args in self.worker_lost_hooks(broker, message, describe_failure(exception, message, broker)):
            broker.get_actor(target).send(*args)

    def worker_lost_hooks(
        self, broker: dramatiq.Broker, message: Any, failure: dict[str, str], **_: int
    ) -> list[tuple[str, tuple[Any, ...]]]:
        """``on_failure``, as (the hook's actor, its arguments): what a failed attempt sends, and
        what the reaper sends for a job it ended (its worker lost on its last attempt, or after a
        cancel)."""
        target = hook_target(broker, message, "on_failure")
        return [(target, (message.asdict(), failure))] if target else []


__all__ = ["Callbacks"]
