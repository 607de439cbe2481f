"""``floor``, ``floor_batch`` and ``floor_tuned``: the smallest correct Postgres queue, written by hand.

What PostgreSQL itself allows on this machine, with psycopg2 and no framework:

* enqueue: one autocommit ``INSERT`` per job (a batch: one ``INSERT ... SELECT
  unnest(...)``); a statement-level trigger sends one NOTIFY per statement;
* claim (``--claim 1``, floor): ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE
  SKIP LOCKED LIMIT 1) RETURNING``; ack: ``DELETE ... WHERE id = ...``;
* claim (``--claim 100``, floor_batch): ``UPDATE ... WHERE id IN (SELECT ...
  LIMIT 100 FOR UPDATE SKIP LOCKED) RETURNING``; ack: one ``DELETE ... WHERE
  id = ANY(...)`` after the batch ran;
* a worker process runs ``--threads`` threads, each with its own autocommit
  connection that LISTENs, so an idle thread wakes on the NOTIFY (and looks
  again every second in case one was missed).

``floor_tuned`` (a reference, not in the default run) is floor's worker with
the two things ours does that floor does not:

* ``--async-commit``: the worker connections run ``SET synchronous_commit =
  off``, so a claim and an ack do not each wait for a WAL flush (ours' claim
  and settle connections do the same; sends stay synchronous, as ours' do);
* ``--one-listener``: one connection per worker process LISTENs, and each
  notification wakes one idle thread (every thread LISTENing, one send wakes
  them all). A woken thread that finds a job wakes one more, so a batch sent
  to idle workers is taken up by every thread, not by one until the others'
  one-second look; threads still look every second in case a wake-up was missed.

No leases, retries or history: a floor, not a product.
"""

from __future__ import annotations

import json
import select
import signal
import threading
from typing import Any

import psycopg2

from bench.drivers import common
from bench.record import record

SCHEMA = """
CREATE SCHEMA bench_floor;
CREATE TABLE bench_floor.jobs (
    id bigserial PRIMARY KEY,
    payload jsonb NOT NULL,
    claimed_at timestamptz
);
CREATE FUNCTION bench_floor.wake() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bench_floor', '');
    RETURN NULL;
END $$;
CREATE TRIGGER wake AFTER INSERT ON bench_floor.jobs FOR EACH STATEMENT EXECUTE FUNCTION bench_floor.wake();
"""

INSERT_ONE = "INSERT INTO bench_floor.jobs (payload) VALUES (%s)"
INSERT_MANY = "INSERT INTO bench_floor.jobs (payload) SELECT unnest(%s::jsonb[])"
CLAIM_ONE = """
UPDATE bench_floor.jobs SET claimed_at = now()
WHERE id = (SELECT id FROM bench_floor.jobs WHERE claimed_at IS NULL ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, payload
"""
CLAIM_MANY = """
UPDATE bench_floor.jobs SET claimed_at = now()
WHERE id IN (SELECT id FROM bench_floor.jobs WHERE claimed_at IS NULL ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED)
RETURNING id, payload
"""
ACK_ONE = "DELETE FROM bench_floor.jobs WHERE id = %s"
ACK_MANY = "DELETE FROM bench_floor.jobs WHERE id = ANY(%s)"


def connect(url: str) -> Any:
    """An autocommit psycopg2 connection."""
    conn = psycopg2.connect(url, application_name="bench-floor")
    conn.autocommit = True
    return conn


def setup(url: str) -> None:
    conn = connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(SCHEMA)
    finally:
        conn.close()


def enqueue(url: str, n: int, batch: int) -> None:
    conn = connect(url)
    cur = conn.cursor()
    body = json.dumps({"sent": 0.0})

    def send_one(sent: float) -> None:
        cur.execute(INSERT_ONE, (json.dumps({"sent": sent}),))

    def send_many(count: int) -> None:
        cur.execute(INSERT_MANY, ([body] * count,))

    try:
        common.timed_enqueue(n, batch, send_one, send_many)
    finally:
        conn.close()


