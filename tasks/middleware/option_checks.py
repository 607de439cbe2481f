"""Actor and message options checked where they are given, not where they break.

Dramatiq reads most options only while a worker processes a message, inside
hooks whose failures it logs and swallows; a bad value then did its damage far
from the code that gave it:

* ``throws="ValueError"`` (a string: a message cannot carry a class) made
  Dramatiq's ``isinstance`` check raise inside its own ``except`` block: the
  worker thread died, the failed job was recorded ``completed``, and the jobs
  the thread had been handed stayed claimed by a live worker, forever;
* ``min_backoff="1000"`` made the retry's backoff raise: the failure was
  recorded ``completed``; ``time_limit="100"`` or ``max_age="1000"`` was
  ignored with a log line;
* ``priority=2**31``, or a 3 kB actor name, failed the worker's record of its
  actors at every consumer start: the consumer restarted forever and its whole
  queue stalled;
* ``queue_name="billing.DQ"`` was stored under ``billing`` (Dramatiq's delay
  queue convention) while the worker consumed ``billing.DQ``: pending forever.

:class:`OptionChecks` refuses such an actor when it is declared (at import),
and :func:`check_message_options` such a message when it is sent (the Postgres
broker calls it; under another broker :class:`SendOptionChecks` does), with
:class:`tasks.errors.InvalidOption` naming the option. :func:`check_follow_ups`
does the same at that send for what a worker sends after the job: a pipeline's
later steps and a group's completion callbacks (a bad one failed the job that was
to send it, far from the code that built the pipeline).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import dramatiq
from dramatiq.asyncio import async_to_sync
from dramatiq.middleware import Middleware

from models.queries import INT_RANGE
from tasks.errors import InvalidOption
from tasks.settings import MAX_DELAY_MS, QUEUE_NAME, UNLIMITED_ATTEMPTS

#: The longest actor or queue name, in bytes: PostgreSQL's btree entries end at about 2.7 kB,
#: and the jobs row, the message and ``control_plane.actor_defaults`` index them.
NAME_MAX_BYTES = 1000
#: The suffixes of Dramatiq's delay and dead-letter queues.
_RESERVED_SUFFIXES = (".DQ", ".XQ")

#: Integers the jobs row holds: any in PostgreSQL's int for a priority; attempts from 0 to
#: UNLIMITED_ATTEMPTS (the reaper doubles them, in an int).
_INTEGER_OPTIONS = ("priority", "max_attempts", "max_retries")
_ATTEMPTS_RANGE = range(0, UNLIMITED_ATTEMPTS + 1)
#: Milliseconds from 0 to 100 years: a backoff of 0 retries at once; a limit or an age of 0 is
#: Dramatiq's "unset" (its hooks read ``option or default``), and an actor's may be infinite.
#: A ``result_ttl`` that was no number (``"1h"``, infinity) failed its worker's every settle
#: with it: no outcome of the queue was written again until the worker restarted.
_BACKOFF_OPTIONS = ("min_backoff", "max_backoff", "result_ttl")
_LIMIT_OPTIONS = ("time_limit", "max_age")
#: Every option checked here: a send whose options hold none of them is not looked at further.
CHECKED_OPTIONS = frozenset({*_INTEGER_OPTIONS, *_BACKOFF_OPTIONS, *_LIMIT_OPTIONS, "throws"})


def check_name(kind: str, name: str) -> None:
    """Refuse an actor or queue name longer than :data:`NAME_MAX_BYTES`."""
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES:
        raise InvalidOption(f"the {kind} name {name[:40]!r}... is longer than {NAME_MAX_BYTES} bytes")


def check_queue_name(name: Any, whose: str = "") -> None:
    """Refuse a queue name no worker could consume: not Dramatiq's pattern, too long, or one of
    Dramatiq's delay or dead-letter queues (``.DQ``, ``.XQ``), whose messages go to the queue
    without the suffix. ``whose``: the actor's, for the error."""
    if not isinstance(name, str) or not QUEUE_NAME.fullmatch(name):
        raise InvalidOption(
            f"{whose}the queue name {name!r} is not one: a letter or _ first, then letters, digits, '.', '_' or '-'"
        )
    if name.endswith(_RESERVED_SUFFIXES):
        raise InvalidOption(
            f"{whose}the queue name {name!r} ends in {name[-3:]}, the suffix of Dramatiq's delay and "
            f"dead-letter queues: its messages would be stored under {name[:-3]!r}; choose another name"
        )
    check_name("queue", name)


