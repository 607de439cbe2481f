"""Time-ordered message ids: a new message's id is a UUIDv7 (RFC 9562), not Dramatiq's uuid4.

A message's id is the primary key of its ``control_plane.jobs`` row, and that
table keeps every job until the retention prunes it. A random id puts each
send's entry on a random leaf of the key's index; once the history is large,
most of those leaves have not changed since the last checkpoint, and
PostgreSQL writes the whole leaf into the WAL the first time it changes after
one (a full-page image). A UUIDv7 starts with the millisecond it was made, so
new ids land at the index's right edge, as ``created_at`` entries do. Measured
with ``python -m bench.history_cost`` (``docs/performance.md``, change 22): with
2,000,000 jobs in the history, random ids wrote 6.6 kB of WAL per send after a
checkpoint, time-ordered ones 1.1 kB.

The ids stay UUID strings; Dramatiq, the broker and the mirror see no
difference. They show the millisecond they were made (as ``created_at`` does).
Ids made by one process increase, so a batch's messages, which share their
eta, are claimed in the order they were built (a backlog sent in batches then
drains as one of single sends always did: ``docs/performance.md``, change 22).
They are not secrets: two ids one process makes in one millisecond may differ by one.

Only messages that Dramatiq's own :class:`dramatiq.Actor` builds get them
(``send``, ``send_with_options``, ``message``, ``message_with_options``): the
middleware makes each such actor a :class:`TimeOrderedActor` when it is
declared. An actor of another class keeps its ids (subclass
:class:`TimeOrderedActor` to have them), and a message built with an explicit
``message_id`` keeps that id.
"""

from __future__ import annotations

import os
import threading
from os import urandom
from time import time_ns
from typing import Any, ParamSpec, TypeVar

import dramatiq
from dramatiq.middleware import Middleware

P = ParamSpec("P")
R = TypeVar("R")

_lock = threading.Lock()
#: The last id this process made, as its 122 bits of time and randomness.
_last = 0


def _forget_last() -> None:
    # A forked child starts afresh: continuing its parent's sequence (last + 1)
    # could give both processes the same next id. And with a lock of its own:
    # another thread of the parent may have held this one at the fork.
    global _last, _lock
    _last = 0
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_last)


def time_ordered_id() -> str:
    """A new UUIDv7 string, greater than every id this process made before."""
    global _last
    # 48 bits of Unix milliseconds, then 74 random bits.
    bits = (time_ns() // 1_000_000) << 74 | int.from_bytes(urandom(10), "big") >> 6
    with _lock:
        if bits <= _last:  # the same millisecond, or the clock stepped back
            bits = _last + 1
        _last = bits
    ms, rand_a, rand_b = bits >> 74, (bits >> 62) & 0xFFF, bits & ((1 << 62) - 1)
    # The version (7) and variant (0b10) bits between them; formatted as str(uuid.UUID(...)) would, faster.
    h = f"{ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class TimeOrderedActor(dramatiq.Actor[P, R]):
    """A Dramatiq actor whose messages get time-ordered ids."""

    def message_with_options(
        self, *, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> dramatiq.Message[R]:
        # What Dramatiq's Actor.message_with_options does, with the id given: its message
        # would get a uuid4 first, and replacing it costs a second Message.
        for name in ("on_failure", "on_success"):
            callback = options.get(name)
            if isinstance(callback, dramatiq.Actor):
                options[name] = callback.actor_name
            elif not isinstance(callback, (type(None), str)):
                raise TypeError(name + " value must be an Actor")
        return dramatiq.Message(
            queue_name=self.queue_name,
            actor_name=self.actor_name,
            args=args,
            kwargs=kwargs or {},
            options=options,
            message_id=time_ordered_id(),
        )


class TimeOrderedIds(Middleware):
    """Gives the actors declared after it (of Dramatiq's own class) time-ordered message ids."""

    def after_declare_actor(self, broker: dramatiq.Broker, actor: dramatiq.Actor[Any, Any]) -> None:
        if type(actor) is dramatiq.Actor:
            actor.__class__ = TimeOrderedActor
