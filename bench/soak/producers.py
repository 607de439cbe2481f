"""The soak's producers: threads that send the job mix, half of it inside transactions.

Each producer owns a plan (kinds in a seeded random order, its share of the
``provision_project`` jobs spread evenly through it) and sends it in chunks of 1 to 10
messages. A chunk is sent either one message at a time in autocommit (``broker.enqueue``,
retried with the same message id after a lost connection: the enqueue is an upsert by id),
or inside a transaction on the producer's own psycopg2 connection
(``with tasks.enqueue_in(conn):``) that then commits, or rolls back at random. Every message
id is recorded with its fate: ``committed``, ``rolled_back`` (must never run),
``deduplicated`` (a unique send that returned the live holder's id; no job of its own) or
``in_doubt`` (the connection died during COMMIT, or every retry of an autocommit send
failed: resolved at the end by looking for the job). A rolled-back ``provision_project`` is
sent again under a new project id, so that exactly ``provisions`` of them commit.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import psycopg2
from dramatiq.errors import ConnectionClosed

import tasks
from bench.soak import actors
from tasks import db

#: Shares of the soak kinds in the mix (provision_project jobs come on top, by count).
MIX = {"noop": 0.45, "transient": 0.15, "permanent": 0.05, "delayed": 0.15, "unique": 0.20}

#: How often a transaction chunk rolls back instead of committing.
ROLLBACK_RATE = 0.3


@dataclass
class Sent:
    """One message a producer sent, and what became of its transaction."""

    id: str
    kind: str
    fate: str
    producer: int
    delay_ms: int | None = None
    resent: int = 0
    holder: str | None = None
    project_id: str | None = None


@dataclass
class ProducerStats:
    """Counters of one producer."""

    autocommit_sends: int = 0
    transaction_sends: int = 0
    transactions_committed: int = 0
    transactions_rolled_back: int = 0
    transactions_aborted: int = 0
    commits_in_doubt: int = 0
    send_retries: int = 0
    reconnects: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


@dataclass
class Item:
    """One planned send."""

    kind: str
    seq: int
    project_id: str | None = None


def plan(total: int, provisions: int, producers: int, seed: int) -> list[list[Item]]:
    """Split ``total`` sends (``provisions`` of them provision_project) into per-producer plans."""
    rng = random.Random(seed)
    kinds = list(MIX)
    weights = [MIX[k] for k in kinds]
    soak_total = max(total - provisions, 0)
    items = [Item(kind, seq) for seq, kind in enumerate(rng.choices(kinds, weights, k=soak_total))]
    plans: list[list[Item]] = [items[i::producers] for i in range(producers)]
    for n in range(provisions):
        own = plans[n % producers]
        # spread each producer's provisions through its plan, not all at its start
        share = (n // producers + 1) / (provisions // producers + 2)
        own.insert(int(len(own) * share), Item("provision", -1 - n))
    return plans


class Producer(threading.Thread):
    """Sends one plan; see the module docstring."""

    def __init__(
        self,
        index: int,
        items: list[Item],
        *,
        url: str,
        run_id: str,
        seed: int,
        deadline_at: float,
        send_seconds: float,
        unique_keys: int,
        max_delay_ms: int,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"producer-{index}", daemon=True)
        self.index = index
        self.items = list(items)
        self.url = url
        self.run_id = run_id
        self.rng = random.Random(seed * 1000 + index)
        self.deadline_at = deadline_at
        self.send_seconds = send_seconds
        self.unique_keys = unique_keys
        self.max_delay_ms = max_delay_ms
        self.stop_event = stop
        self.sent: list[Sent] = []
        self.stats = ProducerStats()
        self.failure: BaseException | None = None
        self.resends = 0
        self._conn: Any = None

    # -- messages -------------------------------------------------------------

    def _provision_payload(self, item: Item) -> dict[str, Any]:
        if item.project_id is None:
            item.project_id = f"{self.run_id}_{-1 - item.seq}"
        return {
            "project_id": item.project_id,
            "tenant_id": f"tenant-{item.project_id}",
            "region": "us-east-1",
            "api_key_count": 2,
            "services": {"auth": True, "realtime": True, "storage": True},
        }

    def _message(self, item: Item) -> tuple[dramatiq.Message[Any], int | None]:
        """The message for ``item`` and its delay in ms (None: none)."""
        if item.kind == "provision":
            from tasks.provision import provision_project

            return provision_project.message(self._provision_payload(item)), None
        if item.kind == "noop":
            return actors.noop.message(item.seq), None
        if item.kind == "transient":
            return actors.transient.message(item.seq, self.rng.choice((1, 2))), None
        if item.kind == "permanent":
            return actors.permanent.message(item.seq), None
        if item.kind == "delayed":
            delay = self.rng.randint(200, self.max_delay_ms)
            return actors.delayed.message(item.seq, delay), delay
        if item.kind == "unique":
            key = f"soak:{self.run_id}:u{self.rng.randrange(self.unique_keys)}"
            return actors.unique.message_with_options(args=(item.seq, key), unique_key=key), None
        raise ValueError(f"unknown kind {item.kind!r}")

    def _record(self, item: Item, message: dramatiq.Message[Any], returned: dramatiq.Message[Any] | None,
                fate: str, delay: int | None, resent: int = 0) -> None:
        holder = None
        if returned is not None and returned.message_id != message.message_id:
            fate, holder = "deduplicated", returned.message_id
        self.sent.append(
            Sent(message.message_id, item.kind, fate, self.index, delay, resent, holder, item.project_id)
        )

    # -- sending -----------------------------------------------------------------

    def _connection(self) -> Any:
        """The producer's own connection for transactions (reconnecting for up to a minute)."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        deadline = time.monotonic() + 60
        while True:
            try:
                self._conn = db.connect(self.url, application_name=f"soak-producer-{self.index}")
                return self._conn
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                self.stats.reconnects += 1
                time.sleep(0.2)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def _send_autocommit(self, item: Item) -> None:
        message, delay = self._message(item)
        returned = None
        resent = 0
        for attempt in range(1, 61):
            try:
                returned = tasks.broker.enqueue(message, delay=delay)
                break
            except (psycopg2.Error, ConnectionClosed) as exc:
                # The send may or may not have committed; sending the same id again is an upsert.
                self.stats.error(exc)
                resent += 1
                self.stats.send_retries += 1
                time.sleep(min(0.1 * attempt, 1.0))
        self.stats.autocommit_sends += 1
        self._record(item, message, returned, "committed" if returned is not None else "in_doubt", delay, resent)

    def _send_in_transaction(self, chunk: list[Item]) -> None:
        done: list[tuple[Item, dramatiq.Message[Any], dramatiq.Message[Any] | None, int | None]] = []
        self.stats.transaction_sends += len(chunk)
        conn = self._connection()
        fate = "committed"
        try:
            with tasks.enqueue_in(conn):
                for item in chunk:
                    message, delay = self._message(item)
                    done.append((item, message, tasks.broker.enqueue(message, delay=delay), delay))
            if self.rng.random() < ROLLBACK_RATE:
                conn.rollback()
                fate = "rolled_back"
                self.stats.transactions_rolled_back += 1
            else:
                try:
                    conn.commit()
                    self.stats.transactions_committed += 1
                except psycopg2.Error as exc:
                    self.stats.error(exc)
                    if db.is_connection_error(exc):
                        fate = "in_doubt"  # the COMMIT may have been applied before the connection died
                        self.stats.commits_in_doubt += 1
                    else:
                        fate = "rolled_back"
                        self.stats.transactions_aborted += 1
                    self._drop_connection()
        except (psycopg2.Error, ConnectionClosed, RuntimeError) as exc:
            # A send failed inside the transaction (server restart, deadlock on a unique key):
            # nothing was committed.
            self.stats.error(exc)
            self.stats.transactions_aborted += 1
            fate = "rolled_back"
            try:
                conn.rollback()
            except psycopg2.Error:
                self._drop_connection()
            # record the messages of the chunk that were never sent, too: they never existed
            sent_items = {id(d[0]) for d in done}
            for item in chunk:
                if id(item) not in sent_items:
                    unsent, unsent_delay = self._message(item)
                    done.append((item, unsent, None, unsent_delay))
        for item, message, returned, delay in done:
            self._record(item, message, returned, fate, delay)
            if item.kind == "provision" and fate == "rolled_back":
                # A provisioning that was never committed: send it again under a new name.
                self.resends += 1
                self.items.append(Item("provision", item.seq, f"{item.project_id}r{self.resends}"))

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the runner
            self.failure = exc
        finally:
            self._drop_connection()

    def _run(self) -> None:
        started = time.monotonic()
        total = len(self.items)
        pos = 0
        while pos < len(self.items):
            if self.stop_event.is_set() or time.monotonic() > self.deadline_at:
                return
            size = self.rng.randint(1, 10)
            chunk = self.items[pos : pos + size]
            pos += len(chunk)
            if self.rng.random() < 0.5:
                self._send_in_transaction(chunk)
            else:
                for item in chunk:
                    self._send_autocommit(item)
            if self.send_seconds > 0:
                # pace the sends over send_seconds, so that the chaos meets a flowing stream
                due = started + self.send_seconds * min(pos / max(total, 1), 1.0)
                pause = due - time.monotonic()
                if pause > 0:
                    self.stop_event.wait(pause)