def _number(value: Any) -> bool:
    """An int (any size: ``math.isfinite`` overflows on ``10**400``) or a finite float."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _check(options: dict[str, Any], whose: str, *, message: bool) -> None:
    for name in _INTEGER_OPTIONS:
        value = options.get(name)
        if value is None:
            continue  # unset (max_retries=None: Dramatiq's "retry forever")
        allowed = INT_RANGE if name == "priority" else _ATTEMPTS_RANGE
        if not isinstance(value, int) or isinstance(value, bool) or value not in allowed:
            raise InvalidOption(
                f"{whose}: the {name} option must be an integer "
                + ("that fits PostgreSQL's int" if name == "priority" else f"from 0 to {UNLIMITED_ATTEMPTS}")
                + f", not {value!r}"
            )
    for name in _BACKOFF_OPTIONS:
        value = options.get(name)
        if value is not None and not (_number(value) and 0 <= value <= MAX_DELAY_MS):
            raise InvalidOption(
                f"{whose}: the {name} option must be a number of milliseconds from 0 to {MAX_DELAY_MS}, "
                f"not {value!r}"
            )
    for name in _LIMIT_OPTIONS:
        value = options.get(name)
        # (an actor's may be infinite, no limit; a message's travels as JSON, which has no infinity)
        if value is not None and not (
            (_number(value) and 0 <= value <= MAX_DELAY_MS) or (not message and value == math.inf)
        ):
            raise InvalidOption(
                f"{whose}: the {name} option must be a number of milliseconds from 0 to {MAX_DELAY_MS}"
                f"{' (or infinite)' if not message else ''}, not {value!r}"
            )
    throws = options.get("throws")
    if throws is None:
        return
    if message:
        raise InvalidOption(
            f"{whose}: a message cannot carry the throws option (exception classes do not travel as JSON): "
            "set it on the actor"
        )
    classes = throws if isinstance(throws, tuple) else (throws,)
    if not classes or not all(isinstance(c, type) and issubclass(c, BaseException) for c in classes):
        raise InvalidOption(f"{whose}: the throws option must be an exception class or a tuple of them, not {throws!r}")


def check_message_options(options: dict[str, Any], actor_name: str) -> None:
    """Refuse a message whose options a worker could not use (:class:`InvalidOption`, naming it)."""
    if not CHECKED_OPTIONS.isdisjoint(options):
        _check(options, f"cannot send to actor {actor_name!r}", message=True)


#: The earliest ``eta`` taken (March 1973, in milliseconds): one below is seconds since the epoch
#: (``time.time() + 60``), which read as milliseconds is January 1970, and the job ran at once.
_EARLIEST_ETA_MS = 10**11
#: The latest: the end of year 9999, in milliseconds (an eta in microseconds or nanoseconds is past
#: it, and Python's datetime cannot hold it).
_LATEST_ETA_MS = 253_402_300_799_999


def check_eta(eta: Any, actor_name: str) -> None:
    """Refuse an ``eta`` option that is not milliseconds since the epoch: a ``datetime`` (Celery's
    ``apply_async(eta=...)`` habit), a string, or seconds (each was dropped or read as 1970, and
    the job ran at once), or micro- or nanoseconds (a bare ``ValueError`` from ``datetime``)."""
    if not _number(eta) or not _EARLIEST_ETA_MS <= eta <= _LATEST_ETA_MS:
        unit = "" if not _number(eta) else " (seconds?)" if eta < _EARLIEST_ETA_MS else " (micro- or nanoseconds?)"
        raise InvalidOption(
            f"cannot send to actor {actor_name!r}: the eta option must be a number of milliseconds since the "
            f"epoch, not {eta!r}" + unit
            + "; or send with delay=, in milliseconds or a timedelta"
        )


def check_follow_ups(options: dict[str, Any], actor_name: str) -> None:
    """Refuse a message whose pipeline's later steps or group's completion callbacks a worker
    could not send: their queue names, options and delays are checked here, at the caller's
    send, as the message's own are. (Sent by a worker's hook after the job ran, such a step
    failed there: the job ended ``failed``, with ``FollowUpNotSent``, the pipeline or the
    group stopped.) Dramatiq writes them into the message's options as plain dicts."""
    whose = f"cannot send to actor {actor_name!r}"
    _check_callbacks(options, whose)
    target, step = options.get("pipe_target"), 2
    while isinstance(target, dict):
        step_options = _check_follow_up(target, f"{whose}: its pipeline's step {step}")
        _check_callbacks(step_options, whose)
        target, step = step_options.get("pipe_target"), step + 1


