"""Keeps a worker process's leases while its own threads cannot run: a job holding the GIL.

A worker's heartbeat is a Python thread of the process that runs the jobs. A job that
holds the GIL in one long call into C (a regex that backtracks, ``sorted`` of a huge
list, an extension that does not release it) stops every other thread of its process:
past the lease, the reaper took its claims back as a dead worker's, and another worker
ran the job while the first one still did (a helper's review: sent with
``max_attempts=1``, three runs, two at once, the job ``failed`` as ``WorkerLost``).

The broker starts this script beside each worker process at its first heartbeat
(``PostgresBroker._start_lease_keeper``), run as a script in its own interpreter, so
that it has a GIL of its own, and it imports nothing of this package, only psycopg2.
Its stdin is a pipe from the worker process, which writes a byte to it at each of its
consumers' heartbeats. While the bytes keep coming the keeper does nothing; once none
came for one and a half heartbeat intervals (or half the lease, if sooner), it extends
the leases of every claim of that worker (``models.queries.KEEP_LEASES``) at each
half of that, for at most ``CONTROLPLANE_LEASE_KEEPER_SECONDS`` (a process stopped or
stuck for good gives its jobs up then), and says when it starts and stops, on its
stderr, which the worker reads and logs (``tasks.broker._relay_keeper_log``). The
pipe's end is its parent's death: the process gone (killed, its machine lost with it),
the keeper exits, and the leases run out as before; so does a keeper given to another
parent (a child the worker forked may hold the pipe open).

Its settings come in the environment (``CONTROLPLANE_KEEPER_*``), the database URL
among them, never on its command line (which ``ps`` shows), and so do the worker's
connect options (``tasks.db.connect_options``: a timeout, keepalives), one source for both. It starts lean, without
``site`` (``python -I -S``), and imports psycopg2 (from the directory the worker found
it in) only once it has leases to keep: a keeper that starts with psycopg2 cost each
worker process 30-50 ms of CPU at its start, 3 µs per job of a 20,000-job drain.
"""

from __future__ import annotations

import os
import select
import sys
import time

TYPE_CHECKING = False  # (typing itself costs its start 5 ms; mypy reads this name as True)
if TYPE_CHECKING:
    from typing import Any


def say(text: str) -> None:
    """A line for the worker's log: the worker reads its stderr and logs each line (see
    ``tasks.broker._relay_keeper_log``), once its own threads run."""
    sys.stderr.write(f"(keeper PID {os.getpid()}) {text}\n")
    sys.stderr.flush()


def encode_options(options: dict[str, str]) -> str:
    """Connect options as ``CONTROLPLANE_KEEPER_CONNECT`` carries them (values without spaces)."""
    return " ".join(f"{name}={value}" for name, value in options.items())


def decode_options(text: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in text.split())


