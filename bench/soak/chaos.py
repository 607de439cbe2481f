"""The chaos loop: bounded in count and time, loopback only.

Every few seconds (uniformly between ``interval[0]`` and ``interval[1]``) it does one of
(the first is always a kill):

* ``kill``: SIGKILL a random worker's whole process group mid-flight, restart it at once;
* ``cut``: close a random 20-60 % of the proxied connections (the workers see them reset);
* ``stall``: freeze a random quarter of the proxied connections for longer than a lease,
  then let them go on (a partition: the reaper re-queues their jobs while they still run);

and, once each at a planned time, ``sigterm`` (a graceful stop of one worker, then a
restart), ``pg_restart`` (``pg_ctl restart -m fast`` of the private server) and ``pause``
(``control_plane.pause_queue`` of the soak's queue for ``pause_seconds``, then
``resume_queue``: the workers give back what they hold unstarted while sends go on). It stops
after ``max_events`` events or ``seconds`` seconds, whichever comes first, or when told.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg2

from bench.soak.proxy import ProxyProcess
from bench.soak.server import PrivateServer
from bench.soak.workers import SoakWorker


@dataclass
class ChaosPlan:
    """How much chaos, and when."""

    seconds: float
    max_events: int
    interval: tuple[float, float]
    pg_restart_at: float | None
    sigterm_at: float | None
    stall_seconds: float
    pause_at: float | None = None
    pause_seconds: float = 0.0
    weights: dict[str, float] = field(default_factory=lambda: {"kill": 0.5, "cut": 0.35, "stall": 0.15})


class Chaos(threading.Thread):
    """Runs a :class:`ChaosPlan` against the workers, the proxy and the server."""

    def __init__(
        self,
        plan: ChaosPlan,
        *,
        workers: list[SoakWorker],
        workers_lock: threading.Lock,
        proxy: ProxyProcess,
        server: PrivateServer,
        seed: int,
        clock_zero: float,
        pause_url: str = "",
        queue: str = "",
    ) -> None:
        super().__init__(name="chaos", daemon=True)
        self.plan = plan
        self.workers = workers
        self.workers_lock = workers_lock
        self.proxy = proxy
        self.server = server
        self.rng = random.Random(seed)
        self.clock_zero = clock_zero
        self.pause_url = pause_url
        self.queue = queue
        self.stop_event = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.failure: BaseException | None = None
        self.started_at = 0.0
        self.ended_at = 0.0
        self._last: SoakWorker | None = None

    def stop(self) -> None:
        self.stop_event.set()

    def _log(self, action: str, **detail: Any) -> None:
        self.events.append({"t": round(time.monotonic() - self.clock_zero, 2), "action": action, **detail})

    def counts(self) -> dict[str, int]:
        """How many events of each kind happened."""
        found: dict[str, int] = {}
        for event in self.events:
            found[event["action"]] = found.get(event["action"], 0) + 1
        return found

    def run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self._run()
        except BaseException as exc:  # reported by the runner
            self.failure = exc
        finally:
            self.ended_at = time.monotonic()

    def _run(self) -> None:
        plan = self.plan
        end = self.started_at + plan.seconds
        once = {"pg_restart": plan.pg_restart_at, "sigterm": plan.sigterm_at, "pause": plan.pause_at}
        kinds = list(plan.weights)
        weights = [plan.weights[k] for k in kinds]
        while len(self.events) < plan.max_events:
            wait = self.rng.uniform(*plan.interval)
            if time.monotonic() + wait > end or self.stop_event.wait(wait):
                return
            elapsed = time.monotonic() - self.started_at
            due = [name for name, at in once.items() if at is not None and elapsed >= at]
            if due:
                once[due[0]] = None
                action = due[0]
            elif not self.events and "kill" in kinds:
                action = "kill"  # the first event is always a kill, however short the chaos
            else:
                action = self.rng.choices(kinds, weights)[0]
            getattr(self, f"_{action}")()

    def _pick(self) -> SoakWorker:
        """A random worker, never the one hit last (so every slot takes its share)."""
        choices = [w for w in self.workers if w is not self._last] or self.workers
        self._last = self.rng.choice(choices)
        return self._last

    def _kill(self) -> None:
        with self.workers_lock:
            worker = self._pick()
            pids = worker.pids()
            worker.kill()
        self.stop_event.wait(self.rng.uniform(0.0, 1.0))
        with self.workers_lock:
            worker.start()
        self._log("kill", slot=worker.slot, pids=pids)

    def _sigterm(self) -> None:
        with self.workers_lock:
            worker = self._pick()
            worker.expected_exit = True
        began = time.monotonic()
        code = worker.terminate(timeout=30)
        took = time.monotonic() - began
        with self.workers_lock:
            worker.start()
        self._log("sigterm", slot=worker.slot, exit_code=code, stop_seconds=round(took, 2))

    def _pg_restart(self) -> None:
        took = self.server.restart()
        self._log("pg_restart", seconds=round(took, 2))

    def _cut(self) -> None:
        fraction = round(self.rng.uniform(0.2, 0.6), 2)
        answer = self.proxy.cut(fraction)
        self._log("cut", fraction=fraction, **answer)

    def _stall(self) -> None:
        answer = self.proxy.stall(0.25, self.plan.stall_seconds)
        self._log("stall", fraction=0.25, seconds=self.plan.stall_seconds, **answer)

    def _pause(self) -> None:
        def call(function: str) -> Any:
            conn = psycopg2.connect(self.pause_url)  # directly: the proxy's cuts and stalls are not this
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    cur.execute(f"SELECT control_plane.{function}(%s)", (self.queue,))
                    return cur.fetchone()[0]
            finally:
                conn.close()

        paused = call("pause_queue")
        self.stop_event.wait(self.plan.pause_seconds)
        resumed = call("resume_queue")
        self._log("pause", seconds=self.plan.pause_seconds, paused=paused, resumed=resumed)