def _check_callbacks(options: dict[str, Any], whose: str) -> None:
    for callback in options.get("group_completion_callbacks") or ():
        if isinstance(callback, dict):
            # (its delay is not checked: the worker's send of a callback does not read it, nor Dramatiq's)
            _check_follow_up(callback, f"{whose}: its group's completion callback", delayed=False)


def _check_follow_up(message: dict[str, Any], what: str, *, delayed: bool = True) -> dict[str, Any]:
    """Check a message Dramatiq keeps as a dict (a later step, a callback); its options, and
    with ``delayed`` the delay a worker sends it with (a negative one is sent at once, as a
    message's own: refused only past the longest delay a send takes)."""
    whose = f"{what} ({message.get('actor_name')!r})"
    check_queue_name(message.get("queue_name"), f"{whose}: ")
    options = message.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidOption(f"{whose}: its options must be a dict, not {options!r}")
    _check(options, whose, message=True)
    delay = options.get("delay") if delayed else None
    if delay is not None and not (_number(delay) and delay <= MAX_DELAY_MS):
        raise InvalidOption(f"{whose}: the delay option must be a number of milliseconds up to {MAX_DELAY_MS}, "
                            f"not {delay!r}")  # fmt: skip
    return options


class OptionChecks(Middleware):
    """Refuses, when it is declared, an actor whose name, queue, priority or options its
    workers could not use."""

    def before_declare_actor(self, broker: dramatiq.Broker, actor: Any) -> None:
        whose = f"actor {actor.actor_name!r}"
        check_name("actor", actor.actor_name)
        check_queue_name(actor.queue_name, f"{whose}: ")
        priority = actor.priority
        if not isinstance(priority, int) or isinstance(priority, bool) or priority not in INT_RANGE:
            raise InvalidOption(
                f"{whose}: its priority must be an integer that fits PostgreSQL's int, not {priority!r}"
            )
        _check(actor.options, whose, message=False)


class SendOptionChecks(OptionChecks):
    """:class:`OptionChecks`, and each message's options when it is sent: for brokers other
    than the Postgres broker, which checks them itself (once per batch, where it can)."""

    def before_enqueue(self, broker: dramatiq.Broker, message: Any, delay: int | None) -> None:
        # Not Dramatiq's own re-sends of a message already sent (a retry; a delayed message
        # that came due, moved off its delay queue): there is no caller to tell, and refusing
        # one sent before these checks existed would lose it or redeliver it forever.
        options = message.options
        if "retries" in options or ("eta" in options and delay is None):
            return
        check_message_options(options, message.actor_name)
        if "pipe_target" in options or "group_completion_callbacks" in options:
            check_follow_ups(options, message.actor_name)


#: The mark of the wrapper ``tasks.middleware.cancellation`` puts around an actor's function in a
#: process that ran one of its jobs (it takes the function's arguments).
INTERRUPTIBLE = "_controlplane_interruptible"

#: The code of the wrapper Dramatiq's ``async_to_sync`` puts around an ``async def`` actor.
_ASYNC_TO_SYNC_CODE = async_to_sync(lambda: None).__code__  # type: ignore[arg-type, return-value]


def call_problem(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why an actor's function ``fn`` cannot be called with ``args`` and ``kwargs``, else None:
    its job would fail at every attempt, minutes to days of backoff apart (``controlplane send``
    and ``schedule()`` refuse such arguments). A function behind another decorator is not
    checked: its wrapper may take other arguments than the function it names (``__wrapped__``)."""
    if getattr(fn, INTERRUPTIBLE, False):
        # (a process that ran one of its jobs: schedule() after a job, an app's send by name)
        fn = getattr(fn, "__wrapped__", fn)
    wrapped = getattr(fn, "__wrapped__", None)
    if wrapped is not None and getattr(fn, "__code__", None) is _ASYNC_TO_SYNC_CODE:
        fn = wrapped  # an async actor: Dramatiq's async_to_sync takes the coroutine function's arguments
    if inspect.unwrap(fn) is not fn:
        return None
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # (a builtin or an extension's function may have none)
        return None
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        return str(exc)
    return None
