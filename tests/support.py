"""Helpers for the tests: waiting on conditions, reading the mirror, running workers, cloning databases."""

from __future__ import annotations

import contextlib
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from tasks.db import gss_off_unless_asked

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

#: Worker settings for tests: short leases so that a dead worker is noticed in seconds.
FAST_ENV = {
    "CONTROLPLANE_POLL_INTERVAL": "0.2",
    "CONTROLPLANE_LEASE_SECONDS": "3",
    "CONTROLPLANE_HEARTBEAT_INTERVAL": "0.5",
    "CONTROLPLANE_REAP_INTERVAL": "0.5",
    "dramatiq_restart_delay": "300",
    # Dramatiq's worker threads and consumers look for a stop every second by default, so an
    # idle worker took 3-4 s to stop; at 100 ms about 2 (the rest is its CLI's one-second sleeps).
    "dramatiq_worker_timeout": "100",
    "CONTROLPLANE_MIN_BACKOFF_MS": "200",
    "CONTROLPLANE_MAX_BACKOFF_MS": "500",
}


class EnvironmentGuard:
    """Changes to this process's environment wait for the connects in flight, and connects wait
    for a change in flight.

    libpq reads the environment (``getenv`` of PGHOST, PGSSLMODE and some thirty more) on every
    connect, outside the GIL, while glibc's ``setenv`` may move the environment's array and free
    the old one: a variable added by one thread while another connects crashed a test process
    inside ``psycopg2.connect`` (``test_environment_changes_and_connects_in_other_threads_do_not_crash``
    reproduces it in a child process, within a second or two on an idle machine, in about a
    third of the runs under the suite's load, without this guard). The suite adds
    variables (pytest's ``PYTEST_CURRENT_TEST`` at each test's setup, ``monkeypatch.setenv``) while
    its clone threads, and workers running in the test process, connect; ``install()`` makes every
    ``os.environ`` change and every ``psycopg2.connect`` in the process go through one guard.

    A wait is bounded (``WAIT_SECONDS``): a connect that hangs, or a guard left held by an
    exception raised into a thread (a Ctrl-C), costs that long and a warning (an error under
    ``-W error``), not the session.
    """

    WAIT_SECONDS = 30.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._connecting = 0
        self._changing = 0  # (more than one only after a wait went ahead)
        self._changes_waiting = 0

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Wait (holding ``_cond``) until ``ready()``, or go ahead after ``WAIT_SECONDS``."""
        if not self._cond.wait_for(ready, timeout=self.WAIT_SECONDS):
            warnings.warn(f"EnvironmentGuard: {what} went ahead after {self.WAIT_SECONDS:g}s", stacklevel=4)

    @contextmanager
    def connecting(self) -> Iterator[None]:
        with self._cond:  # (a change waiting goes first)
            self._wait(lambda: not (self._changing or self._changes_waiting), "a connect")
            self._connecting += 1
        try:
            yield
        finally:
            with self._cond:
                self._connecting -= 1
                self._cond.notify_all()

    @contextmanager
    def changing(self) -> Iterator[None]:
        with self._cond:
            self._changes_waiting += 1
            try:
                self._wait(lambda: not (self._changing or self._connecting), "an environment change")
            finally:
                self._changes_waiting -= 1
            self._changing += 1
        try:
            yield
        finally:
            with self._cond:
                self._changing -= 1
                self._cond.notify_all()

    def install(self) -> None:
        """Wrap ``os.putenv``/``os.unsetenv`` (what ``os.environ`` changes call) and psycopg2's
        connect (what ``psycopg2.connect`` and SQLAlchemy's psycopg2 dialect call)."""
        if getattr(psycopg2, "_environment_guard", None) is not None:
            return
        putenv, unsetenv, connect = os.putenv, os.unsetenv, psycopg2._connect

        def guarded_putenv(key: Any, value: Any) -> None:
            with self.changing():
                putenv(key, value)

        def guarded_unsetenv(key: Any) -> None:
            with self.changing():
                unsetenv(key)

        def guarded_connect(*args: Any, **kwargs: Any) -> Any:
            with self.connecting():
                return connect(*args, **kwargs)

        os.putenv, os.unsetenv = guarded_putenv, guarded_unsetenv
        psycopg2._connect = guarded_connect
        psycopg2._environment_guard = self


def wait_for(predicate: Callable[[], T], timeout: float = 60.0, what: str = "a condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def at_once(call: Callable[[], T], n: int) -> list[T | str]:
    """Run ``call`` in ``n`` threads released together; what each returned, or ``"Type: message"``
    for what it raised (as a job would record it), in the order they finished."""
    start, outcomes = threading.Barrier(n), []

    def run() -> None:
        start.wait()
        try:
            outcomes.append(call())
        except Exception as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def query(url: str, sql: str, params: Any = None) -> list[dict[str, Any]]:
    """Run one statement in autocommit and return its rows as dicts."""
    conn = psycopg2.connect(url, **gss_off_unless_asked(url))  # (tests connect from several threads)
    conn.autocommit = True
    try:
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(sql, params)
            return [dict(r) for r in cur.fetchall()] if cur.description else []
    finally:
        conn.close()


def queue_stats_both_ways(url: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The queue stats as the view and as the message-table query give them, read in one
    snapshot at one ``now()`` (so that they can be compared row for row)."""
    from models import queries

    conn = psycopg2.connect(url)
    try:
        conn.set_session(isolation_level="REPEATABLE READ")
        with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
            cur.execute(queries.QUEUE_STATS)
            view = [dict(r) for r in cur.fetchall()]
            cur.execute(queries.QUEUE_STATS_VIA_MESSAGES)
            fast = [dict(r) for r in cur.fetchall()]
        conn.rollback()
        return view, fast
    finally:
        conn.close()


def effects(url: str, kind: str | None = None) -> list[dict[str, Any]]:
    """What the test actors recorded (``tests.effects``), of one kind or all, in the order written."""
    if kind is None:
        return query(url, "SELECT * FROM test_support.effects ORDER BY id")
    return query(url, "SELECT * FROM test_support.effects WHERE kind = %s ORDER BY id", (kind,))


def open_gate(url: str, name: str) -> None:
    """Let the ``tests.wait_for_gate`` jobs waiting on ``name`` finish."""
    query(url, "INSERT INTO test_support.gates (name) VALUES (%s) ON CONFLICT DO NOTHING", (name,))


def runs(url: str) -> list[tuple[Any, Any]]:
    """(start, end) of every run of an actor that records ``started`` and ``finished``,
    by the database's clock, in start order."""
    end = {str(r["message_id"]): r["at"] for r in effects(url, "finished")}
    return sorted((r["at"], end[str(r["message_id"])]) for r in effects(url, "started"))


def job(url: str, job_id: str) -> dict[str, Any]:
    rows = query(url, "SELECT * FROM control_plane.jobs WHERE id = %s", (job_id,))
    assert rows, f"no jobs row for {job_id}"
    return rows[0]


def jobs_in(url: str, ids: list[str], *statuses: str) -> bool:
    rows = query(
        url,
        "SELECT count(*) AS n FROM control_plane.jobs WHERE id = ANY(%s::uuid[]) AND status = ANY(%s)",
        (ids, list(statuses)),
    )
    return bool(rows[0]["n"] == len(ids))


def disagreements(url: str) -> list[dict[str, Any]]:
    """Rows where the mirror and the broker's table tell different stories.

    A claimed message's job is ``pending`` (no thread started it yet, or its
    start mark is not written yet) or ``running``; an unclaimed one's is ``pending``.
    """
    return query(
        url,
        """
        SELECT j.id, j.status, m.claim_token IS NOT NULL AS claimed, m.id IS NOT NULL AS in_queue
        FROM control_plane.jobs j FULL JOIN control_plane.messages m ON m.id = j.id
        WHERE j.id IS NULL
           OR (m.id IS NULL AND j.status IN ('pending', 'running'))
           OR (m.id IS NOT NULL AND j.status NOT IN ('pending', 'running'))
           OR (m.id IS NOT NULL AND m.claim_token IS NULL AND j.status <> 'pending')
        """,
    )


class WorkerProcess:
    """A real ``dramatiq`` worker (main process + worker processes) on a test database."""

    def __init__(
        self,
        url: str,
        *,
        processes: int = 1,
        threads: int = 4,
        module: str = "tests.actors",
        extra_env: dict[str, str] | None = None,
        log_path: Path | None = None,
        queues: list[str] | None = None,
        wrap: Sequence[str] = (),
    ) -> None:
        """``wrap``: a command the worker runs under (``unshare ...``), which :meth:`terminate`
        passes by: its signal goes to the wrapper's child, ``dramatiq``'s main process."""
        self.url = url
        self.wrap = tuple(wrap)
        env = {**os.environ, **FAST_ENV, "DATABASE_URL": url, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [
                *self.wrap,
                sys.executable,
                "-m",
                "dramatiq",
                "tasks",
                module,
                "--processes",
                str(processes),
                "--threads",
                str(threads),
                "--worker-shutdown-timeout",
                "20000",
                *(["--queues", *queues] if queues else []),
            ],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        self.processes = processes

    def worker_pids(self) -> list[int]:
        rows = query(self.url, "SELECT pid FROM control_plane.worker_heartbeats ORDER BY pid")
        return [int(r["pid"]) for r in rows]

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited early with {self.proc.returncode}: {self.log()}")
            return len(self.worker_pids()) >= self.processes

        wait_for(ready, timeout, "the worker processes to heartbeat")

    def log(self) -> str:
        return self.log_path.read_text()[-4000:] if self.log_path and self.log_path.exists() else ""

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            if self.wrap:
                # (not the process group: a worker process signalled by its main process too
                # takes the second SIGTERM as "kill now", as under systemd's default KillMode)
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                for child in children:
                    os.kill(int(child), signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode

    def kill_all(self) -> None:
        """SIGKILL the whole process group: main and worker processes die mid-flight."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextmanager
def running_worker(url: str, tmp_path: Path, **kwargs: Any) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(url, log_path=tmp_path / f"worker-{time.monotonic_ns()}.log", **kwargs)
    try:
        worker.wait_ready()
        yield worker
    finally:
        worker.terminate()


def reap_at_once(consumer: Any) -> None:
    """Have ``consumer`` reap at its next housekeeping, whatever its process's other consumers did
    (a process reaps once per interval, by whichever consumer comes first: ``PostgresBroker._reap_due``)."""
    consumer._next_reap = 0.0
    consumer.broker._reaped_at = -math.inf


def reap_from_another_worker() -> None:
    """Reap now, as another worker's consumer (of a queue with nothing to claim) does at its next
    housekeeping: the leases that expired are put back, or their jobs ended."""
    import tasks

    other = tasks.broker.consume("slow", prefetch=1, timeout=100)
    reap_at_once(other)
    try:
        assert next(other) is None
    finally:
        other.close()


def claim_in_process(queue: str = "default") -> tuple[Any, Any]:
    """Claim one message with a consumer of the global broker in this process, as a worker thread would get it."""
    import tasks

    consumer = tasks.broker.consume(queue, prefetch=1, timeout=5000)
    held = next(consumer)
    assert held is not None, f"nothing to claim in queue {queue!r}"
    return consumer, held


def settle_in_process(consumer: Any, held: Any, outcome: str, error: str = "RuntimeError: boom") -> None:
    """Write ``outcome`` (ack or nack) for a message claimed with :func:`claim_in_process`, then close."""
    if outcome == "ack":
        consumer.ack(held)
    else:
        held.error_text = error
        held.fail()
        consumer.nack(held)
    consumer._flush()
    consumer.close()


class ReplyLosingProxy:
    """A TCP proxy on 127.0.0.1 in front of the test server that loses one reply.

    Connections made to :attr:`url` are forwarded to the server of ``url``. Once
    :meth:`lose_reply_to` is armed, the first statement the client sends that contains
    one of its markers reaches the server, which runs (and, outside a transaction,
    commits) it; its reply is read to its end (ReadyForQuery) and dropped, and the
    client's side closed: the client sees a lost connection for a statement that took
    effect, as a network cut at that instant would.
    """

    def __init__(self, url: str) -> None:
        dsn = psycopg2.extensions.parse_dsn(url)
        host, port = dsn.get("host", "127.0.0.1"), int(dsn.get("port", 5432))
        if host.startswith("/"):
            self._upstream: tuple[int, Any] = (socket.AF_UNIX, f"{host}/.s.PGSQL.{port}")
        else:
            self._upstream = (socket.AF_INET, (host, port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        dsn.update(host="127.0.0.1", port=str(self._listener.getsockname()[1]))
        self.url = " ".join(f"{key}={value}" for key, value in dsn.items())
        self._markers: tuple[bytes, ...] = ()
        self._unless = b""
        self.lost = threading.Event()
        self._sockets: list[Any] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def lose_reply_to(self, *markers: bytes, unless: bytes = b"") -> None:
        """Lose the reply to the next statement holding one of ``markers`` and not ``unless``."""
        self._markers, self._unless = markers, unless

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # (wakes the thread in accept())
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.socket(self._upstream[0], socket.SOCK_STREAM)
            upstream.connect(self._upstream[1])
            self._sockets += [client, upstream]
            losing = threading.Event()
            threading.Thread(target=self._pump, args=(client, upstream, losing, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, losing, False), daemon=True).start()

    def _hit(self, data: bytes) -> bool:
        return any(m in data for m in self._markers) and not (self._unless and self._unless in data)

    def _pump(self, src: Any, dst: Any, losing: threading.Event, from_client: bool) -> None:
        seen = b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if from_client and self._hit(data):
                    self._markers = ()
                    losing.set()
                elif not from_client and losing.is_set():
                    seen = (seen + data)[-64:]
                    if b"Z\x00\x00\x00\x05" in seen:  # ReadyForQuery: the statement ended, committed
                        self.lost.set()
                        for sock in (dst, src):  # (shut down: a close waits for the other pump's recv)
                            sock.shutdown(socket.SHUT_RDWR)
                        return
                    continue
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


class Clones:
    """Clones of the template, made ahead of the tests that take them and dropped after.

    One thread keeps ``ahead`` clones ready (and one more made, waiting for room);
    another drops the ones given back. A clone that cannot be made is raised in the
    test that takes it, not in a thread, and the next test's clone is tried anew. A
    clone that cannot be dropped is reported as a warning at the session's end.

    A write transaction in any database, a clone's included, delays pruning in all
    of them (snapshots count every database's running transactions): a test that
    counted HOT updates saw 102-118 of 302 with clones made beside it, over half
    without (docs/performance.md, change 11). Such a test runs ``quiet()`` (see
    ``quiet_server``).
    """

    #: Seconds a test waits for its clone before it fails (the maker retries for about 5 s).
    TAKE_TIMEOUT = 120.0

    def __init__(self, server_url: str, template: str, ahead: int = 2) -> None:
        self.server_url = server_url
        # Bounded, so that a server that stops answering fails a test instead of hanging the session.
        self._admin_dsn = psycopg2.extensions.make_dsn(
            server_url, connect_timeout=10, options="-c statement_timeout=120000"
        )
        self.template = template
        self._ready: queue.Queue[str | BaseException] = queue.Queue(maxsize=ahead)
        self._dropping: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._busy = threading.Lock()  # held by a CREATE or DROP in flight, or by quiet()
        self._not_dropped: list[str] = []
        self._maker = threading.Thread(target=self._make, name="clone-maker", daemon=True)
        self._dropper = threading.Thread(target=self._drop, name="clone-dropper", daemon=True)
        self._maker.start()
        self._dropper.start()

    def take(self) -> str:
        try:
            got = self._ready.get(timeout=self.TAKE_TIMEOUT)
        except queue.Empty:
            state = "running" if self._maker.is_alive() else "stopped"
            raise AssertionError(
                f"no database clone of {self.template} within {self.TAKE_TIMEOUT:.0f}s (the clone maker is {state})"
            ) from None
        if isinstance(got, BaseException):
            raise got
        return got

    def give_back(self, name: str) -> None:
        self._dropping.put(name)

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """No clone is made or dropped inside this block, and the ones given back before it are gone."""
        self._dropping.join()
        with self._busy:
            yield

    def close(self) -> None:
        self._stop.set()
        while self._maker.is_alive():  # unblock the maker's put, dropping what it made
            try:
                self._drop_made(self._ready.get(timeout=0.1))
            except queue.Empty:
                continue
        while True:  # what it put between the last get and its exit
            try:
                self._drop_made(self._ready.get_nowait())
            except queue.Empty:
                break
        self._dropping.put(None)
        self._dropper.join()
        if self._not_dropped:
            warnings.warn(f"test databases left on the server: {', '.join(self._not_dropped)}", stacklevel=2)

    def _drop_made(self, got: str | BaseException) -> None:
        if isinstance(got, str):
            self._dropping.put(got)

    def _make(self) -> None:
        while not self._stop.is_set():
            name = f"cp_t_{uuid.uuid4().hex[:12]}"
            try:
                self._create(name)
            except Exception as exc:  # handed to the test that takes it; the next test tries anew
                self._ready.put(exc)
                continue
            self._ready.put(name)

    def _create(self, name: str) -> None:
        # A server that restarts or is briefly busy gets a few tries before a test sees it.
        for attempt in range(10):
            try:
                with self._busy:
                    query(self._admin_dsn, f"CREATE DATABASE {name} TEMPLATE {self.template}")
                    # A copy does not keep its template's own privileges: close it as migration 0009
                    # leaves a migrated database (tests connect as a superuser).
                    query(self._admin_dsn, f"REVOKE CONNECT, TEMPORARY ON DATABASE {name} FROM PUBLIC")
                return
            except Exception:
                if attempt == 9:
                    raise
                time.sleep(0.5)

    def _drop(self) -> None:
        while True:
            name = self._dropping.get()
            try:
                if name is None:
                    return
                with self._busy:
                    query(self._admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            except Exception:
                self._not_dropped.append(str(name))
            finally:
                self._dropping.task_done()
