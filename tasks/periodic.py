"""Periodic tasks: schedules declared in code, enqueued by ``controlplane clock``.

Declare a schedule next to the actor, in cron syntax (UTC, see :mod:`tasks.cron`)::

    @periodic("*/5 * * * *")                     # above @dramatiq.actor
    @dramatiq.actor(actor_name="billing.sync", queue_name="billing")
    def sync() -> None: ...

    schedule("0 3 * * *", reports.send, args=("daily",), name="reports.daily")

and run one or more clocks (``controlplane clock --module yourapp.jobs``; the
Procfile's ``clock:`` line). Every tick runs **once**, however many clocks run:
a clock inserts the tick into ``control_plane.schedule_ticks`` (primary key:
schedule name and tick time) and the job's message in the same transaction,
``ON CONFLICT DO NOTHING``; the other clocks' inserts wait for that
transaction and then do nothing, so they enqueue nothing.

Which tick runs: at each look (every minute), a schedule's latest tick at or
before now (the database's time, whatever the host's clock says), if it is
newer than the last one recorded. So a clock that was
down runs each schedule once for the latest tick it missed, not once per
missed tick; a schedule never seen before starts with its tick of the current
minute, if any, or its next one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import dramatiq
import psycopg2
import psycopg2.errors
from dramatiq.message import Message

from models import queries
from tasks import db
from tasks.cron import CronSchedule, as_utc
from tasks.middleware.option_checks import call_problem, check_message_options, check_queue_name
from tasks.middleware.time_ordered_ids import time_ordered_id

logger = logging.getLogger(__name__)

A = TypeVar("A", bound="dramatiq.Actor[Any, Any]")


@dataclass(frozen=True)
class Schedule:
    """What to send, and when: one named cron schedule of one actor."""

    name: str
    cron: CronSchedule
    actor_name: str
    queue_name: str = "default"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: Message options (priority, unique_key, max_attempts, ...), as for ``send_with_options``.
    options: dict[str, Any] = field(default_factory=dict)

    def message(self, broker: dramatiq.Broker) -> Message[Any]:
        """A new message for one tick (a new job id every time)."""
        actor = broker.actors.get(self.actor_name)
        if actor is not None:
            message: Message[Any] = actor.message_with_options(args=self.args, kwargs=dict(self.kwargs), **self.options)
            return message
        # An actor declared only in the workers' code: addressed by name.
        return Message(
            queue_name=self.queue_name,
            actor_name=self.actor_name,
            args=self.args,
            kwargs=dict(self.kwargs),
            options=dict(self.options),
            message_id=time_ordered_id(),
        )


@dataclass(frozen=True)
class Tick:
    """A tick a clock enqueued."""

    schedule_name: str
    tick_at: datetime
    job_id: str


_registry: dict[str, Schedule] = {}
_registry_lock = threading.Lock()


def schedule(
    cron: str,
    actor: dramatiq.Actor[Any, Any] | str,
    *,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    name: str | None = None,
    queue_name: str = "default",
    **options: Any,
) -> Schedule:
    """Run ``actor`` with ``args``/``kwargs`` at every tick of ``cron`` (UTC).

    ``actor`` is a Dramatiq actor, or an actor's name (then ``queue_name`` says
    where its messages go). ``name`` identifies the schedule in
    ``control_plane.schedule_ticks`` (default: the actor's name); give one when
    an actor has several schedules. Declaring the same name again replaces the
    schedule only if it is the same (a module imported twice); a different
    schedule under a name already taken raises ``ValueError`` (two schedules of
    one actor need a ``name`` each). ``options`` are message options
    (``max_attempts``, ``unique_key``, ``priority``, ``time_limit``, ...); any other
    keyword (``timezone=``: cron is in UTC) raises ``ValueError``.
    Raises :class:`tasks.cron.CronError` for a bad expression, or one that
    never fires (``0 0 31 2 *``), and ``TypeError`` for arguments ``actor`` (an actor,
    not a name) cannot take.
    """
    parsed = CronSchedule.parse(cron)
    unknown = sorted(set(options) - _message_options())
    if unknown:
        raise ValueError(
            f"schedule {name or getattr(actor, 'actor_name', actor)!r}: unknown option(s) {', '.join(unknown)}; "
            f"cron is in UTC, and the other keywords are message options: {', '.join(sorted(_message_options()))}"
        )
    if isinstance(actor, str):
        actor_name, queue = actor, queue_name
    else:
        actor_name, queue = actor.actor_name, actor.queue_name
        problem = call_problem(actor.fn, tuple(args), dict(kwargs or {}))
        if problem:
            # Else every tick's job failed with this TypeError at each of its attempts, days apart.
            raise TypeError(f"schedule {name or actor_name!r}: {actor_name} cannot be called with "
                            f"args {tuple(args)!r} and kwargs {dict(kwargs or {})!r}: {problem}")
    # Refused now, at import, rather than by every tick's send.
    check_queue_name(queue, f"schedule {name or actor_name!r}: ")
    check_message_options(options, actor_name)
    entry = Schedule(
        name=name or actor_name,
        cron=parsed,
        actor_name=actor_name,
        queue_name=queue,
        args=tuple(args),
        kwargs=dict(kwargs or {}),
        options=dict(options),
    )
    with _registry_lock:
        taken = _registry.get(entry.name)
        if taken is not None and taken != entry:
            raise ValueError(
                f"a different schedule is already named {entry.name!r} ({taken.cron.expression!r}, "
                f"args {taken.args!r}); give each schedule of one actor its own name=, or unschedule() the old one"
            )
        _registry[entry.name] = entry
    return entry


#: Actor options a message cannot carry: functions, which JSON cannot hold.
_ACTOR_ONLY_OPTIONS = frozenset({"retry_when", "throws", "unique_key_from"})


def _message_options() -> set[str]:
    """What a schedule's message may carry: the broker's middleware's options, a unique key,
    a priority."""
    return (set(dramatiq.get_broker().actor_options) - _ACTOR_ONLY_OPTIONS) | {"unique_key", "priority"}


def periodic(
    cron: str,
    *,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    name: str | None = None,
    **options: Any,
) -> Callable[[A], A]:
    """Decorate a Dramatiq actor (put it above ``@dramatiq.actor``) to run it at every tick of ``cron``."""

    def decorate(actor: A) -> A:
        if not isinstance(actor, dramatiq.Actor):
            raise TypeError(
                f"@periodic({cron!r}) decorates a Dramatiq actor: put it above @dramatiq.actor, "
                f"not below (got {type(actor).__name__})"
            )
        schedule(cron, actor, args=args, kwargs=kwargs, name=name, **options)
        return actor

    return decorate


def schedules() -> list[Schedule]:
    """Every schedule declared in this process, by name."""
    with _registry_lock:
        return [_registry[name] for name in sorted(_registry)]


def unschedule(name: str) -> None:
    """Forget a schedule (it stops running once the clocks restart without it)."""
    with _registry_lock:
        _registry.pop(name, None)


def _minute(when: datetime) -> datetime:
    return as_utc(when).replace(second=0, microsecond=0)


def utc_now() -> datetime:
    """This host's time now, in UTC."""
    return datetime.now(UTC)


#: A host clock this far from the database's is worth a warning (the clock goes by the database's).
SKEW_WARNING = timedelta(seconds=2)


#: How long a clock waits for a tick that another clock's open transaction holds before it leaves
#: the tick to that clock (a claim commits within milliseconds; one held longer is a clock that
#: froze or lost its network mid-claim, and waiting on it stopped this clock's round for good).
CLAIM_LOCK_TIMEOUT = "5s"

#: A clock's session that sits this long inside a transaction is ended by the server, releasing
#: its claims (a frozen or cut-off clock's; without it, the server kept them until TCP keepalive
#: gave up, over two hours by default, and every other clock waited on them).
IDLE_IN_TRANSACTION_TIMEOUT = "30s"


#: How many schedules a clock's start lines name; the rest are counted (``--list`` shows them all).
NAMED_AT_START = 20


def schedule_names(schedules: Sequence[Schedule]) -> str:
    """The first ``NAMED_AT_START`` schedules' names, and how many more: the start lines (the
    print and the log) named every schedule, all 1,000 of a large deployment in one line."""
    names = ", ".join(s.name for s in schedules[:NAMED_AT_START]) or "none"
    more = len(schedules) - NAMED_AT_START
    return f"{names} and {more} more (controlplane clock --list lists them)" if more > 0 else names


class Clock:
    """Enqueues the due ticks of some schedules, once each across every clock.

    Parameters:
      schedules: what to run (default: every schedule declared, at each look).
      url: the control plane's database (default: the one ``tasks`` uses).
      broker: where messages go (default: Dramatiq's global broker, ``tasks.broker``).
      now: the time source (tests inject one); UTC datetimes. By default the
        database's clock (``statement_timestamp()``), read with the recorded ticks
        at each look: every clock then agrees on the time whatever its host's
        clock says, and a host whose clock runs ahead cannot run a tick early
        (nor, by recording it, keep the other clocks from the ticks before it).
    """

    def __init__(
        self,
        *,
        schedules: Iterable[Schedule] | None = None,
        url: str | None = None,
        broker: dramatiq.Broker | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self._schedules = list(schedules) if schedules is not None else None
        self._url = url
        self._broker = broker
        self._now = now
        #: The database's clock minus this host's, as of the last look.
        self.skew = timedelta(0)
        self._conn: Any = None
        #: The due ticks the last ``run_pending`` could not enqueue: (schedule name, tick, reason).
        self.failed: list[tuple[str, datetime, str]] = []

    @property
    def schedules(self) -> list[Schedule]:
        return list(self._schedules) if self._schedules is not None else schedules()

    @property
    def broker(self) -> dramatiq.Broker:
        return self._broker or dramatiq.get_broker()

    def _connection(self) -> Any:
        if not db.connection_is_usable(self._conn):
            self.close()
            if self._url is None:
                import tasks

                self._url = tasks.database_url()
            conn = db.connect(self._url, application_name="controlplane-clock")
            with conn, conn.cursor() as cur:
                cur.execute("SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                            (IDLE_IN_TRANSACTION_TIMEOUT,))
            self._conn = conn
        return self._conn

    def close(self) -> None:
        """Close the clock's connection (it reconnects on its next look)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def now(self) -> datetime:
        """The time now, in UTC: the injected time source's, else the database's."""
        if self._now is not None:
            return as_utc(self._now())
        return self._look()[1]

    def last_ticks(self) -> dict[str, datetime]:
        """The latest tick recorded for each schedule that has one (in UTC)."""
        return self._look()[0]

    def _look(self) -> tuple[dict[str, datetime], datetime]:
        """The latest recorded ticks, and the database's time now; notes how far this host's clock is off."""
        conn = self._connection()
        with conn, conn.cursor() as cur:
            cur.execute(queries.SCHEDULE_LAST_TICKS, {"names": [s.name for s in self.schedules]})
            last = {name: as_utc(tick) for name, tick in cur.fetchall()}
            cur.execute("SELECT statement_timestamp()")
            now = as_utc(cur.fetchone()[0])
        skew = now - utc_now()
        if abs(skew) > SKEW_WARNING and abs(skew - self.skew) > SKEW_WARNING:
            logger.warning("clock: this host's clock is %.1f s %s the database's; the clock goes by the database's",
                           abs(skew.total_seconds()), "behind" if skew > timedelta(0) else "ahead of")
        self.skew = skew
        return last, now

    def due(self, now: datetime | None = None) -> list[tuple[Schedule, datetime]]:
        """The schedules with a tick to enqueue at ``now`` (default: :meth:`now`), and that tick."""
        last, database_now = self._look()
        now = as_utc(now) if now is not None else self.now() if self._now is not None else database_now
        found = []
        for entry in self.schedules:
            tick = entry.cron.previous(now)
            if tick is None:
                continue
            previous = last.get(entry.name)
            if previous is not None and tick <= previous:
                continue  # already enqueued (by this clock or another)
            if previous is None and tick < _minute(now):
                continue  # a new schedule starts at its next tick, not with one long past
            found.append((entry, tick))
        return found

    def run_pending(self, now: datetime | None = None) -> list[Tick]:
        """Enqueue every due tick at ``now`` (default: the clock's ``now()``); returns those this clock won."""
        won = []
        self.failed = []
        for entry, tick in self.due(now):
            try:
                job_id = self._enqueue_tick(entry, tick)
            except Exception as exc:  # one broken schedule must not stop the others
                logger.error(
                    "schedule %s: tick %s not enqueued: %s", entry.name, tick.isoformat(), db.loggable_error(exc)
                )
                self.failed.append((entry.name, tick, db.loggable_error(exc)))
                if not db.connection_is_usable(self._conn):
                    self.close()
                continue
            if job_id is not None:
                logger.info("schedule %s: tick %s enqueued as job %s", entry.name, tick.isoformat(), job_id)
                won.append(Tick(entry.name, tick, job_id))
        return won

    def _enqueue_tick(self, entry: Schedule, tick: datetime) -> str | None:
        """Claim the tick and send its message in one transaction; None when another clock has it."""
        broker = self.broker
        message = entry.message(broker)
        params = {"name": entry.name, "tick_at": tick, "job_id": message.message_id}
        conn = self._connection()
        if entry.actor_name not in broker.actors:
            # An actor addressed by name: its jobs would wait for good in a queue its workers do not
            # read (as `controlplane send` refuses, naming the queue they declared it on).
            with conn, conn.cursor() as cur:
                cur.execute(queries.ACTOR_DECLARED_QUEUE, {"actor": entry.actor_name})
                row = cur.fetchone()
            if row is not None and row[0] != message.queue_name:
                raise ValueError(
                    f"actor {entry.actor_name!r} is declared by its workers on queue {row[0]!r} "
                    f"(control_plane.actor_defaults), not {message.queue_name!r}: its job would wait there for "
                    f"good; give the schedule queue_name={row[0]!r}, or load the actor's module in the clock"
                )
        try:
            return self._claim_and_send(conn, broker, message, params)
        except psycopg2.errors.LockNotAvailable:
            logger.warning("schedule %s: tick %s is held by another clock's transaction open for over %s; "
                           "left to it (the next look runs it if that clock never commits)",
                           entry.name, tick.isoformat(), CLAIM_LOCK_TIMEOUT)
            return None

    def _claim_and_send(self, conn: Any, broker: dramatiq.Broker, message: Message[Any],
                        params: dict[str, Any]) -> str | None:
        from tasks.broker import PostgresBroker, enqueue_in

        with conn:  # BEGIN ... COMMIT (ROLLBACK on an exception)
            with conn.cursor() as cur:
                cur.execute("SELECT set_config('lock_timeout', %s, true)", (CLAIM_LOCK_TIMEOUT,))
                cur.execute(queries.CLAIM_TICK, params)
                claimed = cur.fetchone() is not None
                cur.execute("SET LOCAL lock_timeout TO DEFAULT")
                if not claimed:
                    return None  # another clock enqueued this tick (or a newer one)
            if isinstance(broker, PostgresBroker):
                with enqueue_in(conn):
                    sent = broker.enqueue(message)
            else:
                # Another broker cannot join this transaction: publish, then commit the
                # tick. A crash between the two lets another clock send the tick again.
                # The transaction sits idle while it publishes, which may block as long as the
                # broker says (RabbitMQ's memory and disk alarms): ended by the server meanwhile
                # (IDLE_IN_TRANSACTION_TIMEOUT), its claim would be undone with the message sent,
                # and the next look send the tick again. (Other clocks still wait at most
                # CLAIM_LOCK_TIMEOUT on its claim.)
                with conn.cursor() as cur:
                    cur.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
                sent = broker.enqueue(message)
            if sent.message_id != message.message_id:
                # A live job holds the message's unique key: the tick is that job.
                with conn.cursor() as cur:
                    cur.execute(queries.SET_TICK_JOB, {**params, "job_id": sent.message_id})
            return str(sent.message_id)

    def run_forever(self, stop: threading.Event) -> None:
        """Look for due ticks at the start of every minute until ``stop`` is set."""
        logger.info("clock started; schedules: %s", schedule_names(self.schedules))
        failures = 0
        while not stop.is_set():
            started = utc_now()
            try:
                self.run_pending()
                failures = 0
            except (psycopg2.Error, OSError) as exc:
                failures += 1
                logger.error("clock: cannot read the schedule ticks (%s); trying again", db.loggable_error(exc))
                self.close()
            # The round's minute and now, by the database's time as of the last look: a first
            # look on a host 10 minutes behind learns the skew, and the minute by the skew known
            # before it said the round ran 10 minutes past its minute.
            minute = _minute(started + self.skew)
            now = utc_now() + self.skew
            if not failures and _minute(now) > minute:
                # The round ran into the next minute (a lock, a slow server): that minute's ticks
                # are due now, and waiting for the one after would skip them.
                logger.warning("clock: the round of %s ended at %s, past its minute: looking again at once",
                               minute.strftime("%H:%M"), now.strftime("%H:%M:%S"))
                continue
            wake = _minute(now) + timedelta(minutes=1, milliseconds=50)
            wait = (wake - now).total_seconds()
            stop.wait(min(wait, 5.0 * failures) if failures else wait)
        self.close()


__all__ = ["Clock", "Schedule", "Tick", "periodic", "schedule", "schedule_names", "schedules", "unschedule", "utc_now"]