def _one_line(exc: BaseException) -> str:
    """A database error as one line: its type and first line (no statement, no DETAIL)."""
    text = next(iter(str(exc).strip().splitlines()), "")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Keeper:
    """The loop: read the parent's beats, extend its leases once they stop coming."""

    def __init__(self, env: dict[str, str]) -> None:
        self.url = env["CONTROLPLANE_KEEPER_URL"]
        #: ``tasks.db.connect_options``, as ``name=value`` words.
        self.options = decode_options(env.get("CONTROLPLANE_KEEPER_CONNECT", ""))
        self.sql = env["CONTROLPLANE_KEEPER_SQL"]
        self.worker = env["CONTROLPLANE_KEEPER_WORKER"]
        self.lease = float(env["CONTROLPLANE_KEEPER_LEASE"])
        self.interval = float(env["CONTROLPLANE_KEEPER_INTERVAL"])
        self.kept_for = float(env["CONTROLPLANE_KEEPER_SECONDS"])
        #: Where the worker found psycopg2 (this interpreter runs without ``site``).
        self.path = env.get("CONTROLPLANE_KEEPER_PATH", "")
        #: How long without a beat before it keeps, and how often it looks: before the lease the
        #: last heartbeat extended runs out, whatever the interval (at 1.5 intervals alone, an
        #: interval over two thirds of the lease kept only after the reaper could take the claims).
        self.due = min(self.interval * 1.5, self.lease / 2)
        self.every = min(self.interval, self.lease / 2) / 2
        #: The worker process (see run): a keeper given to another parent keeps nothing more.
        self.parent = os.getppid()
        self.conn: Any = None
        self.last_beat = time.monotonic()
        self.keeping_since: float | None = None
        self.gave_up = False
        self.failing = False
        #: The worker process is stopped (SIGSTOP, Ctrl-Z): see parent_stopped.
        self.stopped = False

    def run(self, stdin: int) -> None:
        """Until the parent's end of the pipe closes, or the parent is gone (this process was
        given to another parent: a child the worker forked may still hold the pipe open)."""
        while os.getppid() == self.parent:
            readable, _, _ = select.select([stdin], [], [], self.every)
            if readable:
                if not os.read(stdin, 4096):
                    return  # the worker process is gone (or stopped its worker): so is its need of us
                self.beat()
                continue
            self.tick(time.monotonic())

    def beat(self) -> None:
        """The worker's threads run again."""
        now = time.monotonic()
        if self.keeping_since is not None:
            kept = (self.last_beat + self.kept_for if self.gave_up else now) - self.keeping_since
            say(f"worker {self.worker} heartbeats again after {now - self.last_beat:.0f} s: its leases were kept for "
                f"{kept:.0f} s" + (" (then given up)" if self.gave_up else ""))  # fmt: skip
        self.last_beat, self.keeping_since, self.gave_up, self.stopped = now, None, False, False

    def tick(self, now: float) -> None:
        silent = now - self.last_beat
        if silent < self.due or self.gave_up:
            return
        if silent > self.kept_for:
            self.gave_up = True
            say(f"worker {self.worker}: no heartbeat for {silent:.0f} s, past CONTROLPLANE_LEASE_KEEPER_SECONDS "
                f"({self.kept_for:.0f}): its leases are no longer kept, and its jobs go back to the queue once they "
                "run out")  # fmt: skip
            return
        if self.parent_stopped():
            if not self.stopped:
                self.stopped = True
                say(f"worker {self.worker} is stopped (SIGSTOP, Ctrl-Z): its leases are not kept, and its jobs go "
                    "back to the queue once they run out")  # fmt: skip
            return
        self.stopped = False
        try:
            kept = self.keep()
        except Exception as exc:  # (psycopg2's errors, and psycopg2 not found)
            if not self.failing:  # (once per outage, not at each half interval)
                say(f"worker {self.worker}: could not keep its leases ({_one_line(exc)}); trying again")
            self.failing = True
            self.close()
            return
        self.failing = False
        # (said once a heartbeat was missed: one merely later than half the lease is kept quietly)
        if self.keeping_since is None and kept and silent >= self.interval * 1.5:
            self.keeping_since = now
            say(f"worker {self.worker}: no heartbeat for {silent:.0f} s (its threads do not run: a job holding "
                "the GIL in one long call, C code, a regex, a huge sort, or a stopped process; or its heartbeats "
                f"fail: the database out of reach): keeping the leases of its {kept} claim(s) meanwhile")  # fmt: skip

    def parent_stopped(self) -> bool:
        """True while the worker process is stopped by a signal (``T`` in ``/proc/PID/stat``): it
        runs none of its jobs, which another worker should have once its leases run out, as
        before keepers were. A process held by a debugger or a profiler (``t``) is not: it goes
        on once let go. Without ``/proc`` (not Linux): False."""
        try:
            with open(f"/proc/{self.parent}/stat", "rb") as stat:
                return stat.read().rsplit(b")", 1)[1].split()[0] == b"T"
        except (OSError, IndexError):
            return False

    def keep(self) -> int:
        if self.conn is None:
            if self.path and self.path not in sys.path:
                sys.path.append(self.path)
            import psycopg2

            self.conn = psycopg2.connect(self.url, application_name="controlplane lease keeper", **self.options)
            self.conn.autocommit = True
        if os.getppid() != self.parent:
            return 0  # (the worker died while this connected: its leases are no longer anyone's to keep)
        with self.conn.cursor() as cur:
            cur.execute(self.sql, {"worker": self.worker, "lease": self.lease})
            (kept,) = cur.fetchone()
        return int(kept)

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:  # (psycopg2.Error: closing a connection already lost)
                pass
            self.conn = None


def main() -> None:
    # (in a process group of its own: a Ctrl-C to the worker's does not reach it; the worker
    # then stops its jobs in its own time, and its keeper goes with it, when the pipe closes)
    keeper = Keeper(dict(os.environ))
    try:
        keeper.run(sys.stdin.fileno())
    finally:
        keeper.close()


if __name__ == "__main__":
    main()
