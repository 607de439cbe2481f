"""A PostgreSQL broker for Dramatiq.

Messages live in ``control_plane.messages`` (one row per message, keyed by the
Dramatiq ``message_id``); every change to a message also changes its
``control_plane.jobs`` row in the same statement (see :mod:`models.queries`).

* enqueue: one statement per batch; joins the caller's transaction inside
  :func:`enqueue_in`, commits on its own otherwise; NOTIFY wakes the workers.
* claim: batches with ``FOR UPDATE SKIP LOCKED``, ordered by priority then eta,
  under a lease (``lease_expires_at``) and a claim token.
* settle: acks, failures and retries gathered from the worker threads and
  written in one statement per flush, fenced by the claim token, by a settler
  thread on its own connection (claims never wait behind settles).
* delays and retry backoff are an ``eta`` in the table, never a worker's memory.
* heartbeats extend leases; any worker re-queues the messages of a dead one.

Connection budget per worker process: two connections per consumed queue (one
for claims and heartbeats, one for settles), one that LISTENs for the whole
process (:class:`_Notifier`), plus a pool of at most ``pool_size`` connections
for sends and results made from actors.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import math
import multiprocessing
import operator
import os
import queue as queue_module
import re
import select
import signal as signal_module
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat
from pathlib import Path
from typing import Any

import dramatiq
import psycopg2
import psycopg2.errors
import psycopg2.extensions
from dramatiq.common import compute_backoff, current_millis, q_name
from dramatiq.errors import BrokerConnectionError, ConnectionClosed, DecodeError, QueueJoinTimeout
from dramatiq.message import Message, get_encoder
from dramatiq.middleware import Middleware, SkipMessage

from models import queries
from tasks import db
from tasks.embedded import EmbeddedServerError
from tasks.errors import Cancelled, Conflict, NotSerializable
from tasks.lease_keeper import encode_options
from tasks.middleware.option_checks import check_eta, check_follow_ups, check_message_options, check_queue_name
from tasks.middleware.unique_keys import unique_key_of
from tasks.prepared import Statement
from tasks.redaction import storable_text
from tasks.settings import MAX_DELAY_MS, Settings, worker_id

logger = logging.getLogger(__name__)

# The hot statements, prepared once per connection (see tasks.prepared).
_ENQUEUE = Statement("control_plane_enqueue", queries.ENQUEUE)
_ENQUEUE_PLAIN = Statement("control_plane_enqueue_plain", queries.ENQUEUE_PLAIN)
_ENQUEUE_ONE = Statement("control_plane_enqueue_one", queries.ENQUEUE_ONE)
_SETTLE = Statement("control_plane_settle", queries.SETTLE)
_SETTLE_STORING_RESULTS = Statement("control_plane_settle_storing", queries.SETTLE_STORING_RESULTS)
_CLAIMS: dict[int, Statement] = {}

#: Jobs shorter than this on average let a consumer hold ``burst_prefetch`` times more messages.
SHORT_JOB_SECONDS = 0.05

#: A started job is marked ``running`` in ``control_plane.jobs`` once it has run this long
#: (sooner if an outcome is written meanwhile). A job that ends first writes its outcome
#: alone: one row version less per short job.
RUNNING_MARK_DELAY_SECONDS = 0.05

#: How soon a consumer heartbeats again when its heartbeat skipped messages
#: another statement held (its settler, an operator's cancel).
SKIPPED_HEARTBEAT_RETRY_SECONDS = 0.5

#: A middleware class attribute: the hooks (``after_ack``, say) that only matter
#: under other brokers because a PostgresBroker's own statements do their work.
#: The broker does not call them (see ``PostgresBroker._listeners``).
COVERED_SIGNALS = "covered_by_postgres_broker"


#: Message options that can set a job's priority or attempts apart from its actor's.
_PER_MESSAGE_OPTIONS = frozenset({"priority", "max_attempts", "max_retries"})
_ATTEMPTS_OPTIONS = frozenset({"max_attempts", "max_retries"})
#: What a database without migration 0015's table, or a role without privileges on it, answers.
_NOT_MIGRATED = (psycopg2.errors.UndefinedTable, psycopg2.errors.InsufficientPrivilege)


class EmbeddedServerDown(BrokerConnectionError, EmbeddedServerError):
    """The embedded PostgreSQL could not start: one line in a worker's log, and its consumer
    starts again a few seconds later, as after a lost connection."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.message = message  # (what Dramatiq's errors print)


#: What a worker process without its lease keeper for a while says of it.
_KEEPER_AGAIN = "in two leases; until then a job holding the GIL past the lease would run again elsewhere while it runs"


def _relay_keeper_log(stream: Any) -> None:
    """Log the lease keeper's lines (its stderr) through this process's logging, until it exits."""
    keeper_logger = logging.getLogger("controlplane.lease_keeper")
    with contextlib.suppress(Exception), stream:
        for line in stream:
            keeper_logger.warning("%s", line.decode("utf-8", "replace").rstrip())


def _connection_lost(broker: PostgresBroker, exc: psycopg2.Error) -> ConnectionClosed:
    """What a consumer that lost (or could not make) its connection raises; on the embedded
    server, which runs only while something started it, with how to bring it back."""
    if broker.settings.database_url is None:
        return ConnectionClosed(
            f"{db.loggable_error(exc)}; the embedded PostgreSQL may be stopped: `controlplane db start` "
            "starts it, and this worker goes on"
        )
    return ConnectionClosed(exc)


