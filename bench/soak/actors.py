"""The soak's actors: ``dramatiq tasks bench.soak.actors tasks.provision``.

Each execution writes one row to ``soak.runs`` (message id, kind, ok/fail, Dramatiq's retry
count, pid) in the soak database, through the worker's pooled connection, before the actor
returns or raises. The checks count completions (``ok`` rows) and duplicates from it.

Kinds:

* ``noop``: completes at once;
* ``transient``: fails ``fail_times`` times with ``ConnectionError``, then succeeds on a retry;
* ``permanent``: raises :class:`tasks.errors.PermanentError`: fails at once, by design;
* ``delayed``: sent with a delay; completes (the checks compare its first run with its eta);
* ``unique``: sent with a ``unique_key`` option shared by a few jobs; completes after 20 ms,
  so that a later send of the key often finds it live and is deduplicated.
"""

from __future__ import annotations

import os
import time
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage

import tasks
from tasks.broker import PostgresBroker
from tasks.errors import PermanentError

QUEUE = "soak"

#: Retry policy of the kinds that must complete: chaos makes attempts fail (a cut connection
#: while recording), so they get plenty; the backoff is short so the soak drains quickly.
RETRY: dict[str, Any] = {"max_attempts": 20, "min_backoff": 100, "max_backoff": 2000}

KINDS = ("noop", "transient", "permanent", "delayed", "unique")


def _retries() -> int:
    message = CurrentMessage.get_current_message()
    return int(message.options.get("retries", 0)) if message is not None else 0


def record(kind: str, outcome: str) -> int:
    """Write this execution to ``soak.runs``; returns the message's retry count."""
    message = CurrentMessage.get_current_message()
    retries = _retries()
    broker = tasks.broker
    assert isinstance(broker, PostgresBroker), "the soak runs on the Postgres broker"
    with broker.connection() as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO soak.runs (message_id, kind, outcome, retries, pid) VALUES (%s, %s, %s, %s, %s)",
            (message.message_id if message else None, kind, outcome, retries, os.getpid()),
        )
    return retries


@dramatiq.actor(actor_name="soak.noop", queue_name=QUEUE, **RETRY)
def noop(seq: int) -> int:
    """A job that only records that it ran."""
    record("noop", "ok")
    return seq


@dramatiq.actor(actor_name="soak.transient", queue_name=QUEUE, **RETRY)
def transient(seq: int, fail_times: int) -> int:
    """Fails ``fail_times`` times (a transient error, retried with backoff), then succeeds."""
    if _retries() < fail_times:
        retries = record("transient", "fail")
        raise ConnectionError(f"soak: transient failure {retries + 1} of {fail_times}")
    record("transient", "ok")
    return seq


@dramatiq.actor(actor_name="soak.permanent", queue_name=QUEUE, **RETRY)
def permanent(seq: int) -> None:
    """Fails for good on its first attempt: a job that fails as designed."""
    record("permanent", "fail")
    raise PermanentError(f"soak: job {seq} can never work")


@dramatiq.actor(actor_name="soak.delayed", queue_name=QUEUE, **RETRY)
def delayed(seq: int, delay_ms: int) -> int:
    """Sent with ``delay=delay_ms``; completes."""
    record("delayed", "ok")
    return seq


@dramatiq.actor(actor_name="soak.unique", queue_name=QUEUE, **RETRY)
def unique(seq: int, key: str) -> int:
    """Sent with ``unique_key=key``; takes 20 ms, so that other sends of its key meet it live."""
    time.sleep(0.02)
    record("unique", "ok")
    return seq


ACTORS = {"noop": noop, "transient": transient, "permanent": permanent, "delayed": delayed, "unique": unique}