def latency(url: str, n: int, rate: float) -> None:
    conn = connect(url)
    cur = conn.cursor()
    try:
        common.paced_send(n, rate, lambda sent: cur.execute(INSERT_ONE, (json.dumps({"sent": sent}),)))
    finally:
        conn.close()


class Wakes:
    """Wake-ups for idle worker threads, one per notification: ``--one-listener``.

    A wake-up is a token as well as a ``notify``, so that one given while no thread waits (each
    between its empty claim and its wait) is taken by the next thread to go idle rather than lost.
    Tokens never outnumber the threads.
    """

    def __init__(self, threads: int) -> None:
        self._cond = threading.Condition()
        self._tokens = 0
        self._threads = threads

    def wake(self, n: int = 1) -> None:
        with self._cond:
            self._tokens = min(self._tokens + n, self._threads)
            self._cond.notify(n)

    def wait(self, timeout: float) -> bool:
        """Wait for a wake-up (at most ``timeout`` s); whether one was taken."""
        with self._cond:
            if not self._tokens:
                self._cond.wait(timeout)
            if self._tokens:
                self._tokens -= 1
                return True
            return False


def _listen(url: str, wakes: Wakes, stop: threading.Event) -> None:
    """``--one-listener``: the process's one LISTEN connection; one wake-up per notification."""
    conn = connect(url)
    try:
        conn.cursor().execute("LISTEN bench_floor")
        while not stop.is_set():
            if select.select([conn], [], [], 1.0)[0]:
                conn.poll()
                if conn.notifies:
                    wakes.wake(len(conn.notifies))
                    conn.notifies.clear()
    finally:
        conn.close()


def _work(url: str, claim: int, stop: threading.Event, async_commit: bool = False, wakes: Wakes | None = None) -> None:
    conn = connect(url)
    cur = conn.cursor()
    if async_commit:
        cur.execute("SET synchronous_commit = off")
    if wakes is None:
        cur.execute("LISTEN bench_floor")
    woken = False
    while not stop.is_set():
        if claim == 1:
            cur.execute(CLAIM_ONE)
            row = cur.fetchone()
            if row is not None:
                if woken and wakes is not None:
                    wakes.wake()  # there may be more: one more idle thread looks too
                woken = False
                record(row[1]["sent"])
                cur.execute(ACK_ONE, (row[0],))
                continue
        else:
            cur.execute(CLAIM_MANY, (claim,))
            rows = cur.fetchall()
            if rows:
                if woken and wakes is not None:
                    wakes.wake()
                woken = False
                for _, payload in rows:
                    record(payload["sent"])
                cur.execute(ACK_MANY, ([r[0] for r in rows],))
                continue
        # Nothing ready: sleep until a NOTIFY (or a second, in case one was missed).
        if wakes is not None:
            woken = wakes.wait(1.0)
        elif select.select([conn], [], [], 1.0)[0]:
            conn.poll()
            conn.notifies.clear()


def worker(url: str, threads: int, claim: int, async_commit: bool = False, one_listener: bool = False) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    wakes = Wakes(threads) if one_listener else None
    workers = [
        threading.Thread(target=_work, args=(url, claim, stop, async_commit, wakes), daemon=True)
        for _ in range(threads)
    ]
    if wakes is not None:
        workers.append(threading.Thread(target=_listen, args=(url, wakes, stop), daemon=True))
    for t in workers:
        t.start()
    while not stop.wait(0.5):
        pass


def main() -> None:
    args = common.parse()
    if args.command == "setup":
        setup(args.url)
    elif args.command == "enqueue":
        enqueue(args.url, args.n, args.batch)
    elif args.command == "latency":
        latency(args.url, args.n, args.rate)
    else:
        worker(args.url, args.threads, args.claim, args.async_commit, args.one_listener)


if __name__ == "__main__":
    main()
