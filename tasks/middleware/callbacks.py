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
        self._send_on_failure(broker, message, describe_failure(exception, message, broker))

    def after_worker_lost(
        self, broker: dramatiq.Broker, message: Any, failure: dict[str, str], *, attempts: int, max_attempts: int
    ) -> None:
        """The reaper ended ``message``'s job (its worker was lost on its last attempt, or after a
        cancel): ``on_failure`` as the worker would have sent it."""
        self._send_on_failure(broker, message, failure)

    def _send_on_failure(self, broker: dramatiq.Broker, message: Any, failure: dict[str, str]) -> None:
        actor = broker.actors.get(message.actor_name)
        target = message.options.get("on_failure") or (actor.options.get("on_failure") if actor else None)
        if target:
            broker.get_actor(target).send(message.asdict(), failure)


__all__ = ["Callbacks"]
