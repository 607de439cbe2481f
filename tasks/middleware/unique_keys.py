"""Unique keys computed from a message's arguments.

An actor declared with ``unique_key_from=fn`` gets ``unique_key=fn(args, kwargs)``
on every message sent to it (unless the sender set one): while a job with that
key is pending or running, another send returns that job instead of a
duplicate (the broker enforces it with a partial unique index).

A key is a non-empty string of at most 2,000 bytes (UTF-8; a B-tree index entry holds at most
2,704, and a longer key failed its whole batch with PostgreSQL's ``index row size ... exceeds
btree version 4 maximum``), or an integer (sent as its decimal string); ``None``
from ``unique_key_from`` means no key for that message. Anything else, or a
``unique_key_from`` that raises, fails the send (:class:`tasks.errors.InvalidUniqueKey`)
instead of sending a duplicate the key was meant to prevent.
"""

from __future__ import annotations

from typing import Any

import dramatiq
from dramatiq.middleware import Middleware

from tasks.errors import InvalidUniqueKey

#: The longest unique key, in bytes of UTF-8 (``uq_jobs_live_key`` indexes it).
UNIQUE_KEY_MAX_BYTES = 2000


def unique_key_of(value: Any, actor_name: str) -> str | None:
    """``value`` as a unique key (None: none), or :class:`InvalidUniqueKey` naming what is wrong."""
    if value is None:
        return None
    key = value if isinstance(value, str) and value else None
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            key = str(value)
        except ValueError:  # (past Python's 4,300 digits)
            raise InvalidUniqueKey(
                f"cannot send to actor {actor_name!r}: its unique key is an integer of more than "
                f"{UNIQUE_KEY_MAX_BYTES:,} digits, past what an index can hold"
            ) from None
    if key is None:
        raise InvalidUniqueKey(
            f"cannot send to actor {actor_name!r}: its unique key must be a non-empty string or an integer, "
            f"not {value!r}"
        )
    if len(key) * 4 > UNIQUE_KEY_MAX_BYTES:
        size = len(key.encode("utf-8", "surrogatepass"))
        if size > UNIQUE_KEY_MAX_BYTES:
            raise InvalidUniqueKey(
                f"cannot send to actor {actor_name!r}: its unique key is {size:,} bytes long, past the "
                f"{UNIQUE_KEY_MAX_BYTES:,} an index can hold (a hash of what identifies the job will do)"
            )
    return key


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
        try:
            key = compute(tuple(message.args), dict(message.kwargs))
        except Exception as exc:
            raise InvalidUniqueKey(
                f"cannot send to actor {message.actor_name!r}: its unique_key_from raised {type(exc).__name__}: {exc}"
            ) from exc
        key = unique_key_of(key, message.actor_name)
        if key is not None:
            message.options["unique_key"] = key
