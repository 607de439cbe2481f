"""Unique keys computed from a message's arguments.

An actor declared with ``unique_key_from=fn`` gets ``unique_key=fn(args, kwargs)``
on every message sent to it (unless the sender set one): while a job with that
key is pending or running, another send returns that job instead of a
duplicate (the broker enforces it with a partial unique index).
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import Middleware


class UniqueKeys(Middleware):
    """Fills in ``unique_key`` from the actor's ``unique_key_from`` option."""

    @property
    def actor_options(self) -> set[str]:
        return {"unique_key_from"}

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        if "unique_key" in message.options:
            return
        actor = broker.actors.get(message.actor_name)
        compute = actor.options.get("unique_key_from") if actor is not None else None
        if compute is None:
            return
        key = compute(tuple(message.args), dict(message.kwargs))
        if isinstance(key, str) and key:
            message.options["unique_key"] = key