class SchemaMissing(BrokerConnectionError):
    """The database has no control-plane tables: a consumer cannot start until they are made.

    A Dramatiq ``BrokerConnectionError``, so that the worker says it in one line (no traceback)
    and starts the consumer again a few seconds later, as after a lost connection."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.message = message  # (what Dramatiq's errors print)


def _claim_size(free: int) -> int:
    """How many messages to claim for ``free`` slots: all of them up to 64, then a power of two.

    Each size is its own prepared statement with its LIMIT written in: with
    ``LIMIT $n`` PostgreSQL's generic plan assumes a tenth of the table and
    hash-joins both tables (9 ms instead of 0.3), so it kept planning every
    claim afresh; a constant LIMIT gets a cached plan that stays right.
    Rounding large sizes down bounds the statements a connection prepares.
    """
    return free if free <= 64 else 1 << (free.bit_length() - 1)


#: How long one reap may spend sending the failure hooks of the jobs it ended (each waits
#: 1 s at most for a lock): its thread heartbeats, and the leases it keeps must not expire.
REAPED_HOOKS_SECONDS = 2.0

#: A result for the results backend as the settler stores it: key, encoded value, ttl in ms.
StoredResult = tuple[str, bytes, int]

#: The results and retried messages' bodies one SETTLE carries, in bytes of their encodings;
#: the outcomes past it wait for the next, at once (one statement ends a queue's other jobs
#: too: 50 results of 250 kB held them up 0.6 s in a review's run, 289 of them 4.3 s; and
#: eight retries of 64 MB bodies made a statement past PostgreSQL's 1 GB, which the server
#: refused by dropping the connection, the same batch sent again every 10 s for good, every
#: later outcome of the queue stuck behind it). The first outcome always goes: its body goes
#: in as hex, twice its size, which ``MAX_BATCH_CHARS`` (256 MB at the send) keeps under 1 GB.
SETTLE_BYTES = 1024 * 1024

#: The most characters of messages one ``enqueue_batch`` sends (their JSON, quoted into one
#: statement): past 1 GB PostgreSQL drops the connection without a word of why (a review's
#: batch of 110 messages of 10 MB: ``ConnectionClosed`` after 32 s, the client at 8 GB).
MAX_BATCH_CHARS = 256 * 1024 * 1024

#: How long a SETTLE that carries results waits for its lock on ``control_plane.results``
#: before the outcomes are written without them (an operator's ``LOCK TABLE``, a
#: ``CREATE INDEX``): the results are then written apart, by :class:`_ResultWriter`.
RESULTS_LOCK_TIMEOUT = "100ms"
#: ... and how long while the results waiting to be written apart are past the writer's bound
#: (the worker's memory must not grow with a long lock; nor may a settle wait for good).
RESULTS_FULL_LOCK_TIMEOUT = "5s"


def _claim_statement(size: int, *, pauses: bool = True) -> Statement:
    """CLAIM for ``size`` messages; without ``pauses``, for a consumer that cannot read them
    (``_PostgresConsumer._look_for_pauses``)."""
    key = size if pauses else -size
    statement = _CLAIMS.get(key)
    if statement is None:
        sql = (queries.CLAIM if pauses else queries.CLAIM_BEFORE_PAUSES).replace("%(limit)s", str(int(size)))
        name = f"control_plane_claim_{size}" if pauses else f"control_plane_claim_before_pauses_{size}"
        statement = _CLAIMS.setdefault(key, Statement(name, sql))
    return statement


#: What sends made inside :func:`enqueue_in` join: a psycopg2 connection, or a SQLAlchemy
#: Session or Connection, whose DBAPI connection is looked up at each send.
_enqueue_connection: contextvars.ContextVar[Any | None] = contextvars.ContextVar(
    "controlplane_enqueue_connection", default=None
)


def _check_joinable(conn: Any) -> None:
    """Raise TypeError unless ``conn`` is something :func:`enqueue_in` can join (no side effect)."""
    if isinstance(conn, psycopg2.extensions.connection):
        return
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.orm import Session

    if not isinstance(conn, (SAConnection, Session)):
        raise TypeError(
            "enqueue_in() takes a psycopg2 connection or a SQLAlchemy Session or Connection, "
            f"not {type(conn).__name__}"
        )


def _dbapi_connection(conn: Any) -> Any:
    """The psycopg2 connection behind a psycopg2 connection or a SQLAlchemy Session/Connection,
    in a transaction SQLAlchemy knows about, so that its commit (or rollback) covers the send.

    Looked up at each send, not once: a Session that committed or rolled back inside the
    block has given its connection back to the pool, and its next transaction may be on
    another one. A Connection that has run nothing yet has no transaction for SQLAlchemy
    (it begins one on its first statement): one is begun, or its ``commit()`` would do nothing.
    """
    if isinstance(conn, psycopg2.extensions.connection):
        return conn
    from sqlalchemy.orm import Session

    if isinstance(conn, Session):
        conn = conn.connection()  # begins the session's transaction if needed
    # A SQLAlchemy Connection: enqueue_in checked the type on entry (_check_joinable).
    if not conn.in_transaction():
        conn.begin()
    return conn.connection.dbapi_connection


#: Whether this process has warned that enqueue_in cannot join another broker's sends.
_warned_not_joinable = False


def joined_connection() -> Any | None:
    """Inside :func:`enqueue_in`, the psycopg2 connection of the caller's transaction that
    sends join (looked up now); None outside it."""
    joined = _enqueue_connection.get()
    return None if joined is None else _dbapi_connection(joined)


@contextlib.contextmanager
def enqueue_in(conn: Any) -> Iterator[None]:
    """Make every send inside the block join ``conn``'s transaction.

    The messages (and their ``control_plane.jobs`` rows) become visible when the
    caller commits and vanish if it rolls back. Pipelines and groups sent inside
    the block join too. ``conn`` is a psycopg2 connection or a SQLAlchemy
    ``Session``/``Connection`` on the control plane's database.

    With another broker (``BROKER_URL``, RabbitMQ) it changes nothing: a send is
    published at once and a rollback does not take it back; the first such block of
    a process logs a warning saying so.
    """
    _check_joinable(conn)  # a clear TypeError now; the transaction is joined at the first send
    global _warned_not_joinable
    if not _warned_not_joinable and not isinstance(dramatiq.get_broker(), PostgresBroker):
        _warned_not_joinable = True
        logger.warning(
            "tasks.enqueue_in has no effect with %s: sends are published at once, and a rollback of "
            "the transaction does not take them back (only the Postgres broker joins it)",
            type(dramatiq.get_broker()).__name__,
        )
    token = _enqueue_connection.set(conn)
    try:
        yield
    finally:
        _enqueue_connection.reset(token)


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _check_uuid(message_id: str) -> str:
    if isinstance(message_id, str) and _CANONICAL_UUID.fullmatch(message_id):
        return message_id  # Dramatiq's own ids: no need to parse them
    try:
        return str(uuid.UUID(message_id))
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"message_id must be a UUID, got {message_id!r}") from None


#: Dictionary keys JSON writes (as strings).
_JSON_KEYS = (str, int, float, bool, type(None))


def find_unserializable(
    value: Any, path: str, within: tuple[int, ...] = (), *, stringified: bool = False
) -> str | None:
    """The path of the first value JSON (or PostgreSQL's jsonb) cannot hold, for a clear error.

    ``within`` holds the ids of the containers on the path, to name a circular reference.
    ``stringified``: a value of another type is no problem (the caller writes its ``str()``).
    """
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} ({value!r}, which JSON cannot hold)"
    if isinstance(value, (list, tuple, dict)):
        if id(value) in within:
            return f"{path} (a circular reference)"
        within = (*within, id(value))
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, _JSON_KEYS):
                    return f"{path} (key {key!r} is not a string)"
                if isinstance(key, float) and not math.isfinite(key):
                    return f"{path} (key {key!r}, which JSON cannot hold)"
                found = find_unserializable(item, f"{path}[{key!r}]", within, stringified=stringified)
                if found:
                    return found
            return None
        for i, item in enumerate(value):
            found = find_unserializable(item, f"{path}[{i}]", within, stringified=stringified)
            if found:
                return found
        return None
    return None if stringified else f"{path} ({type(value).__name__})"


#: JSON's escape of U+0000: ``\\u0000`` after an even number of backslashes (after an odd
#: number, the first backslash is an escaped one and the rest is text).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

#: JSON's escape of a surrogate that is not half of a pair (a high one not followed by a low
#: one, a low one not preceded by a high one), after an even number of backslashes.
_HIGH, _LOW = r"\\u[dD][89abAB][0-9a-fA-F]{2}", r"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_LONE_SURROGATE_ESCAPE = re.compile(rf"(?<!\\)(?:\\\\)*(?:{_HIGH}(?!{_LOW})|(?<!{_HIGH}){_LOW})")


def holds_nul(text: str) -> bool:
    """Whether the JSON ``text`` holds a NUL character, which PostgreSQL's jsonb cannot store."""
    return "\\u0000" in text and _NUL_ESCAPE.search(text) is not None


def holds_lone_surrogate(text: str) -> bool:
    """Whether the JSON ``text`` holds an unpaired surrogate, which PostgreSQL's jsonb refuses.

    Python makes them when it decodes bytes that are not UTF-8 with ``surrogateescape``:
    file names from ``os.listdir``, command-line arguments, environment variables.
    """
    return ("\\ud" in text or "\\uD" in text) and _LONE_SURROGATE_ESCAPE.search(text) is not None


def jsonb_refuses(text: str) -> bool:
    """Whether PostgreSQL's jsonb refuses the JSON ``text`` (a NUL, an unpaired surrogate)."""
    return holds_nul(text) or holds_lone_surrogate(text)


#: Dramatiq's default encoder's output (``json.dumps(data, separators=(",", ":"))``), from one
#: encoder object instead of one built per call by ``json.dumps`` with arguments; it refuses
#: NaN and infinities, which Dramatiq's writes and PostgreSQL's jsonb rejects.
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

#: What ``message.encode()`` runs when nobody replaced it: Dramatiq's own methods.
_DRAMATIQ_ENCODING = (dramatiq.JSONEncoder.encode, Message.encode, Message.asdict)


def _dramatiq_encoding(message: Message[Any]) -> bool:
    """Whether ``message.encode()`` would be Dramatiq's JSON, untouched: its own ``Message`` and
    JSON encoder, with no method replaced on their classes or on the encoder object."""
    encoder = get_encoder()
    return (
        type(message) is Message
        and type(encoder) is dramatiq.JSONEncoder
        and "encode" not in getattr(encoder, "__dict__", ())
        and (dramatiq.JSONEncoder.encode, Message.encode, Message.asdict) == _DRAMATIQ_ENCODING
    )


def encode_message(message: Message[Any]) -> bytes:
    """Encode a message, refusing what JSON or PostgreSQL's jsonb cannot hold."""
    return _body_text(message).encode("utf-8")


def _body_text(message: Message[Any]) -> str:
    """``message`` encoded, as the text ENQUEUE takes (it stores the UTF-8 bytes).

    With Dramatiq's own ``Message`` and JSON encoder, the JSON is written here
    directly, the same text as ``message.encode()`` without its per-call field
    listing, encoder construction and bytes round trip; any other encoder or
    message class (or a method replaced on one) is used as given.
    """
    try:
        if _dramatiq_encoding(message):
            text: str = _JSON.encode(
                {
                    "queue_name": message.queue_name,
                    "actor_name": message.actor_name,
                    "args": message.args,
                    "kwargs": message.kwargs,
                    "options": message.options,
                    "message_id": message.message_id,
                    "message_timestamp": message.message_timestamp,
                }
            )
        else:
            text = message.encode().decode("utf-8")
    except UnicodeDecodeError:
        raise NotSerializable(
            f"cannot send to actor {message.actor_name!r}: the message encoder produced bytes that are not "
            "UTF-8 JSON, which this broker stores and the jobs mirror reads"
        ) from None
    except (TypeError, ValueError) as exc:
        raise NotSerializable(unserializable_reason(message)) from exc
    except RecursionError:
        raise NotSerializable(
            f"cannot send to actor {message.actor_name!r}: its arguments or options nest too deep to encode as JSON"
        ) from None
    if jsonb_refuses(text):
        raise NotSerializable(refused_reason(message, text))
    return text


def unserializable_reason(message: Any, *, stringified: bool = False) -> str:
    """Why a send of ``message`` is refused, naming the first value of its arguments or
    options that JSON or jsonb cannot hold (``stringified``: see :func:`find_unserializable`)."""
    where = (
        find_unserializable(list(message.args), "args", stringified=stringified)
        or find_unserializable(dict(message.kwargs), "kwargs", stringified=stringified)
        or find_unserializable(dict(message.options), "options", stringified=stringified)
    )
    return f"cannot send to actor {message.actor_name!r}: {where or 'a value'} is not JSON-serialisable"


def refused_reason(message: Any, text: str) -> str:
    """Why a send of ``message``, whose JSON ``text`` holds what jsonb refuses, is refused."""
    what = (
        "a NUL character"
        if holds_nul(text)
        else "an unpaired surrogate (text decoded with surrogateescape, such as a file name that is not UTF-8)"
    )
    return f"cannot send to actor {message.actor_name!r}: a string contains {what}, which PostgreSQL cannot store"


def _copy_message(message: Message[Any], queue_name: str, options: dict[str, Any]) -> Message[Any]:
    """``message`` with another queue name and options: Dramatiq's own ``Message`` built
    directly (half the cost of ``dataclasses.replace``), a subclass through ``replace``."""
    if type(message) is Message:
        return Message(
            queue_name=queue_name,
            actor_name=message.actor_name,
            args=message.args,
            kwargs=message.kwargs,
            options=options,
            message_id=message.message_id,
            message_timestamp=message.message_timestamp,
        )
    return dataclasses.replace(message, queue_name=queue_name, options=options)


#: The oldest schema this release's workers consume on, and the table it added: below it a
#: pipeline's next step and a group's callbacks failed to send (their jobs ``completed``) and
#: every reap failed. (Later revisions' absence is read around: see ``_look_for_pauses``.)
_NEEDED_REVISION, _NEEDED_TABLE = "0015", "actor_defaults"
#: Set once a worker of this process could not record its actors (said once, not per queue).
_declare_refused = threading.Event()
#: Set once a consumer could not read the queue pauses (said once per process).
_pauses_missing = threading.Event()
#: Set once a consumer was refused a connection for want of slots (said once per process).
_slots_missing = threading.Event()

#: What PostgreSQL says when ``max_connections``, the slots left to ordinary roles or the role's
#: ``CONNECTION LIMIT`` are all taken.
_NO_SLOT_LEFT = ("too many clients already", "remaining connection slots are reserved", "too many connections for role")


def _say_why_no_slot(broker: PostgresBroker, exc: psycopg2.Error) -> None:
    """Once per process, when PostgreSQL has no connection slot left for a consumer: what this
    process needs, and what to change. Dramatiq logs each consumer's failure every few seconds
    (808 lines in 23 s for a worker reading 200 queues), none of them saying that."""
    if _slots_missing.is_set() or not any(text in str(exc) for text in _NO_SLOT_LEFT):
        return
    _slots_missing.set()
    queues = len(broker.consumed)
    needs = 2 * queues + 1 + broker.settings.pool_size
    logger.error(
        "PostgreSQL has no connection slot left (%s): this worker process needs up to %d, two for each of the "
        "%d queue(s) it reads so far, one to listen and %d pooled, and each of its processes as many. Raise "
        "max_connections (or the role's CONNECTION LIMIT), or read fewer queues per process "
        "(docs/operations.md, \"The connection budget of a worker process\"); its consumers retry meanwhile",
        db.loggable_error(exc), needs, queues, broker.settings.pool_size,
    )  # fmt: skip


def _work_queue_by_message_priority() -> None:
    """Make Dramatiq's worker queue a message by its ``priority`` option when it has one.

    The claim orders by it (``PostgresBroker._priority``), but Dramatiq's
    ``ConsumerThread.handle_message`` queues each message for the worker threads by
    its actor's priority alone: a prefetched batch then ran a message sent with
    ``priority=9`` before another actor's of priority 5. Messages without the option
    (or with an eta, or of an actor this process does not declare) go Dramatiq's way.
    """
    from dramatiq import worker as dramatiq_worker

    original = dramatiq_worker.ConsumerThread.handle_message
    if getattr(original, "_by_message_priority", False):
        return

    def handle_message(self: Any, message: Any) -> None:
        priority = message.options.get("priority")
        if (
            "eta" in message.options
            or not isinstance(priority, int)
            or isinstance(priority, bool)
            or message.actor_name not in self.broker.actors
        ):
            original(self, message)
            return
        self.work_queue.put(dramatiq_worker._WorkQueueItem(priority, message))

    handle_message._by_message_priority = True  # type: ignore[attr-defined]
    dramatiq_worker.ConsumerThread.handle_message = handle_message  # type: ignore[method-assign]


_work_queue_by_message_priority()


class PgMessageProxy(dramatiq.MessageProxy):
    """A message claimed from PostgreSQL, with the claim that fences its outcome."""

    def __init__(self, message: Message[Any], token: str) -> None:
        super().__init__(message)
        self.claim_token = token
        #: Set by ``broker.enqueue`` when Dramatiq's Retries re-enqueues this message.
        self.retry_delay_ms: int | None = None
        #: Set when a worker thread starts it (an attempt is under way).
        self.started = False
        #: Set by the JobsMirror middleware.
        self.result_json: str | None = None
        self.error_text: str | None = None
        #: Set by the results backend: (key, encoded value, ttl ms), stored with the outcome.
        self.stored_result: StoredResult | None = None
        #: The key of a result the results backend wrote apart (too big to go with the outcome).
        self.result_written_apart: str | None = None
        #: Set when its outcome is handed to the settler: a result stored later is written apart.
        self.settled = False
        #: Set by the Cancellation middleware when an operator cancels this message.
        self.cancel_requested = False
        #: Set when its consumer ended its job, cancelled, or gave it back, its queue paused,
        #: before any thread started it (``_PostgresConsumer._take_unstarted``): a thread that
        #: comes to it skips it unseen.
        self.ended_unstarted = False
        #: When a worker thread started it (monotonic seconds; 0: not started).
        self.started_mono = 0.0
        #: Until when its claim is this worker's for sure (monotonic seconds, on this host's clock):
        #: its claim, then each heartbeat that extended it, set it a lease on from just before their
        #: statement. A thread does not start it past that: the reaper may have put it back meanwhile
        #: (this process stopped, frozen, or cut off from the database past its lease), and another
        #: worker run it (``PostgresBroker._started``).
        self.lease_until = math.inf
        # The message's fields as the proxy's own attributes: Dramatiq and the
        # middleware read them a score of times per message, each time through
        # MessageProxy.__getattr__ otherwise. The message is frozen; options and
        # kwargs are the message's own (mutable) objects.
        self.queue_name = message.queue_name
        self.actor_name = message.actor_name
        self.args = message.args
        self.kwargs = message.kwargs
        self.options = message.options
        self.message_id = message.message_id
        #: When it was sent, on this host's clock: the claim sets it from the message's age by
        #: the database's clock. Dramatiq's ``AgeLimit`` (``max_age``) compares the sender's
        #: clock (the message's own timestamp) with the worker's: a sender 10 minutes behind,
        #: or a worker 10 minutes ahead, failed every job of a 5-minute ``max_age`` unrun.
        self.message_timestamp = message.message_timestamp


@dataclass
class _Outcome:
    kind: str  # ack | nack | retry | cancel | start (a start mark: the job is running)
    message_id: str
    token: str
    delay_ms: int = 0
    body: bytes | None = None
    error: str | None = None
    result_json: str | None = None
    #: When a worker thread started the attempt (monotonic seconds; 0: it never started).
    started_mono: float = 0.0
    #: For the results backend, stored by the same SETTLE (key, encoded value, ttl ms).
    stored_result: StoredResult | None = None
    #: An earlier SETTLE of it lost its connection: the server may have committed it.
    maybe_written: bool = False
    #: A group member's marker, which its ack needs to find (``models.queries._SETTLE_CTES``).
    group_marker: str | None = None


#: What a job's row must show for a result to be stored (``models.queries.RESULT_STORE``):
#: the job's id, the kind of the outcome (its row shows the status that outcome leaves), and
#: the worker its row names.
EndedAs = tuple[str, str, str]

#: A result to store apart from its outcome, and what its job's row must show for it to be
#: stored (None: stored as it is).
ApartResult = tuple[StoredResult, EndedAs | None]

#: The kinds of outcome that end a job and may store a result.
_ENDING_KINDS = frozenset({"ack", "nack", "cancel"})


def store_results(cur: Any, results: Sequence[StoredResult], only_if: Sequence[EndedAs | None] = ()) -> None:
    """Store ``results`` (distinct keys) with ``cur``: each one, or, where ``only_if`` gives a
    (job id, outcome kind, worker), only while that job's row shows the status that kind of
    outcome leaves and that worker."""
    params = result_store_params(results, only_if)  # (refusing a condition before anything is sent)
    cur.execute(queries.RESULT_STORE, params)


def result_ttl_ms(ttl: Any, default: int) -> int:
    """A result's lifetime ``ttl`` (Dramatiq's ``result_ttl``) as the whole milliseconds the statements
    take, at most ``MAX_DELAY_MS``; ``default`` for one that is no number (``"1h"``, None, infinity: sent
    before the option was checked at the send, or written by hand). Such a one failed every settle
    that carried its result, which held up every outcome of its worker's queue until a restart."""
    if isinstance(ttl, str):
        with contextlib.suppress(ValueError):
            ttl = float(ttl)  # ("60000": as an older release's settle read it)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        return default
    return min(max(int(ttl), 0), MAX_DELAY_MS)


def results_middleware(broker: dramatiq.Broker) -> Any:
    """``broker``'s ``Results`` middleware (Dramatiq's), or None."""
    from dramatiq.results import Results

    return next((m for m in broker.middleware if isinstance(m, Results)), None)


def result_ttl_for(results: Any, message: Message[Any], broker: dramatiq.Broker) -> int:
    """How long ``message``'s result lives, as Dramatiq's ``Results`` middleware ``results`` decides
    it: its ``result_ttl`` option, else its actor's (if ``broker`` declares it), else the
    middleware's (``CONTROLPLANE_RESULT_TTL_MS``); see :func:`result_ttl_ms`."""
    ttl = message.options.get("result_ttl")
    actor = broker.actors.get(message.actor_name)
    if ttl is None and actor is not None:
        ttl = actor.options.get("result_ttl")
    return result_ttl_ms(ttl, int(results.result_ttl))


def result_store_params(results: Sequence[StoredResult], only_if: Sequence[EndedAs | None] = ()) -> dict[str, Any]:
    """``queries.RESULT_STORE``'s parameters for ``results`` (see :func:`store_results`)."""
    conditions = list(only_if) or [None] * len(results)
    for condition in conditions:  # (any other kind would be read as 'pending' by RESULT_STORE)
        if condition is not None and condition[1] not in _ENDING_KINDS:
            raise ValueError(f"a result is stored on an ack, nack or cancel, not on {condition[1]!r}")
    return {
        "keys": _text_array([key for key, _, _ in results]),
        "values": [psycopg2.Binary(value) for _, value, _ in results],
        "ttls": _int_array([ttl for _, _, ttl in results]),
        "jobs": _text_array([c[0] if c else None for c in conditions]),
        "kinds": _text_array([c[1] if c else None for c in conditions]),
        "workers": _text_array([c[2] if c else None for c in conditions]),
    }


class _ResultWriter:
    """Writes results apart from their outcomes, on a thread of its own (started at first use).

    For the results a SETTLE could not carry: ``control_plane.results`` was locked, or
    the settle failed for another reason (a role that may not write it); and, on a
    condition, those of outcomes whose settle may have been committed with its reply
    lost (:meth:`put_if_ended`). The settler must not wait for that table; this thread
    may. It writes what has gathered in one statement (up to ``WRITER_BATCH_BYTES``),
    tries a lost connection or a rollback again, and logs a result it cannot write (its
    caller waits out its timeout). Past ``WRITER_MAX_BYTES`` waiting, settles that carry
    results wait for the table instead (:meth:`full`): the worker's memory does not grow
    with a long lock. :meth:`close` waits a few seconds for what is left, and says how
    many it could not write; a put after it starts the thread again.
    """

    WRITER_BATCH_BYTES = 4 * 1024 * 1024
    WRITER_MAX_BYTES = 64 * 1024 * 1024
    TRIES = 5

    def __init__(self, broker: PostgresBroker) -> None:
        self._broker = broker
        self._queue: queue_module.Queue[ApartResult | None] = queue_module.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._waiting_bytes = 0
        self._waiting = 0
        self._closing = False
        #: When this broker's ``control_plane.results`` was last reported locked, and until when
        #: settles take it to be without a look (monotonic seconds): a look costs ``RESULTS_LOCK_TIMEOUT``.
        self.busy_said = 0.0
        self.busy_until = 0.0

    def full(self) -> bool:
        return self._waiting_bytes > self.WRITER_MAX_BYTES

    def put(self, results: Iterable[StoredResult]) -> None:
        """Store ``results`` as they are."""
        self._put([(result, None) for result in results])

    def put_if_ended(self, results: Iterable[tuple[StoredResult, EndedAs]]) -> None:
        """Store each result only if its job's row shows the outcome and the worker given.

        For outcomes a SETTLE did not report written after an earlier try lost its
        connection: that try may have been committed with only its reply lost (the job's
        row then shows this outcome, written by this worker: the result is due), or the
        lease was lost meanwhile (the row shows another worker's run: nothing is stored).
        """
        self._put(list(results))

    def _put(self, results: list[ApartResult]) -> None:
        if not results:
            return
        with self._lock:  # (counted before the thread can take them and count them off)
            self._waiting_bytes += sum(len(result[1]) for result, _ in results)
            self._waiting += len(results)
            for item in results:
                self._queue.put(item)
            if self._thread is None or not self._thread.is_alive():  # (not started, or closed before)
                self._thread = threading.Thread(target=self._run, name="controlplane-results", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            thread = self._thread
            if thread is not None and thread.is_alive():
                self._closing = True  # (the thread ends once it finds nothing left to write)
                self._queue.put(None)  # (wakes it)
            else:
                thread = None
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            left = self._waiting
        if left:
            logger.error("%d of the results backend's results were not written before the worker stopped "
                         "(control_plane.results stayed locked); their callers wait out their timeouts", left)

    def _run(self) -> None:
        while True:
            batch: dict[str, ApartResult] = {}  # one row per key (see _keep)
            size = taken = 0
            item = self._queue.get()
            while True:
                if item is not None:  # (None: a wake-up from close())
                    _keep(batch, item)
                    size, taken = size + len(item[0][1]), taken + 1
                if size >= self.WRITER_BATCH_BYTES:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue_module.Empty:
                    break
            if batch:
                try:
                    self._write(list(batch.values()))
                except Exception:  # this thread goes on with the next batch
                    logger.exception("could not store %d of the results backend's results", len(batch))
                finally:
                    with self._lock:
                        self._waiting_bytes -= size
                        self._waiting -= taken
            with self._lock:  # (a put looks at the thread under it: none is left behind by an ending thread)
                if self._closing and self._queue.empty():
                    self._thread = None
                    self._closing = False
                    return

    def _write(self, results: list[ApartResult]) -> None:
        """Write ``results`` in one statement; one by one if a value is refused (only it is lost)."""
        for attempt in range(1, self.TRIES + 1):
            try:
                with self._broker.connection() as conn, conn.cursor() as cur:
                    store_results(cur, [result for result, _ in results], [only_if for _, only_if in results])
                return
            except Exception as exc:
                again = isinstance(exc, psycopg2.Error) and (db.is_connection_error(exc) or db.is_transient(exc))
                if again and attempt < self.TRIES:
                    time.sleep(min(0.1 * 2**attempt, 5.0))
                    continue
                if len(results) > 1 and not again:
                    for result in results:
                        self._write([result])
                    return
                logger.error("could not store %d of the results backend's results (%s); their callers wait "
                             "out their timeouts", len(results),
                             db.loggable_error(exc) if isinstance(exc, psycopg2.Error) else exc)
                return


def _keep(batch: dict[str, ApartResult], item: ApartResult) -> None:
    """Put ``item`` in ``batch``, one per key: the last one's, but a result stored as it is
    (its outcome written) is not displaced by one stored on a condition (which may not hold)."""
    key = item[0][0]
    held = batch.get(key)
    if held is None or held[1] is not None or item[1] is None:
        batch[key] = item


@dataclass
class _QueueState:
    """What a queue's consumer owns, kept on the broker so that it outlives a
    consumer restart (after a lost connection the new consumer flushes the old
    one's outcomes and yields its claimed messages)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: list[_Outcome] = field(default_factory=list)
    #: message_id -> proxy, for every message claimed and not yet settled.
    inflight: dict[str, PgMessageProxy] = field(default_factory=dict)
    #: claimed, not yet handed to Dramatiq.
    buffer: deque[PgMessageProxy] = field(default_factory=deque)
    #: handed to Dramatiq, taken back out of its work queue unstarted: its worker is stopping.
    unstarted: list[PgMessageProxy] = field(default_factory=list)
    #: started by a worker thread, ``running`` not yet written (oldest first).
    starts: dict[str, PgMessageProxy] = field(default_factory=dict)
    #: handed to Dramatiq, refused by the thread that came to it: its lease had run out (see
    #: ``PostgresBroker._started``); its consumer gives it back.
    lapsed: list[PgMessageProxy] = field(default_factory=list)
    wake_r: int = -1
    wake_w: int = -1
    #: When the oldest outcome not yet written was handed over (monotonic seconds).
    first_outcome_at: float = 0.0
    #: Set while the queue's settler cannot open its connection (no slot left on the server, the
    #: role's CONNECTION LIMIT): its consumer writes the outcomes on its own connection meanwhile.
    #: Else the jobs its threads ran stayed claimed, unrecorded, under the leases the consumer
    #: kept extending: no other worker could take them, and the queue claimed nothing more.
    settler_unconnected: bool = False
    #: Set by the process's notifier (under ``lock``, then ``wake``): a send NOTIFYed the
    #: queue, or ``control_plane.cancel_job`` asked its workers to heartbeat now.
    notified: bool = False
    cancel_heard: bool = False
    #: Signals the settler thread (shares ``lock``).
    settle_cond: threading.Condition = field(init=False)
    #: The queue's settler thread (``_Settler``): it outlives a consumer Dramatiq closes after an
    #: error, and the next consumer takes it over.
    settler: Any = None

    def __post_init__(self) -> None:
        self.settle_cond = threading.Condition(self.lock)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.wake_w, b"x")

    def hear(self, *, cancel: bool = False) -> None:
        """The notifier heard this queue named: a send (look at the queue), or a cancel (heartbeat now)."""
        with self.lock:
            if cancel:
                self.cancel_heard = True
            else:
                self.notified = True
        self.wake()

    def drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.wake_r, 4096):
                pass


def _refuse_a_workflows_duplicate(message: Message[Any], holder: str, key: str) -> None:
    """Raise ``Conflict`` for a pipeline's first step or a group's member that a send found to be
    a duplicate of the live job ``holder`` by its unique ``key``: that job is no part of the
    workflow, so the pipeline would never go on, or the group's callbacks never be sent, and its
    caller would wait out its timeout with nothing to say why. (A pipeline's later step, sent by
    the step before it, fails that step instead: ``tasks.middleware.canvas``.) The other messages
    of the send are sent, unless it joined the caller's transaction (``enqueue_in``), which the
    exception then rolls back."""
    options = message.options
    if queries.PIPE_SENT_BY in options:
        return
    if "pipe_target" in options:
        role = "the first step of a pipeline, whose next steps would never be sent"
    elif "group_completion_uuid" in options:
        role = f"a member of group {options['group_completion_uuid']}, whose completion callbacks would never be sent"
    else:
        return
    raise Conflict(
        f"job {holder} holds the unique key {key!r} of {message.actor_name} (job {message.message_id}), "
        f"{role}: that job is no part of it; keep unique keys off pipelines' and groups' messages"
    )


class PostgresBroker(dramatiq.Broker):
    """A Dramatiq broker that keeps its messages in PostgreSQL.

    Parameters:
      url: libpq URL of the control plane's database (``None``: from settings,
        which means ``DATABASE_URL`` or the embedded server).
      settings: poll interval, lease, heartbeat and pool settings.
      middleware: as for :class:`dramatiq.Broker`.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        settings: Settings | None = None,
        middleware: list[Middleware] | None = None,
    ) -> None:
        super().__init__(middleware=middleware)
        self.settings = settings or Settings.from_env()
        self._url = url
        self._url_lock = threading.Lock()
        self.queues: set[str] = set()
        #: The queues this process has consumers for (a worker's ``--queues``), which its heartbeat
        #: reports: ``queues`` holds every queue its modules declare, read or not.
        self.consumed: set[str] = set()
        self._states: dict[str, _QueueState] = {}
        self._states_lock = threading.Lock()
        self._pool = db.Pool(self.url, self.settings.pool_size)
        self.worker_id = worker_id(self.settings.hostname)
        #: This process's Dramatiq worker is stopping: see :meth:`_stop_claiming`.
        self.stopping = False
        #: The process's one LISTEN connection, started by its first consumer.
        self._notifier: _Notifier | None = None
        self._notifier_lock = threading.Lock()
        #: Writes the results that could not go with their outcomes.
        self.results_writer = _ResultWriter(self)
        #: When a consumer of this process last reaped (monotonic): see :meth:`_reap_due`.
        self._reaped_at = -math.inf
        self._reap_lock = threading.Lock()
        #: This process's lease keeper (``tasks/lease_keeper.py``), its beats written down its stdin;
        #: wanted once its worker booted, started at its first heartbeat (the database reached).
        self._keeper: subprocess.Popen[bytes] | None = None
        self._keeper_wanted = False
        #: When a keeper that died may be started again (monotonic): not at every heartbeat.
        self._keeper_again_at = 0.0
        #: Guards the keeper's fields: a pipe's number closed by one thread (its keeper gone) and reused
        #: by another's new socket must not be written to by a third that read it before.
        self._keeper_lock = threading.Lock()
        #: The process that started this one (Dramatiq's main process) when its worker booted, if
        #: ``multiprocessing`` started it.
        self._boot_parent: int | None = None
        self._boot_parent_lock = threading.Lock()
        # A forked worker process must not share its parent's sockets.
        os.register_at_fork(after_in_child=self._after_fork)

    def _reap_due(self, now: float) -> bool:
        """Whether a consumer whose reap is due reaps now: once per ``reap_interval`` in a process,
        by whichever of its consumers comes first. ``REAP`` looks at every queue's leases, and each
        consumer ran it: a worker reading 200 queues ran 40 a second, 13% of a core of the server.
        A reap that fails (:meth:`_reap_failed`) is due again at once, as it was per consumer."""
        with self._reap_lock:
            if now - self._reaped_at < self.settings.reap_interval * 0.9:
                return False
            self._reaped_at = now
            return True

    def _reap_failed(self) -> None:
        with self._reap_lock:
            self._reaped_at = -math.inf

    # -- middleware events ------------------------------------------------

    def _listeners(self, signal: str) -> list[Middleware]:
        """The middleware to call for ``signal`` (``before_...`` or ``after_...``), in calling
        order: the middleware list's for ``before_``, reversed for ``after_``, as Dramatiq calls them.

        Dramatiq's ``emit_*`` calls every middleware's method for every event,
        most of them the base class's no-ops: thirteen calls per event, six
        events per message. Here a middleware takes part when its class
        implements ``signal`` (and does not leave it to this broker, see
        :attr:`COVERED_SIGNALS`) or when the instance itself was given one (a
        test double, even one set after the first event). The lists are kept
        per signal and rebuilt when the middleware list changes; checking
        that costs one list comparison and one dict lookup per middleware.
        The method itself is looked up at each call, so a hook patched on a
        class later is the one called.
        """
        tables: dict[str, tuple[list[Middleware], tuple[dict[str, Any], ...], list[Middleware]]]
        tables = self.__dict__.setdefault("_listener_tables", {})
        table = tables.get(signal)
        if (
            table is not None
            and table[0] == self.middleware  # the same objects in the same order (compared by identity)
            and not any(map(operator.contains, table[1], repeat(signal)))
        ):
            return table[2]
        noop = getattr(Middleware, signal, None)
        listeners: list[Middleware] = []
        dicts: list[dict[str, Any]] = []
        cacheable = True
        for middleware in self.middleware:
            instance = getattr(middleware, "__dict__", None)
            if instance is not None:
                if signal in instance:
                    listeners.append(middleware)
                    cacheable = False  # a test double: look the list up again on each event
                    continue
                dicts.append(instance)
            cls = type(middleware)
            if getattr(cls, signal, None) is not noop and signal not in getattr(cls, COVERED_SIGNALS, ()):
                listeners.append(middleware)
        if signal.startswith("after_"):
            listeners.reverse()
        if cacheable:
            tables[signal] = (list(self.middleware), tuple(dicts), listeners)
        return listeners

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        if signal == "process_message" and args and isinstance(args[0], PgMessageProxy):
            if not self._started(args[0]):
                # Ended (its hooks sent and its caller told) or given back by its consumer: nothing
                # to do, and no middleware may act on it again (a late on_failure, a result overwritten).
                raise SkipMessage("cancelled, its queue paused or its lease run out before it started; its "
                                  "consumer saw to it")
        elif signal == "worker_shutdown":
            self._stop_claiming(args[0] if args else None)
        elif signal == "worker_boot":
            self._keeper_wanted = True  # (started at its first heartbeat: see _start_lease_keeper)
            # (a process Dramatiq's main process started: not an application running a Worker itself)
            parent = multiprocessing.parent_process()
            self._boot_parent = parent.pid if parent is not None else None  # (see _stop_if_orphaned)
        signal = "before_" + signal
        self._call(self._listeners(signal), signal, *args, **kwargs)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        if args and isinstance(args[0], PgMessageProxy) and args[0].ended_unstarted:
            return  # (see emit_before: skipped, unseen by the middleware)
        if signal == "worker_shutdown":  # its consumers are closed: a worker started later claims again
            self.stopping = False
            self._stop_lease_keeper()
        signal = "after_" + signal
        self._call(self._listeners(signal), signal, *args, **kwargs)

    def _call(self, listeners: list[Middleware], signal: str, *args: Any, **kwargs: Any) -> None:
        """Call ``signal`` on each of ``listeners`` as Dramatiq does: a failure is logged, except
        that a ``MiddlewareError`` in a ``before_`` hook stops the event (and the send)."""
        for middleware in listeners:
            try:
                getattr(middleware, signal)(self, *args, **kwargs)
            except Exception as exc:
                if isinstance(exc, dramatiq.middleware.MiddlewareError) and signal.startswith("before_"):
                    raise
                self.logger.critical("Unexpected failure in %s of %r.", signal, middleware, exc_info=True)

    # -- plumbing ---------------------------------------------------------

    def url(self) -> str:
        """The database URL, resolved on first use (this may start the embedded server)."""
        with self._url_lock:
            if self._url is None:
                try:
                    self._url = db.database_url(self.settings)
                except EmbeddedServerError as exc:
                    # A worker's consumer says it in one line and tries again (Dramatiq's
                    # ConnectionError), where any other error printed its traceback every 3 s.
                    raise EmbeddedServerDown(str(exc)) from exc
            return self._url

    def _stop_claiming(self, worker: Any) -> None:
        """This process's worker is stopping (SIGTERM): its consumers claim nothing more and
        give back at once what no worker thread started (see ``_give_back_unstarted``).

        Dramatiq stops the worker threads, waits for their jobs (up to its shutdown
        timeout, 10 minutes by default), and only then stops the consumers: until then
        they went on claiming into a work queue no thread reads any more, and what they
        held waited for the longest job to end while other workers sat idle.
        """
        self.stopping = True
        for message in _take_our_items(getattr(worker, "work_queue", None)):
            state = self.state(message.queue_name)
            with state.lock:
                state.unstarted.append(message)
        with self._states_lock:
            states = list(self._states.values())
        for state in states:
            state.wake()

    def _after_fork(self) -> None:
        self._pool = db.Pool(self.url, self.settings.pool_size)
        self.stopping = False
        self._states = {}
        self._states_lock = threading.Lock()
        self._notifier = None  # (the parent's thread is not in this process)
        self._notifier_lock = threading.Lock()
        self.results_writer = _ResultWriter(self)
        self.worker_id = worker_id(self.settings.hostname)
        self._reaped_at = -math.inf
        self._reap_lock = threading.Lock()
        if self._keeper is not None and self._keeper.stdin is not None:
            # The parent's keeper keeps the parent's leases, and must see its pipe close when the
            # parent dies: a child forked by an actor (multiprocessing) must not hold it open.
            # (Closed through its file, once: the Popen dropped below would close the number again.)
            with contextlib.suppress(OSError):
                self._keeper.stdin.close()
        if self._keeper is not None and self._keeper.stderr is not None:
            with contextlib.suppress(OSError):
                self._keeper.stderr.close()
        self._keeper, self._keeper_wanted = None, False
        self._keeper_again_at = 0.0
        self._keeper_lock = threading.Lock()
        self._boot_parent = None
        self._boot_parent_lock = threading.Lock()

    def _start_lease_keeper(self) -> None:
        """Start this worker process's lease keeper (``tasks/lease_keeper.py``): it keeps the
        leases of this process's claims while its own threads cannot heartbeat (a job holding
        the GIL), for ``CONTROLPLANE_LEASE_KEEPER_SECONDS``, and exits with this process.
        Called at the first heartbeat after the worker booted: the database's URL is known then
        (an embedded server that cannot start is the consumers' to report and wait out)."""
        self._keeper_wanted = False
        if self.settings.lease_keeper_seconds <= 0 or self._keeper is not None:
            return
        env = {
            **os.environ,
            "CONTROLPLANE_KEEPER_URL": self.url(),
            "CONTROLPLANE_KEEPER_CONNECT": encode_options(db.connect_options(self.url())),
            "CONTROLPLANE_KEEPER_SQL": queries.KEEP_LEASES,
            "CONTROLPLANE_KEEPER_WORKER": self.worker_id,
            "CONTROLPLANE_KEEPER_LEASE": str(self.settings.lease_seconds),
            "CONTROLPLANE_KEEPER_INTERVAL": str(self.settings.heartbeat_interval),
            "CONTROLPLANE_KEEPER_SECONDS": str(self.settings.lease_keeper_seconds),
            "CONTROLPLANE_KEEPER_PATH": str(Path(psycopg2.__file__).parent.parent),
        }
        script = str(Path(__file__).with_name("lease_keeper.py"))
        try:
            # (-I: its own interpreter sees none of this package, nor PYTHON* settings; -S: no
            # site, a lean start, psycopg2 imported from CONTROLPLANE_KEEPER_PATH when needed)
            # (a process group of its own: a Ctrl-C to the worker's must not end it before the worker)
            # (its lines go through this process's logging: Dramatiq points sys.stderr, not fd 2,
            # at its log pipe, so a keeper writing to fd 2 missed --log-file and its format)
            keeper = subprocess.Popen([sys.executable, "-I", "-S", script], stdin=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env=env, process_group=0)  # fmt: skip
        except OSError as exc:
            self._keeper_again_later()
            logger.warning("could not start the lease keeper (%s): it is tried again %s", exc, _KEEPER_AGAIN)
            return
        assert keeper.stdin is not None and keeper.stderr is not None
        os.set_blocking(keeper.stdin.fileno(), False)  # a keeper slow to read must never hold a heartbeat up
        self._keeper = keeper
        threading.Thread(target=_relay_keeper_log, args=(keeper.stderr,), name="lease-keeper-log",
                         daemon=True).start()  # fmt: skip

    def _beat(self) -> None:
        """Tell the lease keeper this process's threads run (a consumer heartbeated)."""
        with self._keeper_lock:  # (one keeper, whichever consumer heartbeats first)
            if self._keeper_wanted and time.monotonic() >= self._keeper_again_at:
                self._start_lease_keeper()
            keeper = self._keeper
            if keeper is None or keeper.stdin is None:
                return
            try:
                os.write(keeper.stdin.fileno(), b".")
                return
            except BlockingIOError:
                return  # its pipe is full of beats: it has heard enough of them
            except OSError as exc:
                error = exc
                self._keeper = None
                self._keeper_again_later()
                with contextlib.suppress(OSError):
                    keeper.stdin.close()  # (under the lock: no other thread holds its number)
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            keeper.wait(timeout=1)  # (not left a zombie)
        logger.warning("the lease keeper is gone (%s): it is started again %s", error, _KEEPER_AGAIN)

    def _keeper_again_later(self) -> None:
        """(Under ``_keeper_lock``.) A keeper that could not start, or died (killed), is started
        again at a heartbeat two leases on: not at each one, if it keeps failing."""
        self._keeper_wanted = True
        self._keeper_again_at = time.monotonic() + 2 * self.settings.lease_seconds

    def _stop_if_orphaned(self) -> None:
        """Stop this worker process, as a SIGTERM does, once the process that started it is gone.

        Dramatiq's main process forwards the signals its worker processes get, writes their logs
        and stops them all when one exits; killed itself (``kill -9`` of the PID a supervisor
        shows, an OOM kill) it left them running for ever, orphaned: taking jobs beside the
        workers started again, their log lines lost, unstopped by a SIGTERM to the PID that
        the supervisor knows."""
        parent = self._boot_parent
        # (not once it stops already, its running jobs finishing: a SIGTERM now would be the second,
        # Dramatiq's "kill now", as when a supervisor SIGKILLs the main process past its own stop timeout)
        if parent is None or self.stopping or os.getppid() == parent:
            return
        with self._boot_parent_lock:  # (once, whichever consumer's heartbeat sees it: a second SIGTERM kills)
            if self._boot_parent is None:
                return
            self._boot_parent = None
        logger.error("Dramatiq's main process (PID %d) is gone: this worker process stops, as on a SIGTERM "
                     "(its running jobs finish)", parent)
        os.kill(os.getpid(), signal_module.SIGTERM)

    def lease_kept(self) -> bool:
        """Whether this process's lease keeper runs (and so keeps its leases while its threads cannot)."""
        keeper = self._keeper  # (read once: another thread may drop it meanwhile)
        return keeper is not None and keeper.poll() is None

    def _stop_lease_keeper(self) -> None:
        with self._keeper_lock:
            keeper, self._keeper, self._keeper_wanted = self._keeper, None, False
            if keeper is None:
                return
            if keeper.stdin is not None:
                with contextlib.suppress(OSError):
                    keeper.stdin.close()  # its stdin ends: it exits
        try:
            keeper.wait(timeout=5)
        except subprocess.TimeoutExpired:
            keeper.kill()
            keeper.wait()

    def _started(self, message: PgMessageProxy) -> bool:
        """A worker thread is starting ``message``: its settler writes ``running`` if it lasts.
        False (not started) when its consumer ended it or gave it back first (``_take_unstarted``,
        under the same lock).

        The start time also sizes its consumer's claims (see ``_capacity``).
        """
        state = self.state(message.queue_name)
        # No heartbeat extended its claim within a lease (this process was stopped or frozen, its
        # threads starved, or the database out of reach): the reaper may have put it back and
        # another worker run it. Run here only if the database says the claim is still its own.
        now = time.monotonic()
        lapsed = now >= message.lease_until and not self._still_claimed(message)
        with state.lock:
            if message.ended_unstarted:
                return False
            if lapsed:
                # Not run here: its consumer gives it back (a no-op for a claim the reaper took).
                message.settled = message.ended_unstarted = True
                state.lapsed.append(message)
            else:
                message.started = True
                message.started_mono = now
                first = not state.starts
                state.starts[message.message_id] = message
                if first:
                    state.settle_cond.notify()
        if lapsed:
            state.wake()
            return False
        return True

    def _still_claimed(self, message: PgMessageProxy) -> bool:
        """Whether ``message``'s claim is still this worker's, its lease extended if so (a lease on
        from now: ``lease_until``): asked of the database by a thread about to start a message whose
        lease ran out here, which only a stall past a lease leaves (its lease keeper may have kept
        it meanwhile). False when the database cannot say."""
        before = time.monotonic()
        try:
            with self.connection() as conn, conn.cursor() as cur:
                cur.execute(queries.RENEW_CLAIM, {"id": message.message_id, "token": message.claim_token,
                                                  "lease": self.settings.lease_seconds})  # fmt: skip
                kept = cur.fetchone() is not None
        except psycopg2.Error as exc:
            logger.warning("could not tell whether message %s is still claimed here (%s): not run here",
                           message.message_id, db.loggable_error(exc))  # fmt: skip
            return False
        if kept:
            message.lease_until = before + self.settings.lease_seconds
        return kept

    def _listen(self) -> None:
        """Start the process's notifier, once: it wakes every consumer of this process."""
        with self._notifier_lock:
            if self._notifier is None or not self._notifier.is_alive():
                self._notifier = _Notifier(self)
                self._notifier.start()

    def _hear(self, payloads: Iterable[str]) -> None:
        """NOTIFY payloads the notifier read: wake the consumers of the queues they name."""
        for payload in payloads:
            cancel = payload.startswith(queries.CANCEL_NOTIFY_PREFIX)
            queue_name = payload[len(queries.CANCEL_NOTIFY_PREFIX):] if cancel else payload
            with self._states_lock:
                state = self._states.get(queue_name)
            if state is not None:  # (else a queue no consumer of this process reads)
                state.hear(cancel=cancel)

    def _hear_everything(self) -> None:
        """The notifier (re)started listening: what was sent meanwhile went unheard, so every
        consumer looks at its queue once."""
        with self._states_lock:
            states = list(self._states.values())
        for state in states:
            state.hear()

    def _stop_listening(self) -> None:
        """Stop the process's notifier; the next consumer to connect starts another."""
        with self._notifier_lock:
            notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.stop()

    def state(self, queue_name: str) -> _QueueState:
        with self._states_lock:
            if queue_name not in self._states:
                self._states[queue_name] = _QueueState()
            return self._states[queue_name]

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A pooled autocommit connection (for sends, results, inspection)."""
        with self._pool.connection() as conn:
            yield conn

    def close(self) -> None:
        """Write the outcomes no consumer is left to write, then close the pooled connections.

        Dramatiq's worker stops its threads before its consumers, and a consumer that lost
        its connection is replaced only after a delay: a SIGTERM in that delay leaves the
        attempts that finish during the shutdown with no consumer to settle them (their
        jobs would run again once their leases expired). The ``dramatiq`` command closes
        the broker after stopping the worker; this writes them then.
        """
        with self._states_lock:
            states = list(self._states.items())
        for queue_name, state in states:
            if state.settler is not None:
                state.settler.stop()  # (one that outlived its failed consumer: no other is coming)
            with state.lock:
                waiting = bool(state.outcomes)
            if not waiting:
                continue
            try:
                with self.connection() as conn:
                    _settle(self, state, conn)
            except Exception as exc:  # closing goes on: the leases expire and the reaper takes over
                logger.warning("queue %s: could not settle outcomes while closing (%s); leases will expire",
                               queue_name, db.loggable_error(exc) if isinstance(exc, psycopg2.Error) else exc)
        self.results_writer.close()
        self._stop_listening()
        self._pool.close()

    def reconfigure(self, url: str) -> None:
        """Point this broker at another database (tests, tools); closes pooled connections."""
        with self._url_lock:
            self._url = url
        old, self._pool = self._pool, db.Pool(self.url, self.settings.pool_size)
        old.close()
        self._stop_listening()  # the next consumer listens on the new database

    # -- declaring --------------------------------------------------------

    def declare_queue(self, queue_name: str) -> None:
        # Delays live in the table (eta), so there is no delay queue to declare.
        if queue_name not in self.queues:
            self.emit_before("declare_queue", queue_name)
            self.queues.add(queue_name)
            self.emit_after("declare_queue", queue_name)

    def get_declared_queues(self) -> set[str]:
        return set(self.queues)

    # -- enqueue ----------------------------------------------------------

    def _max_attempts(self, message: Message[Any]) -> int | None:
        """The message's attempts; None for an actor this process does not declare, sent
        without the option: its workers' declaration says (``control_plane.actor_defaults``)."""
        from tasks.middleware.retries import max_attempts_for

        if message.actor_name not in self.actors and _ATTEMPTS_OPTIONS.isdisjoint(message.options):
            return None
        return max_attempts_for(self, message)

    def _priority(self, message: Message[Any]) -> int | None:
        """The message's priority; None for an actor this process does not declare, sent
        without the option (as for ``_max_attempts``)."""
        priority = message.options.get("priority")
        if isinstance(priority, int) and not isinstance(priority, bool):
            return priority
        actor = self.actors.get(message.actor_name)
        return actor.priority if actor is not None else None

    def _default_attempts(self) -> int:
        """Attempts of a job whose actor nobody declared: the Retries middleware's default."""
        from tasks.middleware.retries import default_attempts

        return default_attempts(self)

    def declared_actors(self, queue_name: str) -> dict[str, list[Any]]:
        """DECLARE_ACTORS's parameters: the priority and attempts of this process's actors of a queue,
        and (DECLARE_RESULT_TTLS's) how long their results live."""
        from tasks.middleware.retries import max_attempts_for

        names = sorted(name for name, actor in self.actors.items() if actor.queue_name == queue_name)
        actors = [self.actors[name] for name in names]
        return {
            "actors": names,
            "queues": [queue_name] * len(names),
            "priorities": [actor.priority for actor in actors],
            "max_attempts": [max_attempts_for(self, actor.message()) for actor in actors],
            "result_ttls": [self.result_ttl_of(actor.message()) for actor in actors],
        }

    def result_ttl_of(self, message: Message[Any]) -> int | None:
        """How long ``message``'s result lives (:func:`result_ttl_for`); None without a ``Results``
        middleware."""
        results = results_middleware(self)
        return None if results is None else result_ttl_for(results, message, self)

    def default_result_ttl(self) -> int:
        """The lifetime of a result whose message and actor say none: ``CONTROLPLANE_RESULT_TTL_MS``
        (the ``Results`` middleware's)."""
        results = results_middleware(self)
        return int(results.result_ttl) if results is not None else self.settings.result_ttl_ms

    def enqueue(self, message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        """Store a message (and its jobs row); ``delay`` in milliseconds sets its eta.

        Called by Dramatiq's Retries middleware with the message being processed,
        the retry is recorded on the claim and written with its outcome instead.
        """
        if isinstance(message, PgMessageProxy):
            state = self.state(message.queue_name)
            with state.lock:
                held = state.inflight.get(message.message_id) is message
            if held:
                message.retry_delay_ms = min(max(int(delay or 0), 0), MAX_DELAY_MS)
                return message
            message = message._message
        (sent,) = self.enqueue_batch([message], delay=delay)
        # A duplicate of a live unique job comes back carrying that job's id.
        return message if sent.message_id == message.message_id else sent

    def enqueue_batch(self, messages: Sequence[Message[Any]], *, delay: int | None = None) -> list[Message[Any]]:
        """Store many messages in one round trip (joining :func:`enqueue_in` if active).

        A message whose ``unique_key`` option is held by a pending or running job
        is not stored: it comes back with that job's ``message_id`` instead.
        """
        if not messages:
            return []
        if delay and int(delay) > MAX_DELAY_MS:
            raise ValueError(f"a delay of {int(delay)} ms is more than the {MAX_DELAY_MS} ms (100 years) allowed")
        ids: list[str] = []
        queues: list[str] = []
        actors: list[str] = []
        priorities: list[int | None] = []
        etas: list[datetime | None] = []
        bodies: list[str] = []
        attempts: list[int | None] = []
        unique_keys: list[str | None] = []
        sent: list[Message[Any]] = []
        # Looked up once per batch: the before_enqueue middleware, and each actor's
        # priority and attempts for the messages whose options set neither.
        before, after = self._listeners("before_enqueue"), self._listeners("after_enqueue")
        actor_defaults: dict[str, tuple[int | None, int | None]] = {}
        first_steps: list[Message[Any]] = []
        for message in messages:
            queue_name = q_name(message.queue_name)
            if queue_name not in self.queues:
                check_queue_name(queue_name)  # a queue no actor here declares: one a worker can consume
                if message.actor_name in self.actors:
                    self.declare_queue(queue_name)
            # One copy per message, with options of its own: the eta option becomes the
            # row's eta, a delay queue's name (Dramatiq's convention) the queue's own name,
            # and what before_enqueue middleware adds (a computed unique_key) stays off the
            # caller's message and the copies it makes later.
            options = dict(message.options)
            eta_ms = options.pop("eta", None)
            if eta_ms is not None:
                check_eta(eta_ms, message.actor_name)
            message = _copy_message(message, queue_name, options)
            if before:
                self._call(before, "before_enqueue", message, delay)
            ids.append(_check_uuid(message.message_id))
            queues.append(queue_name)
            actors.append(message.actor_name)
            # The copy's options, as the hooks left them (a subclass's __post_init__ may copy the dict).
            options = message.options
            check_message_options(options, message.actor_name)
            if _PER_MESSAGE_OPTIONS.isdisjoint(options):
                defaults = actor_defaults.get(message.actor_name)
                if defaults is None:
                    defaults = actor_defaults[message.actor_name] = (
                        self._priority(message),
                        self._max_attempts(message),
                    )
                priorities.append(defaults[0])
                attempts.append(defaults[1])
            else:
                priorities.append(self._priority(message))
                attempts.append(self._max_attempts(message))
            # A relative delay is added to the database's clock, not this machine's.
            etas.append(datetime.fromtimestamp(eta_ms / 1000, tz=UTC) if isinstance(eta_ms, (int, float)) else None)
            unique_key = unique_key_of(options.get("unique_key"), message.actor_name)
            if unique_key is not None:
                options["unique_key"] = unique_key  # stored, body and row, as the key it is (an integer's string)
            unique_keys.append(unique_key)
            bodies.append(_body_text(message))
            sent.append(message)
            if "pipe_target" in options and queries.PIPE_SENT_BY not in options:
                check_follow_ups(options, message.actor_name)
                first_steps.append(message)  # a pipeline run (again), not a step sent by the one before
            elif "group_completion_callbacks" in options:
                check_follow_ups(options, message.actor_name)
        size = sum(map(len, bodies))
        if size > MAX_BATCH_CHARS:
            raise ValueError(
                f"a batch of {len(bodies):,} messages of {size:,} characters in all is past the {MAX_BATCH_CHARS:,} "
                "one statement takes here: send it in smaller batches"
            )
        if first_steps:
            from tasks.middleware.canvas import forget_last_runs_results

            forget_last_runs_results(self, first_steps)
        rows: dict[str, list[Any]] = {
            "ids": ids,
            "queues": queues,
            "actors": actors,
            "priorities": priorities,
            "etas": etas,
            "delays": [max(int(delay), 0) if delay else None] * len(ids),
            "bodies": bodies,
            "max_attempts": attempts,
            "unique_keys": unique_keys,
        }
        duplicates = self._execute_enqueue(rows)
        self._barriers_outlive_delays(sent, etas, delay)
        holders = self._holders(list(set(duplicates.values()))) if duplicates else {}
        for i, message in enumerate(sent):
            existing = duplicates.get(rows["ids"][i])
            if existing is None:
                if after:
                    self._call(after, "after_enqueue", message, delay)
                continue
            logger.info(
                "message %s not enqueued: job %s holds its unique key %r",
                message.message_id,
                existing,
                rows["unique_keys"][i],
            )
            _refuse_a_workflows_duplicate(message, existing, rows["unique_keys"][i])
            # The holder's actor and queue too: its result is found under them (keys span actors).
            actor_name, queue_name = holders.get(existing, (message.actor_name, message.queue_name))
            sent[i] = message.copy(message_id=existing, actor_name=actor_name, queue_name=queue_name)
        return sent

    def _barriers_outlive_delays(
        self, sent: list[Message[Any]], etas: list[datetime | None], delay: int | None
    ) -> None:
        """The barriers of the group members just sent with a delay (or an eta) live at least the
        middleware's ``barrier_ttl`` past the moment the member is due (``BARRIERS_OUTLIVE_DELAYS``):
        in the caller's transaction when it joins one, as the barrier was written."""
        delayed = bool(delay and int(delay) > 0)
        if not delayed and not any(etas):
            return
        keys, due_at, delays = [], [], []
        for message, eta in zip(sent, etas, strict=True):
            if eta is None and not delayed:
                continue
            group = message.options.get("group_completion_uuid")
            if not group and isinstance(message.options.get("pipe_target"), dict):
                # a group's member that is a pipeline: its last step carries the group
                from tasks.middleware.canvas import pipeline_end

                with contextlib.suppress(TypeError, ValueError, AttributeError):
                    group = (pipeline_end(message) or message).options.get("group_completion_uuid")
            if group:
                keys.append(str(group))
                due_at.append(eta)
                delays.append(max(int(delay or 0), 0))
        if not keys:
            return
        from dramatiq.middleware.group_callbacks import GroupCallbacks

        ttl = next((m.barrier_ttl for m in self.middleware if isinstance(m, GroupCallbacks)), None)
        if ttl is None:
            return
        params = {"keys": keys, "etas": due_at, "delays": delays, "ttl_ms": int(ttl)}
        caller = joined_connection()
        if caller is not None:
            with caller.cursor() as cur:
                cur.execute(queries.BARRIERS_OUTLIVE_DELAYS, params)
            return
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(queries.BARRIERS_OUTLIVE_DELAYS, params)

    def _holders(self, job_ids: list[str]) -> dict[str, tuple[str, str]]:
        """The actor and queue of the jobs holding unique keys a send found taken (those it can see)."""

        def read(conn: Any) -> dict[str, tuple[str, str]]:
            with conn.cursor() as cur:
                cur.execute(queries.JOB_ACTORS, {"ids": job_ids})
                return {job_id: (actor, queue) for job_id, actor, queue in cur.fetchall()}

        caller = joined_connection()
        if caller is not None:  # in the caller's transaction, where a holder may be uncommitted
            return read(caller)
        try:
            with self.connection() as conn:
                return read(conn)
        except psycopg2.Error as exc:  # the send is done: name the holder by its id only
            logger.warning("could not look up the jobs holding unique keys: %s", db.loggable_error(exc))
            return {}

    def _execute_enqueue(self, params: dict[str, list[Any]]) -> dict[str, str]:
        """Run ENQUEUE; returns {sent id: id of the live job holding its unique key} for duplicates."""
        duplicates: dict[str, str] = {}
        for _ in range(10):
            found: dict[str, str | None] = self._run_enqueue(params)
            duplicates.update((sent, job) for sent, job in found.items() if job is not None)
            # A key's holder committed after the statement began is invisible to it:
            # send those again; the next statement sees the holder, or that it finished.
            again = [i for i, message_id in enumerate(params["ids"]) if message_id in found and not found[message_id]]
            if not again:
                return duplicates
            params = {name: [values[i] for i in again] for name, values in params.items()}
        raise RuntimeError("unique keys kept changing hands while enqueueing; try again")

    def _run_enqueue(self, rows: dict[str, list[Any]]) -> dict[str, str | None]:
        caller = joined_connection()
        if caller is not None:
            # In the caller's transaction a send must not hold SENDING_LOCK until that commits: it wakes always.
            statement, params, keyed = _enqueue_statement(
                rows, always_wake=True, default_attempts=self._default_attempts()
            )
            # A key's holder committing meanwhile must not abort the caller's transaction: a keyed
            # send runs under a savepoint (a subtransaction: more than 64 in one transaction slow
            # other sessions' reads while it is open; send many as one enqueue_batch).
            savepoint = keyed and not caller.autocommit
            with caller.cursor() as cur:
                if savepoint:
                    cur.execute("SAVEPOINT controlplane_send")
                try:
                    statement.execute(cur, params, prepare=False)
                    row = cur.fetchone()
                except psycopg2.errors.UniqueViolation as exc:
                    if not keyed or exc.diag.constraint_name != queries.LIVE_KEY_INDEX:
                        raise
                    if savepoint:
                        cur.execute("ROLLBACK TO SAVEPOINT controlplane_send")
                        cur.execute("SHOW transaction_isolation")
                        if cur.fetchone()[0] != "read committed":
                            raise  # its snapshot will never see the holder: the caller's to retry
                    return dict.fromkeys(rows["ids"])  # all of them again: the next statement sees the holder
                if savepoint:
                    cur.execute("RELEASE SAVEPOINT controlplane_send")
            return row[1] if keyed else {}
        lost_reply = False
        for attempt in (1, 2):
            try:
                with self.connection() as conn, conn.cursor() as cur:
                    if lost_reply:
                        rows = _not_stored(cur, rows)
                        if not rows["ids"]:
                            return {}
                    statement, params, keyed = _enqueue_statement(
                        rows, always_wake=not self.settings.wake_only_waiting,
                        default_attempts=self._default_attempts(),
                    )
                    statement.execute(cur, params, prepare=self.settings.prepared_statements)
                    row = cur.fetchone()
                return row[1] if keyed else {}
            except psycopg2.errors.UniqueViolation as exc:
                if exc.diag.constraint_name != queries.LIVE_KEY_INDEX:
                    raise
                # A key's holder committed while the statement waited on the index (a finished
                # job re-sent as a new one took the key): all of it again, to see the holder.
                return dict.fromkeys(rows["ids"])
            except psycopg2.errors.UndefinedTable as exc:
                # (a new folder's new embedded server, or a database never migrated)
                raise SchemaMissing(
                    f"cannot send: the database's control-plane tables are missing or older than this release "
                    f"({db.loggable_error(exc)}): run `controlplane migrate` against it"
                ) from exc
            except psycopg2.Error as exc:
                # The statement is atomic: after a deadlock (rolled back) running it again is
                # safe. After a lost connection it may have committed with its reply lost;
                # the second try first leaves out what it finds stored (see _not_stored).
                if attempt == 2 or not (db.is_connection_error(exc) or db.is_transient(exc)):
                    if db.is_connection_error(exc):
                        raise ConnectionClosed(exc) from exc
                    raise
                lost_reply = db.is_connection_error(exc)
        raise AssertionError("unreachable")

    # -- consuming --------------------------------------------------------

    def consume(self, queue_name: str, prefetch: int = 1, timeout: int = 30000) -> _PostgresConsumer:
        self.consumed.add(queue_name)
        return _PostgresConsumer(self, queue_name, prefetch, timeout)

    # -- housekeeping and tests -------------------------------------------

    def flush(self, queue_name: str) -> None:
        self.flush_queues([queue_name])

    def flush_all(self) -> None:
        self.flush_queues(sorted(self.queues))

    def flush_queues(self, queue_names: Iterable[str]) -> None:
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(queries.FLUSH_QUEUE, {"queues": list(queue_names)})

    def join(self, queue_name: str, *, timeout: int | None = None) -> None:
        """Wait until no message of ``queue_name`` is waiting or running."""
        deadline = None if timeout is None else time.monotonic() + timeout / 1000
        attempts = 0
        while True:
            with self.connection() as conn, conn.cursor() as cur:
                cur.execute(queries.COUNT_OUTSTANDING, {"queues": [queue_name]})
                (count,) = cur.fetchone()
            if count == 0:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise QueueJoinTimeout(queue_name)
            attempts, delay = compute_backoff(attempts, factor=10, max_backoff=500)
            time.sleep(delay / 1000)


class _PostgresConsumer(dramatiq.Consumer):
    """Claims and keeps leases for one queue on one connection; settles on another.

    Only the consumer thread runs SQL on its connection (claims, heartbeats,
    the reaper); the process's notifier listens for it. Worker threads hand their outcomes to the queue
    state; a settler thread writes them with its own connection, so a claim
    never waits behind a settle, and wakes the consumer through a pipe when
    slots are free again.
    """

    def __init__(self, broker: PostgresBroker, queue_name: str, prefetch: int, timeout: int) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self.settings = broker.settings
        #: CONTROLPLANE_QUEUE_CONCURRENCY: at most this many of the queue's jobs held (and run) at once.
        self.limit = self.settings.queue_concurrency.get(queue_name)
        self.prefetch = max(min(prefetch, self.limit or prefetch), 1)
        #: Mean run time of this queue's recent jobs (seconds, moving average); None until one ran.
        self.mean_run: float | None = None
        self.timeout = timeout / 1000
        self.state = broker.state(queue_name)
        self.conn: Any = None
        self._notified = True  # look at once on start
        #: An error left __next__: Dramatiq restarts this consumer, its worker threads go on.
        self._failed = False
        #: Whether this consumer can read control_plane.queue_pauses (migration 0017): see _look_for_pauses.
        self._pauses = True
        #: Whether its actors were recorded in control_plane.actor_defaults: see _declare_actors.
        self._declared = True
        self._more = False
        #: Holds WAITING_LOCK: its last claim came back short, sends must NOTIFY it.
        self._waiting = False
        now = time.monotonic()
        self._next_poll = now
        self._next_heartbeat = now
        #: When this consumer's last heartbeat ran (monotonic): see _say_if_late.
        self._last_heartbeat: float | None = None
        self._next_reap = now + self.settings.reap_interval * 0.5
        try:
            self._connect()
        except psycopg2.Error as exc:
            raise _connection_lost(self.broker, exc) from exc
        settler = self.state.settler
        if settler is not None and settler.is_alive() and not settler.stopping:
            settler.consumer = self  # (the failed consumer's, still writing its outcomes)
            self._settler = settler
        else:
            self._settler = self.state.settler = _Settler(self)
            self._settler.start()

    def _connect(self) -> None:
        self.conn = _claims_connection(self.broker, f"controlplane-worker:{self.queue_name}")
        with self.conn.cursor() as cur:
            cur.execute(f"SELECT to_regclass('control_plane.messages') IS NOT NULL, "
                        f"to_regclass('control_plane.{_NEEDED_TABLE}') IS NOT NULL")  # fmt: skip
            migrated, recent = cur.fetchone()
        if not (migrated and recent):
            self.conn.close()
            raise SchemaMissing(
                f"queue {self.queue_name!r}: the database has no control-plane tables yet: run `controlplane "
                "migrate` against it (this worker starts consuming once they are there)" if not migrated else
                f"queue {self.queue_name!r}: the database's control-plane schema is older than revision "
                f"{_NEEDED_REVISION}, which this release's workers need (a pipeline's next steps and a group's "
                "callbacks would not be sent, the reaper would fail): run `controlplane migrate` against it "
                "(this worker starts consuming once it is done)"
            )  # fmt: skip
        self._look_for_pauses()
        # Wake-ups come through the process's notifier (one LISTEN per process, not per queue:
        # PostgreSQL signals every listening connection at every notifying send).
        self.broker._listen()
        self._declared = self._declare_actors()

    def _declare_actors(self) -> bool:
        """Record what its actors' senders may not know: their priority and attempts (migration
        0015). Consuming needs none of it: refused, it says what to do, once, and is tried again
        at each reap (a grant given later). Whether it was recorded (or there was nothing to)."""
        declared = self.broker.declared_actors(self.queue_name)
        if not declared["actors"]:
            return True
        try:
            with self.conn.cursor() as cur:
                cur.execute(queries.DECLARE_ACTORS, declared)
        except (*_NOT_MIGRATED, psycopg2.DataError, psycopg2.errors.ProgramLimitExceeded) as exc:
            if not _declare_refused.is_set():
                _declare_refused.set()
                fix = (
                    "grant the worker's role INSERT and UPDATE on it" if isinstance(exc, _NOT_MIGRATED)
                    else "an actor's name or priority was changed after it was declared"
                )
                logger.error("cannot record this worker's actors in control_plane.actor_defaults (%s): "
                             "%s; sends by name get priority 0 meanwhile", db.loggable_error(exc), fix)
            return False
        try:  # (a statement of its own: see DECLARE_RESULT_TTLS)
            with self.conn.cursor() as cur:
                cur.execute(queries.DECLARE_RESULT_TTLS, declared)
        except psycopg2.errors.UndefinedColumn:
            pass  # before 0021: the results SQL stores (a cancel's, the reaper's) keep their defaults meanwhile
        except (*_NOT_MIGRATED, psycopg2.DataError, psycopg2.errors.TransactionRollbackError) as exc:
            logger.warning("cannot record how long this worker's actors' results live in "
                           "control_plane.actor_defaults (%s)", db.loggable_error(exc))  # fmt: skip
        return True

    # -- Dramatiq's interface ----------------------------------------------

    def ack(self, message: dramatiq.MessageProxy) -> None:
        assert isinstance(message, PgMessageProxy)
        if message.settled:
            return  # (ended or given back already: see _PostgresConsumer._take_unstarted)
        self._observe(message)
        message.settled = True
        if message.retry_delay_ms is not None:
            options = message.options
            options.pop("traceback", None)  # tracebacks may quote secrets; errors are kept in the mirror
            try:
                body: bytes | None = encode_message(message._message)
            except NotSerializable as exc:
                # The actor changed its arguments (the message's own objects: a dict it was given,
                # stamped with a datetime) into what JSON cannot hold. Raised here, the outcome was
                # never written: the job stayed claimed, "running", under leases its worker kept
                # extending until it restarted. SETTLE keeps the body it holds instead.
                logger.warning("message %s: its retry cannot be written as its arguments now are (%s): it is "
                               "retried with the arguments it was sent with", message.message_id, exc)
                body = None
            outcome = _Outcome(
                "retry",
                message.message_id,
                message.claim_token,
                delay_ms=message.retry_delay_ms,
                body=body,
                error=message.error_text or _describe(message),
                started_mono=message.started_mono,
            )
        else:
            outcome = _Outcome(
                "ack",
                message.message_id,
                message.claim_token,
                result_json=message.result_json,
                started_mono=message.started_mono,
                stored_result=message.stored_result,
                group_marker=getattr(message, "group_marker", None),
            )
        self._hand_over(outcome)

    def nack(self, message: dramatiq.MessageProxy) -> None:
        assert isinstance(message, PgMessageProxy)
        if message.settled:
            return  # (ended or given back already: see _PostgresConsumer._take_unstarted)
        self._observe(message)
        message.settled = True
        error = message.error_text or _describe(message) or "rejected by middleware"
        # An attempt interrupted by control_plane.cancel_job ends its job cancelled, not failed.
        kind = "cancel" if isinstance(message._exception, Cancelled) else "nack"
        self._hand_over(
            _Outcome(kind, message.message_id, message.claim_token, error=error, started_mono=message.started_mono,
                     stored_result=message.stored_result)
        )

    def requeue(self, messages: Iterable[dramatiq.MessageProxy]) -> None:
        """Give back prefetched messages at once (graceful shutdown)."""
        # (less those given back already, by a cancel or a pause: their claims are over)
        proxies = [m for m in messages if isinstance(m, PgMessageProxy) and not m.ended_unstarted]
        try:
            self._give_back(proxies)
        except psycopg2.Error as exc:
            # Dramatiq's Worker.stop catches only its own ConnectionError: raised, this would
            # end the shutdown before the consumers close and settle what finished.
            logger.warning("could not give back %d prefetched message(s) (%s); their leases will expire",
                           len(proxies), db.loggable_error(exc))

    def close(self) -> None:
        """Flush what the worker threads finished, give back the rest, close.

        After an error Dramatiq closes a consumer and starts another while its worker
        threads go on: then nothing is given back. What they run or have waiting was
        handed over already; given back, another worker could run it at the same time
        (and the queue's concurrency limit would not hold). The queue's state outlives
        this consumer: the next one extends those claims, settles them, and yields what
        was claimed and not yet handed over, as after a lost connection.

        After an error the settler goes on, for the next consumer to take over: stopped with
        this one, it wrote nothing until Dramatiq started the next (3 s later, and only once
        the database is back), while another process's consumer, back first, claimed the
        messages whose claims a crash had undone and whose outcomes waited here (oldest in
        the queue: its first claim takes them), and ran them again (a helper's crash test).
        """
        if not self._failed:
            self._settler.stop()
        try:
            if self._usable():
                self._flush()
                if not self._failed:
                    with self.state.lock:
                        leftovers = list(self.state.inflight.values())
                        self.state.buffer.clear()
                    self._release(leftovers)
                    if any(p.started for p in leftovers):
                        # An interrupted last attempt is left to a reap (RELEASE): this process's,
                        # now, which declares its actors and so can send its failure hooks (a
                        # worker of another pool might not).
                        self._reap()
                    with self.conn.cursor() as cur:
                        cur.execute(queries.WORKER_GONE, {"worker": self.broker.worker_id})
        except psycopg2.Error:
            logger.warning("could not settle or release messages while closing; leases will expire")
        finally:
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    self.conn.close()

    def __next__(self) -> dramatiq.MessageProxy | None:
        try:
            return self._next()
        except psycopg2.Error as exc:
            lost = db.is_connection_error(exc)
            if not lost and db.is_transient(exc):
                # The server rolled back one claim, heartbeat or reap to break a deadlock:
                # nothing was half done and the connection is fine. Dramatiq would restart
                # the consumer; the next call runs it again.
                logger.warning(
                    "%s rolled back by the server (%s); running it again", self.queue_name, type(exc).__name__
                )
                return None
            self._failed = True  # Dramatiq will close this consumer and start another (see close)
            if lost:
                raise _connection_lost(self.broker, exc) from exc
            raise
        except Exception:
            self._failed = True
            raise

    # -- internals ------------------------------------------------------------

    def _usable(self) -> bool:
        return db.connection_is_usable(self.conn)

    def _capacity(self) -> int:
        """How many messages this consumer may hold: Dramatiq's prefetch, times
        ``burst_prefetch`` while its jobs are short.

        Each claim and each settle costs a round trip, a commit and a plan
        lookup whatever its size, so short jobs drain faster in bigger batches
        (a 2x8 drain of no-op jobs: ~3,300 jobs/s at prefetch 16, ~4,400 at 32
        or 64). Holding more than the threads can start is only cheap when the
        jobs are short: a worker sitting on long jobs would starve the others.
        A queue with a concurrency limit never bursts above it.
        """
        mean = self.mean_run
        if self.limit is None and self.settings.burst_prefetch > 1 and mean is not None and mean < SHORT_JOB_SECONDS:
            return self.prefetch * self.settings.burst_prefetch
        return self.prefetch

    def _half_capacity(self) -> int:
        """Under a backlog, the size of a batch: outcomes written together, slots claimed together."""
        return max(1, self._capacity() // 2)

    def _observe(self, message: PgMessageProxy) -> None:
        """Fold the run time of a message that just finished into the moving average."""
        if message.started_mono:
            seconds = time.monotonic() - message.started_mono
            mean = self.mean_run
            self.mean_run = seconds if mean is None else mean + 0.1 * (seconds - mean)

    def _hand_over(self, outcome: _Outcome) -> None:
        with self.state.lock:
            first = not self.state.outcomes
            if first:
                self.state.first_outcome_at = time.monotonic()
            self.state.outcomes.append(outcome)
            # Wake the settler only when it has something new to decide: the first
            # outcome of a batch, or a batch big enough to write at once.
            if first or len(self.state.outcomes) == self._half_capacity():
                self.state.settle_cond.notify()
        if self.state.settler_unconnected:
            self.state.wake()  # (the consumer writes it: see _QueueState.settler_unconnected)

    def _settle_due(self) -> float:
        """0 when something should be written now, else how long to wait; -1: nothing to write.

        With a backlog (the last claim filled every free slot), outcomes are
        gathered for up to ``settle_window`` or until half the prefetch finished,
        so that one SETTLE and one CLAIM serve many messages. An idle queue
        settles at once: latency matters more than batching there. A start is
        due once its job has run for ``RUNNING_MARK_DELAY_SECONDS``.
        """
        with self.state.lock:
            pending = len(self.state.outcomes)
            first = self.state.first_outcome_at
            oldest = next(iter(self.state.starts.values())).started_mono if self.state.starts else None
        now = time.monotonic()
        marks = -1.0 if oldest is None else max(oldest + RUNNING_MARK_DELAY_SECONDS - now, 0.0)
        if pending == 0:
            return marks
        window = self.settings.settle_window_ms / 1000
        if not self._more or window <= 0 or pending >= self._half_capacity():
            return 0.0
        due = max(first + window - now, 0.0)
        return due if marks < 0 else min(due, marks)

    def _settle_here(self) -> None:
        """Write the waiting outcomes on this consumer's connection: its settler has none."""
        try:
            self._flush()
        except psycopg2.Error as exc:
            if db.is_connection_error(exc) or db.is_transient(exc):
                raise  # (the outcomes are kept: the next consumer, or the next call, writes them)
            _settle_failed(self, exc)

    def _next(self) -> dramatiq.MessageProxy | None:
        deadline = time.monotonic() + self.timeout
        while True:
            self._housekeeping()
            if self.state.settler_unconnected:
                self._settle_here()
            if self.broker.stopping:
                # Heartbeats go on for the jobs still running; nothing new is claimed or handed out.
                self._give_back_unstarted()
                now = time.monotonic()
                if now >= deadline:
                    return None
                self._wait(max(min(deadline, self._next_heartbeat, self._next_reap) - now, 0.0))
                continue
            with self.state.lock:
                if self.state.buffer:
                    return self.state.buffer.popleft()
                capacity = self._capacity()
                free = capacity - len(self.state.inflight)
            # With a backlog, claim in batches of at least half the prefetch: with a
            # prefetch of twice the threads, a thread can only be idle when that many are free.
            threshold = max(1, capacity // 2) if self._more and self.settings.settle_window_ms > 0 else 1
            now = time.monotonic()
            if free >= threshold and (self._notified or self._more or now >= self._next_poll):
                self._notified = False
                size = _claim_size(free)
                got = self._claim(size)
                self._more = got == size
                self._next_poll = time.monotonic() + self.settings.poll_interval
                if self._more == self._waiting:
                    self._set_waiting(not self._more)
                    if self._waiting:
                        # Sends that committed since that claim's snapshot may not have seen us
                        # waiting: the next claim finds them.
                        self._notified = True
                        continue
                if got:
                    continue
            now = time.monotonic()
            if now >= deadline:
                return None
            # With no free slot, polling is pointless: the settler wakes us through
            # the pipe when it frees slots. (Waiting on a past poll time would spin the CPU.)
            wake_at = [deadline, self._next_heartbeat, self._next_reap]
            if free >= threshold:
                wake_at.append(self._next_poll)
            self._wait(max(min(wake_at) - now, 0.0))

    def _say_if_late(self, now: float, ids: list[str]) -> None:
        """Say so when this heartbeat comes too late for the leases the last one extended: the
        reaper may have put this worker's jobs back, and another worker may be running them
        while this one still does (a run twice, at once). Nothing in the queue's own code waits
        that long: this consumer thread did not run, most often because a job held the GIL in
        one long call into C (a regex that backtracks, ``sorted`` of a huge list, an extension
        that does not release it), which also starves the heartbeat of every queue here."""
        lease, held = self.settings.lease_seconds, len(ids)
        if self._last_heartbeat is None or now - self._last_heartbeat < lease or not held:
            return
        silent = now - self._last_heartbeat
        # (its keeper running is not its claims kept: it may not have reached the database, or
        # kept them too late; whether they are all still this worker's is the database's to say)
        if (
            self.broker.lease_kept()
            and silent < self.settings.lease_keeper_seconds
            and self._reaped_since(ids, silent + 1) == 0
        ):
            logger.warning(
                "queue %s: this worker's last heartbeat was %.0f s ago, past its %.0f s lease "
                "(CONTROLPLANE_LEASE_SECONDS): its threads did not run for that long (a job holding the GIL in "
                "one long call: C code, a regex, a huge sort), or the database could not be reached. Its lease "
                "keeper kept its %d claim(s) meanwhile",
                self.queue_name, silent, lease, held,
            )  # fmt: skip
            return
        logger.warning(
            "queue %s: this worker's last heartbeat was %.0f s ago, past its %.0f s lease "
            "(CONTROLPLANE_LEASE_SECONDS): its %d claim(s) may have been put back and run by another worker at "
            "the same time. Its threads did not run for that long (a job holding the GIL in one long call: C "
            "code, a regex, a huge sort; or a stopped process), or the database could not be reached. Keep such "
            "calls shorter than the lease, or raise the lease",
            self.queue_name, now - self._last_heartbeat, lease, held,
        )  # fmt: skip

    def _renew(self, ids: list[str], now: float, done: float) -> None:
        """A heartbeat that began at ``now`` and returned at ``done`` extended the claims ``ids`` that
        are still this worker's: they are ours for a lease from ``now`` (the database's lease starts
        later). Only those whose lease here outlived the statement (``done``): the database's, no
        earlier, had not run out when it ran, so no reaper can have taken them before it. One whose
        lease ran out while it was on its way (the thread descheduled, the statement slow) may have
        been taken, and the heartbeat then extended nothing: a thread about to start it asks the
        database first (``PostgresBroker._still_claimed``)."""
        until = now + self.settings.lease_seconds
        with self.state.lock:
            for message_id in ids:
                proxy = self.state.inflight.get(message_id)
                if proxy is not None and proxy.lease_until > done:
                    proxy.lease_until = max(proxy.lease_until, until)

    def _give_back_lapsed(self, lapsed: list[PgMessageProxy]) -> None:
        """Messages a thread did not start, their claims no longer this worker's (``_still_claimed``):
        ``RELEASE`` leaves alone those the reaper took, and puts back one the database could not
        be asked about, if it is still ours."""
        self._give_back(lapsed)
        logger.warning("%s: %d message(s) held here unstarted were taken back by the reaper (or could not be "
                       "confirmed as still this worker's) while this process went without a heartbeat past "
                       "their lease (stopped, frozen, or cut off from the database): not run here (another "
                       "worker may have run them)", self.queue_name, len(lapsed))

    def _reaped_since(self, ids: list[str], seconds: float) -> int:
        """How many of the claims ``ids`` the reaper took from this worker in the last ``seconds``.
        (Not how many are still claimed: the settler may have settled some since they were listed.)"""
        with self.conn.cursor() as cur:
            cur.execute(queries.REAPED_SINCE, {"ids": ids, "worker": self.broker.worker_id, "secs": seconds})
            (reaped,) = cur.fetchone()
        return int(reaped)

    def _give_back_unstarted(self) -> None:
        """Release the messages claimed and not started: those not handed to Dramatiq yet, and
        those ``_stop_claiming`` took out of the stopping worker's work queue (Dramatiq would
        give them back only after its threads' last jobs end)."""
        with self.state.lock:
            # (less those given back already: a cancel's or a pause's, which no thread will start)
            unstarted = [p for p in (*self.state.buffer, *self.state.unstarted) if not p.ended_unstarted]
            self.state.buffer.clear()
            self.state.unstarted.clear()
        if unstarted:
            logger.info("%s: stopping; giving back %d message(s) no thread started", self.queue_name, len(unstarted))
            self.requeue(unstarted)

    def _set_waiting(self, waiting: bool) -> None:
        """Start or stop waiting for NOTIFYs (``models.queries.SENDING_LOCK``, ``WAITING_LOCK``)."""
        try:
            with self.conn.cursor() as cur:
                cur.execute(queries.ARM_WAIT if waiting else queries.DISARM_WAIT, {"queue": self.queue_name})
        except (psycopg2.errors.LockNotAvailable, psycopg2.errors.QueryCanceled):
            # A send took longer than ARM_WAIT_TIMEOUT_MS to commit (or than a statement_timeout
            # a DBA set below it; or an operator cancelled the wait). We hold WAITING_LOCK (a
            # session lock outlives the rolled-back statement): later sends wake us, and the
            # next poll finds what the slow one sent.
            logger.info("%s: a send in flight is slow to commit; its message waits for the next poll", self.queue_name)
        self._waiting = waiting

    def _wait(self, seconds: float) -> None:
        # The pipe is written by the settler (slots freed) and by the notifier (a NOTIFY for
        # this queue), each after setting what it has to say: a wake-up given while this
        # thread ran a statement is still in the pipe, and select() returns at once.
        readable, _, _ = select.select([self.state.wake_r], [], [], seconds)
        if readable:
            self.state.drain_wake()
        with self.state.lock:
            notified, cancel_heard = self.state.notified, self.state.cancel_heard
            self.state.notified = self.state.cancel_heard = False
        if notified:
            self._notified = True
        if cancel_heard:
            # control_plane.cancel_job: heartbeat now, which finds the cancelled messages we hold.
            self._next_heartbeat = 0.0

    def _claim(self, limit: int) -> int:
        token = str(uuid.uuid4())
        lease_until = time.monotonic() + self.settings.lease_seconds  # (no later than the database's)
        with self.conn.cursor() as cur:
            _claim_statement(limit, pauses=self._pauses).execute(
                cur,
                {
                    "queue": self.queue_name,
                    "token": token,
                    "worker": self.broker.worker_id,
                    "lease": self.settings.lease_seconds,
                },
                prepare=self.settings.prepared_statements,
            )
            rows = cur.fetchall()
        malformed: list[tuple[str, DecodeError]] = []
        now_ms = current_millis()
        for message_id, body, age_ms in rows:
            try:
                message = Message.decode(bytes(body))
            except DecodeError as exc:
                malformed.append((message_id, exc))
                continue
            proxy = PgMessageProxy(message, token)
            proxy.message_timestamp = now_ms - age_ms
            proxy.lease_until = lease_until
            with self.state.lock:
                earlier = self.state.inflight.get(message.message_id)
                self.state.inflight[message.message_id] = proxy
                self.state.buffer.append(proxy)
            if earlier is not None:
                # Claimed here before, and that claim lost (a crash undid it, or its lease expired
                # and the reaper put it back): its copy no thread started is not run; this one is.
                self._take_unstarted([earlier])
        # After the others are held: a failed rejection must not leave them claimed and unknown.
        for message_id, error in malformed:
            self._reject_malformed(message_id, token, error)
        return len(rows)

    def _reject_malformed(self, message_id: str, token: str, exc: DecodeError) -> None:
        cause = exc.__cause__ or exc
        error = f"malformed message: its body could not be decoded ({type(cause).__name__})"
        logger.error("message %s: %s; removed from the queue", message_id, error)
        with self.conn.cursor() as cur:
            cur.execute(queries.REJECT_MALFORMED, {"id": message_id, "token": token, "error": error})

    def _flush(self, conn: Any = None) -> None:
        """Write the gathered outcomes and the due start marks in one SETTLE, on ``conn``
        (default: the consumer's). See :func:`_settle`."""
        _settle(self.broker, self.state, conn if conn is not None else self.conn)

    def _plain_outcomes(self) -> None:
        """Strip the waiting outcomes of their results, and their errors of what text cannot hold.

        After a SETTLE whose values were refused: the same batch would fail every retry, and
        every outcome of the queue that joins it. ``to_json`` and ``describe_error`` keep the
        known ones out; this is the backstop.
        """
        with self.state.lock:
            self.state.outcomes = [
                dataclasses.replace(o, result_json=None, error=storable_text(o.error) if o.error else o.error)
                for o in self.state.outcomes
            ]

    def _results_apart(self) -> None:
        """Take the waiting outcomes' results out of the next SETTLE and store them now, apart.

        After a SETTLE failed for another reason than a lost connection or a rollback
        (a role that may not write ``control_plane.results``, say): the outcomes must not
        wait on the results table. Their callers then see a result before the outcome, as
        a result too big to go with its outcome is seen; one that cannot be stored is logged
        (by :class:`_ResultWriter`, which does not hold up this thread).
        """
        with self.state.lock:
            apart = [o.stored_result for o in self.state.outcomes if o.stored_result is not None]
            if not apart:
                return
            self.state.outcomes = [dataclasses.replace(o, stored_result=None) for o in self.state.outcomes]
        self.broker.results_writer.put(apart)

    def _housekeeping(self) -> None:
        if self.state.lapsed:  # (read without the lock: called for every message handed out)
            with self.state.lock:
                lapsed, self.state.lapsed = self.state.lapsed, []
            self._give_back_lapsed(lapsed)
        now = time.monotonic()
        if now >= self._next_heartbeat:
            with self.state.lock:
                ids = list(self.state.inflight)
                tokens = list(dict.fromkeys(p.claim_token for p in self.state.inflight.values()))
            self._say_if_late(now, ids)
            with self.conn.cursor() as cur:
                cur.execute(
                    queries.HEARTBEAT if self._pauses else queries.HEARTBEAT_BEFORE_PAUSES,
                    {
                        "lease": self.settings.lease_seconds,
                        # by id, through the primary key: by token alone it read every claimed
                        # message of every worker (21 ms with 100,000 of them, per consumer)
                        "ids": ids,
                        "tokens": tokens,
                        "worker": self.broker.worker_id,
                        "hostname": socket.gethostname(),
                        "pid": os.getpid(),
                        "queues": sorted(self.broker.consumed),
                        "queue": self.queue_name,
                    },
                )
                cancelled, skipped, paused = cur.fetchone()
            self._last_heartbeat = now
            self._renew(ids, now, time.monotonic())
            self.broker._stop_if_orphaned()
            self.broker._beat()
            # A lease skipped because its row was being written is extended soon, not a whole
            # interval later (which, with an interval over half the lease, could let it expire).
            interval = self.settings.heartbeat_interval
            self._next_heartbeat = now + (min(interval, SKIPPED_HEARTBEAT_RETRY_SECONDS) if skipped else interval)
            if cancelled:
                # An operator cancelled messages we hold: interrupt the threads running them.
                from tasks.middleware.cancellation import interrupt

                with self.state.lock:
                    held = [self.state.inflight[i] for i in cancelled if i in self.state.inflight]
                self._end_unstarted(interrupt(self.broker, held))
            if paused:
                self._give_back_paused()
        if now >= self._next_reap:
            if not self._pauses:
                self._look_for_pauses()
            if not self._declared:
                self._declared = self._declare_actors()
            more = False
            if self.broker._reap_due(now):
                try:
                    more = self._reap()
                except BaseException:
                    self.broker._reap_failed()  # (the consumer runs it again, or another does)
                    raise
            if more:  # (a full batch: more expired claims may wait, reaped at this consumer's next look)
                self.broker._reap_failed()
                self._next_reap = now
            else:
                self._next_reap = now + self.settings.reap_interval

    def _look_for_pauses(self) -> None:
        """Whether this consumer can read ``control_plane.queue_pauses``: when it connects, and at
        each reap while it could not (a healthy connection is never made again).

        New workers before their release's ``controlplane migrate`` (a deploy in the wrong order),
        or a worker role granted the tables one by one that misses the new one: they claim on as
        the old release did, pauses unread, and say so once per process, rather than fail every
        claim."""
        with self.conn.cursor() as cur:
            cur.execute(queries.PAUSES_READABLE)
            there, readable = cur.fetchone()
        was, self._pauses = self._pauses, bool(there and readable)
        if self._pauses and not was:
            logger.info("%s: control_plane.queue_pauses can be read now; reading queue pauses", self.queue_name)
        elif not self._pauses and not _pauses_missing.is_set():
            _pauses_missing.set()
            why = ("the database is at a revision before 0017 (no control_plane.queue_pauses): run `controlplane "
                   "migrate`" if not there else "this role may not read control_plane.queue_pauses: GRANT SELECT "
                   "ON control_plane.queue_pauses TO it")
            logger.warning("queue pauses are not read: %s", why)

    def _end_unstarted(self, refused: list[PgMessageProxy]) -> None:
        """End now the cancelled jobs of ``refused``, held here and refused by every thread from
        now on: not when a thread is free to refuse them, which behind a long job could take hours,
        their unique keys held and their callers waiting all along.

        A message a thread has begun is left to it: interrupted, or its outcome stands. The rest
        are given back (:meth:`_give_back`, which ends a cancelled one's job). A thread that
        comes to one later skips it unseen by the middleware (see ``PostgresBroker.emit_before``).
        """
        self._give_back(self._take_unstarted(refused))

    def _give_back(self, unstarted: Sequence[PgMessageProxy]) -> None:
        """Give back messages held here that no thread will start (a cancel, a paused queue, a
        shutdown): ``RELEASE`` puts them back in the queue, or ends the job of one whose cancel was
        asked meanwhile, whose failure hooks are sent in the same transaction, as the reaper sends
        a cancelled job's, from this process, which declares their actors; then its caller is told.
        """
        if not unstarted:
            return
        if not self._usable():
            # (forgotten here: their leases expire, and the reaper ends the cancelled ones, with their hooks)
            self._release(unstarted)
            return
        with db.transaction(lambda: contextlib.nullcontext(self.conn)) as conn:
            self._release(unstarted)  # in this transaction: RELEASE ends a cancelled message's job
            with conn.cursor() as cur:
                cur.execute(queries.CANCELLED_AMONG, {"ids": [p.message_id for p in unstarted]})
                ended = {row[0] for row in cur.fetchall()}
                # (this thread heartbeats: a hook's send must not wait long on a lock)
                cur.execute("SET LOCAL lock_timeout = '1s'; SET LOCAL statement_timeout = '5s'")
            deadline = time.monotonic() + REAPED_HOOKS_SECONDS
            with enqueue_in(conn):
                for p in unstarted:
                    if p.message_id in ended:
                        job = {"id": p.message_id, "fate": "cancel", "error": "cancelled by operator",
                               "attempts": 0, "max_attempts": 0}
                        self._send_hooks_of_lost(conn, job, encode_message(p._message), deadline)
            stopped = self._pipelines_stopped(
                [({"id": p.message_id, "fate": "cancel", "error": "cancelled by operator"}, p._message)
                 for p in unstarted if p.message_id in ended]
            )
            told = bool(ended) and self._store_ended_results(conn, sorted(ended), stopped)
        if ended:
            if not told:
                self._store_reaped_results(sorted(ended), stopped)
            logger.info("%s: ended %d cancelled job(s) no thread had started", self.queue_name, len(ended))

    def _take_unstarted(self, proxies: Iterable[PgMessageProxy]) -> list[PgMessageProxy]:
        """Those of ``proxies`` no thread has started, which no thread will start now: marked
        ``ended_unstarted`` under the lock under which a thread marks one started
        (``PostgresBroker._started``), and out of the buffer."""
        with self.state.lock:
            taken = [p for p in proxies if not p.started and not p.settled]
            for p in taken:
                p.settled = p.ended_unstarted = True
            if taken:
                kept = [p for p in self.state.buffer if not p.ended_unstarted]
                self.state.buffer.clear()
                self.state.buffer.extend(kept)
        return taken

    def _give_back_paused(self) -> None:
        """This queue is paused (``control_plane.pause_queue``): give back what we hold that no
        thread has started, for the workers to take once it is resumed. Running jobs go on."""
        with self.state.lock:
            held = list(self.state.inflight.values())
        unstarted = self._take_unstarted(held)
        if unstarted:
            self._give_back(unstarted)
            logger.info("%s is paused: gave back %d message(s) no thread had started", self.queue_name,
                        len(unstarted))

    def _reap(self) -> bool:
        """Put back what lost workers held; end the jobs among them that must not run again,
        sending their failure hooks in the same transaction (the reaper's, once, or none).
        True when it took as many expired claims as one reap takes (``REAP_BATCH``): there may be more."""
        with db.transaction(lambda: contextlib.nullcontext(self.conn)) as conn:
            with conn.cursor() as cur:
                cur.execute(queries.REAP, {"forget_after": self.settings.lease_seconds * 4})
                (reaped, _, ended, bodies, taken) = cur.fetchone()
            if ended:
                # This thread heartbeats: a hook's send must not wait long on a lock (a unique
                # key an open transaction holds), or the leases of the jobs it runs would expire.
                with conn.cursor() as cur:
                    cur.execute("SET LOCAL lock_timeout = '1s'; SET LOCAL statement_timeout = '5s'")
                deadline = time.monotonic() + REAPED_HOOKS_SECONDS
                with enqueue_in(conn):
                    for job, body in zip(ended, bodies, strict=True):
                        self._send_hooks_of_lost(conn, job, bytes(body), deadline)
                ids = [job["id"] for job in ended]
                stopped = self._pipelines_stopped(
                    [(job, _decoded_or_none(bytes(body))) for job, body in zip(ended, bodies, strict=True)]
                )
                told = self._store_ended_results(conn, ids, stopped)
        if reaped:
            logger.warning("re-queued %d message(s) whose worker's lease expired", reaped)
        if ended:
            logger.warning("ended %d job(s) whose worker's lease expired on their last attempt (or "
                           "after a cancel): %s", len(ids), ", ".join(ids))
            if not told:
                self._store_reaped_results(ids, stopped)
        return int(taken) >= queries.REAP_BATCH

    def _send_hooks_of_lost(self, conn: Any, job: dict[str, Any], body: bytes, deadline: float) -> None:
        """The ``on_failure``, ``on_final_failure`` and ``on_retry_exhausted`` messages of a job
        the reaper ended, as its worker would have sent them had it lived (each middleware's
        ``worker_lost_hooks``), each under a savepoint: one that cannot be sent (its actor is not
        declared in this process, a lock held too long, the reap's time for hooks spent by
        ``deadline``) is logged, and the others go."""
        try:
            message = Message.decode(body)
            hooks = self._hooks_of_lost(message, job)
        except Exception as exc:  # a body written by hand: the reap itself must go on
            logger.warning("job %s ended by the reaper: no failure hooks sent (%s)", job["id"], db.loggable_error(exc))
            return
        for target, args in hooks:
            if time.monotonic() > deadline:
                logger.warning("job %s ended by the reaper: its hook %s was not sent (this reap spent its %.0f s "
                               "for hooks waiting on locks)", job["id"], target, REAPED_HOOKS_SECONDS)
                continue
            with conn.cursor() as cur:
                cur.execute("SAVEPOINT control_plane_reaped_hook")
            try:
                self.broker.get_actor(target).send(*args)
            except Exception as exc:
                with conn.cursor() as cur:
                    cur.execute("ROLLBACK TO SAVEPOINT control_plane_reaped_hook")
                logger.warning("job %s ended by the reaper: its hook %s was not sent (%s)",
                               job["id"], target, db.loggable_error(exc))
            with conn.cursor() as cur:
                cur.execute("RELEASE SAVEPOINT control_plane_reaped_hook")

    def _hooks_of_lost(self, message: Message[Any], job: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
        """What each middleware's ``worker_lost_hooks`` says the worker of ``message`` would have sent."""
        if message.actor_name not in self.broker.actors:
            logger.warning("job %s ended by the reaper: its actor %s is not declared in this process, so the "
                           "hooks set on the actor (not on the message) are not known here and not sent",
                           job["id"], message.actor_name)
        from tasks.middleware.retries import hooks_of_lost

        failure = {"type": "WorkerLost" if job["fate"] == "fail" else "Cancelled", "message": job["error"]}
        return hooks_of_lost(self.broker, message, failure, attempts=job["attempts"], max_attempts=job["max_attempts"])

    def _pipelines_stopped(self, ended: Sequence[tuple[dict[str, Any], Message[Any] | None]]) -> list[StoredResult]:
        """For each job the reaper ended that is a pipeline's step, the failure that tells the
        caller of the pipeline's last message that it stopped (``tasks.middleware.canvas``)."""
        from tasks.middleware.canvas import pipeline_end, pipeline_failure, stopped_at

        results = results_middleware(self.broker)
        stopped: list[StoredResult] = []
        for job, message in ended:
            try:
                last = pipeline_end(message) if message is not None and results is not None else None
            except Exception:  # a next step written by hand that is no message: nobody waits on it
                continue
            if last is None or message is None or results is None:
                continue
            kind = "WorkerLost" if job["fate"] == "fail" else "Cancelled"
            why = stopped_at(message.actor_name, job["id"], job["error"])
            key, failure, ttl = pipeline_failure(results, last, kind, why, self.broker)
            stopped.append((key, results.backend.encoder.encode(failure), ttl))
        return stopped

    def _store_ended_results(self, conn: Any, job_ids: list[str], pipelines_stopped: Sequence[StoredResult]) -> bool:
        """Tell the callers of the jobs this transaction ends, and of the pipelines they were steps
        of, in it (under a savepoint, within the transaction's lock timeout): an operator's retry
        of such a job, which forgets those results, then always comes after them. False when the
        results table stayed locked or refused them: ``_store_reaped_results`` then tries after
        the commit."""
        with conn.cursor() as cur:
            cur.execute("SAVEPOINT control_plane_ended_results")
            try:
                _store_ended(cur, job_ids, pipelines_stopped, self.broker.default_result_ttl())
            except psycopg2.Error as exc:
                if db.is_connection_error(exc):
                    raise
                cur.execute("ROLLBACK TO SAVEPOINT control_plane_ended_results")
                return False
            cur.execute("RELEASE SAVEPOINT control_plane_ended_results")
        return True

    def _store_reaped_results(self, job_ids: list[str], pipelines_stopped: Sequence[StoredResult] = ()) -> None:
        """Tell the callers of jobs the reaper ended, and of the pipelines they were steps of,
        after the transaction that ended them could not (``_store_ended_results``), waiting a
        second at most for the results table (this thread heartbeats: a lock an operator holds
        there must not stall it)."""
        try:  # on this thread's own connection: waiting for a pooled one could take any time
            with db.transaction(lambda: contextlib.nullcontext(self.conn)) as conn, conn.cursor() as cur:
                cur.execute("SET LOCAL lock_timeout = '1s'; SET LOCAL statement_timeout = '5s'")
                _store_ended(cur, job_ids, pipelines_stopped, self.broker.default_result_ttl())
        except psycopg2.Error as exc:
            logger.warning("could not store the results of the jobs the reaper ended (%s); their callers "
                           "wait out their timeouts", db.loggable_error(exc))

    def _release(self, proxies: Sequence[PgMessageProxy]) -> None:
        if not proxies:
            return
        with self.state.lock:
            for p in proxies:
                if self.state.inflight.get(p.message_id) is p:
                    del self.state.inflight[p.message_id]
                if self.state.starts.get(p.message_id) is p:
                    del self.state.starts[p.message_id]
        if not self._usable():
            return  # their leases will expire and the reaper will put them back
        with self.conn.cursor() as cur:
            cur.execute(
                queries.RELEASE,
                {
                    "ids": [p.message_id for p in proxies],
                    "tokens": [p.claim_token for p in proxies],
                    "started": [p.started for p in proxies],
                    "worker": self.broker.worker_id,
                },
            )
        interrupted = [p.message_id for p in proxies if p.started]
        if interrupted:
            # (the jobs a worker stopping past --worker-shutdown-timeout cut off: named here, or
            # its log said only "Worker has been shut down")
            logger.warning("%s: %d job(s) still running as this worker stopped were interrupted (%s%s): each runs "
                           "again, or ends failed if that was its last attempt", self.queue_name, len(interrupted),
                           ", ".join(interrupted[:10]), ", ..." if len(interrupted) > 10 else "")  # fmt: skip


# -- array parameters --------------------------------------------------------------
#
# psycopg2 sends a list as ARRAY[...], quoting each element with an adapter
# object and a libpq call, and the server parses and evaluates every element as
# an expression: for SETTLE's arrays that cost about 8 µs per message in the
# worker alone. The hot statements get one array literal per array instead
# (one string to quote, parsed by the array type's input function), and an
# array of nothing but NULLs as NULL, which unnest() pads like one.


def _take_our_items(work_queue: Any) -> list[PgMessageProxy]:
    """Take this broker's messages out of a stopping Dramatiq worker's work queue (others go back)."""
    if work_queue is None:
        return []
    ours: list[PgMessageProxy] = []
    others = []
    while True:
        try:
            item = work_queue.get_nowait()
        except queue_module.Empty:
            break
        work_queue.task_done()  # Dramatiq's join() counts what is still to do
        message = getattr(item, "message", None)
        if isinstance(message, PgMessageProxy):
            ours.append(message)
        else:
            others.append(item)
    for item in others:
        work_queue.put(item)
    return ours


def _text_array(values: Sequence[str | None]) -> str | None:
    """Strings (or None) as one text array literal; None when every value is None.

    Each element is double-quoted with its backslashes and double quotes
    escaped, so any text (commas, braces, the word NULL) stays one element.
    """
    if not any(v is not None for v in values):
        return None
    return (
        "{"
        + ",".join("NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
        + "}"
    )


def _int_array(values: Sequence[int | None]) -> str | None:
    """Integers (or None) as one array literal; None when every value is None."""
    if not any(v is not None for v in values):
        return None
    return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"


def _sparse(values: list[Any]) -> list[Any] | None:
    """A list psycopg2 adapts itself (bytea, timestamps), or None when every value is None."""
    return values if any(v is not None for v in values) else None


def _claims_connection(broker: PostgresBroker, application_name: str) -> Any:
    """An autocommit connection for claims or settles, whose commits do not wait for the WAL flush.

    A server crash can only undo the last moments of claims and settles; then
    the job runs again (at-least-once, as after any crash) and the mirror,
    written in the same transactions, is undone with them. Sends stay synchronous.
    """
    try:
        conn = db.connect(broker.url(), autocommit=True, application_name=application_name)
    except psycopg2.Error as exc:
        _say_why_no_slot(broker, exc)
        raise
    try:
        with conn.cursor() as cur:
            cur.execute("SET synchronous_commit = off")
    except BaseException:
        conn.close()
        raise
    return conn


#: The longest wait between two tries of the notifier to listen again (it starts at 0.1 s, doubling).
_NOTIFIER_MAX_BACKOFF = 6.4


class _Notifier(threading.Thread):
    """The process's one ``LISTEN`` connection, waking its consumers by the NOTIFY's payload.

    PostgreSQL signals every connection listening in the database at each notifying
    commit, whatever the channel, and each reads the notification queue: about 12 µs
    of the server's CPU per listener per send here (``python -m bench.listeners_cost``).
    A consumer per queue listening on its own connection made that queues times processes
    listeners; this makes it one per process, as Oban and River listen once per node.
    A lost connection is retried with a backoff (0.1 s doubling to 6.4 s); while it is down the consumers poll
    (``CONTROLPLANE_POLL_INTERVAL``), and once it listens again every consumer looks
    at its queue, so nothing sent meanwhile waits for a poll.
    """

    def __init__(self, broker: PostgresBroker) -> None:
        super().__init__(name="controlplane-notifier", daemon=True)
        self.broker = broker
        self._stop_r, self._stop_w = os.pipe()
        #: Guards the pipe: closed by the thread as it ends, never written after (its numbers
        #: may belong to another file by then).
        self._pipe_lock = threading.Lock()
        self._pipe_closed = False
        #: Set while the connection listens (tests wait on it).
        self.listening = threading.Event()

    def stop(self) -> None:
        with self._pipe_lock:
            if not self._pipe_closed:
                with contextlib.suppress(OSError):
                    os.write(self._stop_w, b"x")
        if self.is_alive():
            self.join(timeout=5)

    def _stopped(self, seconds: float = 0.0) -> bool:
        readable, _, _ = select.select([self._stop_r], [], [], seconds)
        return bool(readable)

    def run(self) -> None:
        try:
            self._run()
        finally:
            with self._pipe_lock:
                self._pipe_closed = True
                for fd in (self._stop_r, self._stop_w):
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def _run(self) -> None:
        delay = 0.0
        while not self._stopped(delay):
            conn = None
            try:
                conn = db.connect(self.broker.url(), autocommit=True, application_name="controlplane-worker:listen")
                with conn.cursor() as cur:
                    # It never runs a statement once listening: a DBA's idle_session_timeout (for the
                    # apps' idle sessions) would end it again and again.
                    with contextlib.suppress(psycopg2.errors.UndefinedObject):  # (before PostgreSQL 14)
                        cur.execute("SET idle_session_timeout = 0")
                    cur.execute(f"LISTEN {queries.NOTIFY_CHANNEL}")
                self.listening.set()
                if delay:
                    logger.info("listening for wake-ups again")
                delay = 0.0
                self.broker._hear_everything()
                self._listen(conn)
                return
            except (psycopg2.Error, OSError, ValueError) as exc:  # (ValueError: select on a closed one)
                self.listening.clear()
                if isinstance(exc, psycopg2.Error):
                    _say_why_no_slot(self.broker, exc)
                longer = min(max(delay * 2, 0.1), _NOTIFIER_MAX_BACKOFF)
                if not delay or (longer == _NOTIFIER_MAX_BACKOFF > delay):  # as it goes, and once if it stays away
                    logger.warning("%s the connection that listens for wake-ups (%s); consumers poll every %ss "
                                   "until it is back", "lost" if not delay else "still cannot open",
                                   db.loggable_error(exc) if isinstance(exc, psycopg2.Error) else exc,
                                   self.broker.settings.poll_interval)
                delay = longer
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()

    def _listen(self, conn: Any) -> None:
        """Hand each NOTIFY to the broker until stopped; raise when the connection ends."""
        while True:
            readable, _, _ = select.select([conn, self._stop_r], [], [])
            if self._stop_r in readable:
                return
            conn.poll()
            last_words = db.ended_by_server(conn)  # (terminated by an administrator, a timeout, a shutdown)
            if conn.closed or last_words:
                raise psycopg2.OperationalError(last_words or "the server ended the session")
            if conn.notifies:
                payloads = [n.payload for n in conn.notifies]
                conn.notifies.clear()
                self.broker._hear(payloads)


class _Settler(threading.Thread):
    """Writes a consumer's outcomes (acks, failures, retries) on its own connection.

    It waits for outcomes, gathers them for the settle window under a backlog
    (at once when the queue is idle), writes them in one SETTLE and wakes the
    consumer, whose freed slots it can claim again. A lost connection keeps
    the outcomes for the next try, reconnects with a backoff, and meanwhile
    the claims' leases are still extended by the consumer's heartbeats.
    """

    def __init__(self, consumer: _PostgresConsumer) -> None:
        super().__init__(name=f"controlplane-settler:{consumer.queue_name}", daemon=True)
        self.consumer = consumer
        self.state = consumer.state
        self.conn: Any = None
        self._stopping = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Stop after the write in progress, if any; the consumer writes what is left."""
        with self.state.settle_cond:
            self._stopping = True
            self.state.settle_cond.notify_all()
        if self.is_alive() and self is not threading.current_thread():
            self.join(timeout=60)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()

    def _connection(self) -> Any:
        # Idle between flushes: the server may have closed it meanwhile (idle_session_timeout,
        # a restart, pg_terminate_backend), which only a look at the socket tells.
        if not db.idle_connection_is_alive(self.conn):
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    self.conn.close()
            self.conn = _claims_connection(self.consumer.broker, f"controlplane-settle:{self.consumer.queue_name}")
        return self.conn

    def run(self) -> None:
        failures = 0
        while True:
            with self.state.settle_cond:
                while not self.state.outcomes and not self.state.starts and not self._stopping:
                    self.state.settle_cond.wait()
                if self._stopping:
                    return
            due = self.consumer._settle_due()
            if due > 0:
                with self.state.settle_cond:
                    if not self._stopping:
                        self.state.settle_cond.wait(due)
                continue
            try:
                conn = self._connection()
            except psycopg2.Error as exc:
                # No connection to be had (no slot left: the consumers of a process reading many
                # queues took them first): the consumer writes the outcomes on its own meanwhile.
                if not self.state.settler_unconnected:
                    logger.warning("%s: cannot open the connection that writes outcomes (%s); the queue's "
                                   "consumer writes them on its own until it can", self.consumer.queue_name,
                                   db.loggable_error(exc))  # fmt: skip
                    self.state.settler_unconnected = True
                self.state.wake()
                failures = min(failures + 1, 7)
                deadline = time.monotonic() + min(0.05 * 2**failures, 5.0)
                with self.state.settle_cond:  # (not cut short by every outcome handed over)
                    while not self._stopping and (left := deadline - time.monotonic()) > 0:
                        self.state.settle_cond.wait(left)
                continue
            if self.state.settler_unconnected:
                self.state.settler_unconnected = False
                logger.info("%s: the connection that writes outcomes is open again", self.consumer.queue_name)
            try:
                self.consumer._flush(conn)
                failures = 0
            except Exception as exc:  # keep settling whatever happened to this batch
                failures += 1
                if isinstance(exc, psycopg2.Error) and db.is_connection_error(exc):
                    logger.warning("settling outcomes: lost the connection (%s); retrying", db.loggable_error(exc))
                    with contextlib.suppress(Exception):
                        self.conn.close()
                elif isinstance(exc, psycopg2.Error) and db.is_transient(exc):
                    logger.warning("settling outcomes: rolled back by the server (%s); retrying",
                                   db.loggable_error(exc))
                else:
                    _settle_failed(self.consumer, exc)
                with self.state.settle_cond:
                    if not self._stopping:
                        self.state.settle_cond.wait(min(0.05 * 2**failures, 5.0))
                continue
            self.state.wake()


def _settle_failed(consumer: _PostgresConsumer, exc: Exception) -> None:
    """After a SETTLE failed for another reason than a lost connection or a rollback: what is
    refused is taken out of the outcomes, which are written again without it."""
    if isinstance(exc, (psycopg2.DataError, UnicodeError)):
        # A value of the batch was refused (by the server, or by the driver encoding it):
        # the same batch would fail every time, and hold up every outcome of the queue.
        logger.error("settling outcomes: a value was refused (%s); retrying without their results",
                     db.loggable_error(exc) if isinstance(exc, psycopg2.Error) else type(exc).__name__)
        consumer._plain_outcomes()
        consumer._results_apart()
    elif isinstance(exc, psycopg2.Error):  # its text would quote the statement's values
        logger.error("settling outcomes failed (%s); retrying", db.loggable_error(exc))
        consumer._results_apart()
    else:
        logger.error("settling outcomes failed; retrying", exc_info=exc)


def _settle(broker: PostgresBroker, state: _QueueState, conn: Any) -> None:
    """Write a queue's gathered outcomes and its due start marks, on ``conn``: in one SETTLE,
    or one per ``SETTLE_BYTES`` of results and bodies they carry (the consumer woken after each)."""
    while _settle_batch(broker, state, conn):
        state.wake()


def _settle_batch(broker: PostgresBroker, state: _QueueState, conn: Any) -> bool:
    """Write one SETTLE of the gathered outcomes and the due start marks; True if some were left
    for another (their results and bodies past ``SETTLE_BYTES``).

    A start whose outcome is in the same batch is dropped: the outcome row
    marks the attempt itself. Younger starts wait for a later flush.
    """
    now = time.monotonic()
    with state.lock:
        batch, state.outcomes = _within_settle_bytes(state.outcomes)
        deferred = bool(state.outcomes)
        # One row per message: a message cannot be settled twice in one statement.
        latest: dict[str, _Outcome] = {o.message_id: o for o in batch}
        starts: list[PgMessageProxy] = []
        for message_id, proxy in list(state.starts.items()):
            if message_id in latest:
                del state.starts[message_id]
            elif proxy.started_mono + RUNNING_MARK_DELAY_SECONDS <= now:  # as _settle_due reckons
                del state.starts[message_id]
                starts.append(proxy)
    if not latest and not starts:
        return False
    outcomes = list(latest.values())
    apart: list[tuple[str, StoredResult]] = []
    try:
        in_transaction = False
        if any(o.stored_result is not None for o in outcomes):
            # (past the writer's bound the settle waits for the table, a while: not when stopping)
            in_transaction = _lock_results(broker, conn, wait=broker.results_writer.full() and not broker.stopping)
            if not in_transaction:  # the outcomes now, their results apart
                apart = [(o.message_id, o.stored_result) for o in outcomes if o.stored_result is not None]
                outcomes = [dataclasses.replace(o, stored_result=None) for o in outcomes]
        # (not prepared in the transaction: a prepared statement the session lost would abort it)
        applied = _settle_rows(broker, conn, outcomes, starts, now, prepare=not in_transaction)
        if in_transaction:
            with conn.cursor() as cur:
                cur.execute("COMMIT")
    except Exception as exc:
        # Keep the outcomes (with their results) and the start marks for the next try (or the
        # next consumer), whatever failed: an error raised before the statement reached the server too.
        if conn.get_transaction_status() != psycopg2.extensions.TRANSACTION_STATUS_IDLE:
            with contextlib.suppress(Exception), conn.cursor() as cur:
                cur.execute("ROLLBACK")
        kept = list(latest.values())
        if isinstance(exc, psycopg2.Error) and db.is_connection_error(exc):  # (committed, its reply lost?)
            kept = [dataclasses.replace(o, maybe_written=True) for o in kept]
        with state.lock:
            state.outcomes[:0] = kept
            state.starts = {p.message_id: p for p in starts} | state.starts
        raise
    # Stored only while the job's row still shows this outcome: an operator's retry_job, free to
    # run once the outcome is written, forgets the failure stored for it, and the writer, which
    # may write it later (the table locked), must not bring it back for the caller of the new run.
    broker.results_writer.put_if_ended(
        (result, (message_id, latest[message_id].kind, broker.worker_id)) for message_id, result in apart
        if message_id in applied and latest[message_id].kind in _ENDING_KINDS
    )
    broker.results_writer.put(
        result for message_id, result in apart if message_id in applied and latest[message_id].kind not in _ENDING_KINDS
    )
    # Not reported written after an earlier try lost its connection: that try may have been
    # committed with only its reply lost (this one found the claim gone), or the lease was lost.
    broker.results_writer.put_if_ended(
        (o.stored_result, (o.message_id, o.kind, broker.worker_id)) for o in latest.values()
        if o.stored_result is not None and o.maybe_written and o.message_id not in applied and o.kind in _ENDING_KINDS
    )
    _after_settle(broker, state, conn, latest, applied)
    return deferred


def _within_settle_bytes(outcomes: list[_Outcome]) -> tuple[list[_Outcome], list[_Outcome]]:
    """The outcomes one SETTLE takes, and the ones left for the next: those whose results or
    bodies (a retry's) come past ``SETTLE_BYTES`` (the first always goes: a body PostgreSQL took
    at the send fits in a statement)."""
    taken: list[_Outcome] = []
    left: list[_Outcome] = []
    size = 0
    for o in outcomes:
        carried = (len(o.stored_result[1]) if o.stored_result is not None else 0) + len(o.body or b"")
        if carried:
            if size and size + carried > SETTLE_BYTES:
                left.append(o)
                continue
            size += carried
        taken.append(o)
    return taken, left


def _lock_results(broker: PostgresBroker, conn: Any, *, wait: bool = False) -> bool:
    """Begin a transaction holding ``control_plane.results`` for a SETTLE that stores results,
    waiting ``RESULTS_LOCK_TIMEOUT`` at most (with ``wait``, ``RESULTS_FULL_LOCK_TIMEOUT``: the
    results waiting to be written apart are many); False when another session holds it.

    The lock taken is the one the statement's insert takes anyway; only its wait is bounded.
    After a refusal ``broker``'s table is taken to be busy for a second without a look.
    """
    writer = broker.results_writer
    if not wait and time.monotonic() < writer.busy_until:
        return False
    lock = "LOCK TABLE control_plane.results IN ROW EXCLUSIVE MODE"
    timeout = RESULTS_FULL_LOCK_TIMEOUT if wait else RESULTS_LOCK_TIMEOUT
    try:
        with conn.cursor() as cur:
            cur.execute(f"BEGIN; SET LOCAL lock_timeout = '{timeout}'; {lock}; SET LOCAL lock_timeout TO DEFAULT")
    except psycopg2.errors.LockNotAvailable:
        with conn.cursor() as cur:
            cur.execute("ROLLBACK")
        writer.busy_until = time.monotonic() + 1.0
        if time.monotonic() - writer.busy_said > 60:
            writer.busy_said = time.monotonic()
            logger.warning("control_plane.results is locked by another session: jobs' outcomes are written "
                           "without their results, which are written apart once it is free (said once a minute)")
        return False
    return True


def _settle_rows(
    broker: PostgresBroker, conn: Any, outcomes: list[_Outcome], starts: list[PgMessageProxy], now: float,
    *, prepare: bool = True,
) -> set[str]:
    """Run SETTLE (or ``SETTLE_STORING_RESULTS``) for ``outcomes`` and the start marks; the ids applied."""
    marks = (_Outcome("start", p.message_id, p.claim_token, started_mono=p.started_mono) for p in starts)
    rows = [*outcomes, *marks]
    params: dict[str, Any] = {
        "ids": _text_array([o.message_id for o in rows]),
        "tokens": _text_array([o.token for o in rows]),
        "kinds": _text_array([o.kind for o in rows]),
        "delays": _int_array([o.delay_ms for o in rows]),
        "bodies": _sparse([psycopg2.Binary(o.body) if o.body is not None else None for o in rows]),
        "errors": _text_array([o.error for o in rows]),
        "results": _text_array([o.result_json for o in rows]),
        "started_ms": _int_array([int((now - o.started_mono) * 1000) if o.started_mono else None for o in rows]),
        "markers": _text_array([o.group_marker for o in rows]),
        "worker": broker.worker_id,
    }
    stored = [(o.message_id, o.stored_result) for o in rows if o.stored_result is not None]
    statement = _SETTLE
    if stored:
        statement = _SETTLE_STORING_RESULTS
        params["result_ids"] = _text_array([message_id for message_id, _ in stored])
        params["result_keys"] = _text_array([key for _, (key, _, _) in stored])
        params["result_values"] = [psycopg2.Binary(value) for _, (_, value, _) in stored]
        params["result_ttls"] = _int_array([ttl for _, (_, _, ttl) in stored])
    with conn.cursor() as cur:
        statement.execute(cur, params, prepare=prepare and broker.settings.prepared_statements)
        return {row[0] for row in cur.fetchall()}


def _after_settle(
    broker: PostgresBroker, state: _QueueState, conn: Any, latest: dict[str, _Outcome], applied: set[str]
) -> None:
    """Forget the claims settled; write again as cancels the retries a cancellation beat; warn of lost leases."""
    with state.lock:
        for o in latest.values():
            held = state.inflight.get(o.message_id)
            if held is not None and held.claim_token == o.token:
                del state.inflight[o.message_id]
    # A retry not written because a cancel reached the message first (SETTLE leaves such a
    # message claimed): written again as the cancel, which ends the job now. Were the claim
    # another worker's, the cancel would not be written either.
    cancels = [dataclasses.replace(o, kind="cancel") for o in latest.values()
               if o.kind == "retry" and o.message_id not in applied]
    for o in latest.values():
        if o.message_id not in applied and o.group_marker is not None and o.kind == "ack":
            logger.warning("message %s: its ack was not written: its group's pass is not there (a database crash "
                           "undid it, or its claim was lost); it runs and is counted again once its lease ends",
                           o.message_id)  # fmt: skip
        elif o.message_id not in applied and o.kind != "retry":
            logger.warning(
                "message %s: its %s was not written: %s",
                o.message_id,
                o.kind,
                "an earlier try whose connection was lost may have written it, or its lease was lost"
                if o.maybe_written else "its claim was lost before it was written (its lease expired, or a database "
                "crash undid it): another worker may run it again",
            )
    if cancels:
        with state.lock:
            state.outcomes.extend(cancels)
        _settle(broker, state, conn)  # at once (a cancel is never turned into anything else)


def _enqueue_statement(
    rows: dict[str, list[Any]], *, always_wake: bool, default_attempts: int
) -> tuple[Statement, dict[str, Any], bool]:
    """The ENQUEUE variant for ``rows``, its parameters, and whether it reports duplicates (keyed)."""
    keyed = any(key is not None for key in rows["unique_keys"])
    params: dict[str, Any]
    if not keyed and len(rows["ids"]) == 1:  # actor.send(): each value as a scalar, no arrays
        statement = _ENQUEUE_ONE
        params = {name: values[0] for name, values in rows.items()}
    else:
        statement = _ENQUEUE if keyed else _ENQUEUE_PLAIN
        params = {
            "ids": _text_array(rows["ids"]),
            "queues": _text_array(rows["queues"]),
            "actors": _text_array(rows["actors"]),
            "priorities": _int_array(rows["priorities"]),
            "etas": _sparse(rows["etas"]),
            "delays": _int_array(rows["delays"]),
            "bodies": _text_array(rows["bodies"]),
            "max_attempts": _int_array(rows["max_attempts"]),
            "unique_keys": _text_array(rows["unique_keys"]),
        }
    params["always_wake"] = always_wake
    params["default_attempts"] = default_attempts
    return statement, params, keyed


def _not_stored(cur: Any, rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """``rows`` without the messages whose jobs rows are stored as these messages would write them.

    A send whose connection was lost may have committed with only its reply lost. Sent
    again as it was, its upsert would put back in the queue a job a worker had already
    claimed (two would run it at once) or finished (it would run again). A jobs row with
    this id, payload and options is taken for the lost send's: that message is left out.
    (An identical re-send of a job that already existed, whose first try was lost with
    the connection, is left out too: the rows cannot tell the two apart.)
    """
    cur.execute(queries.STORED_JOBS, {"ids": rows["ids"]})
    stored = {job_id: (payload, options) for job_id, payload, options in cur.fetchall()}
    keep = []
    for i, (message_id, body) in enumerate(zip(rows["ids"], rows["bodies"], strict=True)):
        found = stored.get(message_id)
        if found is not None:
            doc = json.loads(body)
            if found == ({"args": doc.get("args"), "kwargs": doc.get("kwargs")}, doc.get("options") or {}):
                continue
        keep.append(i)
    return {name: [values[i] for i in keep] for name, values in rows.items()}


def _store_ended(cur: Any, job_ids: list[str], pipelines_stopped: Sequence[StoredResult], default_ttl: int) -> None:
    """What the callers of the jobs ``job_ids`` (failed or cancelled) and of the pipelines they
    were steps of hear: ``STORE_REAPED_RESULTS`` (for ``default_ttl`` ms where neither the message
    nor its actor's declaration says), and ``pipelines_stopped``."""
    cur.execute(queries.STORE_REAPED_RESULTS, {"ids": job_ids, "default_ttl_ms": default_ttl})
    if pipelines_stopped:
        store_results(cur, pipelines_stopped)


def _decoded_or_none(body: bytes) -> Message[Any] | None:
    """The message ``body`` encodes, or None for one written by hand that does not decode."""
    try:
        return Message.decode(body)
    except Exception:
        return None


def _describe(message: PgMessageProxy) -> str | None:
    """The error of the last attempt, in one safe line (see tasks.middleware.jobs_mirror)."""
    from tasks.middleware.jobs_mirror import describe_error

    exc = message._exception
    return describe_error(exc, message) if exc is not None else None


def to_json(value: Any) -> str | None:
    """The JSON text of an actor's return value, or None when it has no JSON form."""
    if value is None:
        return None
    try:
        text = json.dumps(value, default=str, allow_nan=False)  # jsonb holds no NaN or infinity
    except (TypeError, ValueError):
        return None
    # jsonb refuses both: a result it cannot hold is not stored (the job still completes).
    return None if jsonb_refuses(text) else text


__all__ = ["PgMessageProxy", "PostgresBroker", "encode_message", "enqueue_in", "get_encoder", "to_json"]
