"""Prometheus metrics: Dramatiq's own, from the workers, and queue gauges read from SQL.

Two endpoints, because they answer different questions:

* **Workers** (``CONTROLPLANE_METRICS_PORT`` set): Dramatiq's ``Prometheus``
  middleware counts messages, errors, retries and durations in every worker
  process (prometheus_client's multiprocess mode, files under
  ``dramatiq_prom_db``); the ``dramatiq`` main process serves their sum on that
  port. One endpoint per worker machine.
* **Queues** (``controlplane metrics --port N``): depth, lag and failures of
  every queue, read at each scrape from ``control_plane.queue_stats`` (with the
  Postgres broker, from the message table and two indexes instead: the view
  reads the whole history). They
  describe the whole system, not one machine, so one such endpoint is enough
  (every worker serving them would multiply the series by the machine count).

prometheus_client is imported only inside functions: in a worker it must be
imported after ``PROMETHEUS_MULTIPROC_DIR`` is set, which the middleware does
at process boot. (Importing Dramatiq's middleware module creates its
``dramatiq_prom_db`` folder, by default ``/tmp/dramatiq-prometheus``.)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager
from http.server import HTTPServer
from typing import Any

from dramatiq.common import q_name
from dramatiq.middleware.prometheus import Prometheus

from models import queries
from tasks.db import loggable_error, transaction

logger = logging.getLogger(__name__)

#: The gauges read from ``control_plane.queue_stats``: (metric name, column, help).
QUEUE_GAUGES = (
    ("controlplane_queue_ready", "ready", "Jobs waiting to run now, per queue (queue depth)."),
    ("controlplane_queue_scheduled", "scheduled", "Jobs waiting for a delay or a retry backoff, per queue."),
    ("controlplane_queue_running", "running", "Jobs running now, per queue."),
    ("controlplane_queue_failed", "failed", "Failed jobs kept in control_plane.jobs (until pruned), per queue."),
    (
        "controlplane_queue_completed_last_minute",
        "completed_last_minute",
        "Jobs completed in the last minute, per queue.",
    ),
    (
        "controlplane_queue_oldest_ready_age_seconds",
        "oldest_ready_age_seconds",
        "How long the oldest job ready to run has waited, per queue (lag); 0 when none waits.",
    ),
    ("controlplane_queue_paused", "paused", "1 while the queue is paused (controlplane queues pause)."),
)


#: How long a scrape's statements may take or wait for a lock, in milliseconds (Prometheus's
#: default scrape timeout is 10 s).
SCRAPE_TIMEOUT_MS = 5_000
#: How long a scrape waits for its read in all (a connection, a pool slot, the statements), in
#: seconds: a server frozen or cut off answers no timeout of its own, and a scrape held past
#: Prometheus's 10 s never says the stats are down.
SCRAPE_DEADLINE_SECONDS = SCRAPE_TIMEOUT_MS / 1000 + 2.0


class QueueStatsCollector:
    """A prometheus_client collector: one SQL read of the queue stats per scrape.

    ``connection`` gives an autocommit connection as a context manager
    (``tasks.connection``); ``stats`` is the query, ``queries.QUEUE_STATS`` (the
    view) or, with the Postgres broker, ``queries.QUEUE_STATS_VIA_MESSAGES``;
    ``workers`` false (another broker) leaves ``controlplane_workers`` out.
    When the database cannot be read, or does not answer within ``deadline`` seconds in all,
    only ``controlplane_stats_up 0`` is exported (and the reason logged). The read runs on a
    thread of its own, one at a time: a scrape while one still waits on the database waits for
    that same read (up to ``deadline``) rather than start another behind it.
    """

    def __init__(
        self,
        connection: Callable[[], AbstractContextManager[Any]],
        stats: str = queries.QUEUE_STATS,
        silent_after: float = 30.0,
        workers: bool = True,
        deadline: float = SCRAPE_DEADLINE_SECONDS,
    ) -> None:
        self._connection = connection
        self._stats = stats
        self._silent_after = silent_after
        self._workers = workers
        self._deadline = deadline
        self._lock = threading.Lock()
        self._reading: Future[tuple[list[dict[str, Any]], Any]] | None = None

    def describe(self) -> list[Any]:
        return []  # no metric is exported on registration: collect() reads the database

    def _read(self) -> tuple[list[dict[str, Any]], Any]:
        with transaction(self._connection) as conn, conn.cursor() as cur:
            # A scrape answers within Prometheus's timeout even while a migration or an
            # operator's lock holds the tables: then it says the stats are down.
            cur.execute("SET LOCAL statement_timeout = %(ms)s; SET LOCAL lock_timeout = %(ms)s",
                        {"ms": SCRAPE_TIMEOUT_MS})
            cur.execute(queries.STATS_SESSION)
            cur.execute(self._stats)
            columns = [d[0] for d in cur.description]
            rows = [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
            workers = None
            if self._workers:
                cur.execute(queries.LIVE_WORKERS, {"silent_after": self._silent_after})
                (workers,) = cur.fetchone()
        return rows, workers

    def _start_read(self) -> Future[tuple[list[dict[str, Any]], Any]]:
        """The read in flight, or a new one on a daemon thread (a read stuck on a frozen server
        must not hold the process at exit)."""
        with self._lock:
            if self._reading is not None and not self._reading.done():
                return self._reading
            future: Future[tuple[list[dict[str, Any]], Any]] = Future()

            def read() -> None:
                try:
                    future.set_result(self._read())
                except BaseException as exc:  # handed to the scrape that waits for it
                    future.set_exception(exc)

            self._reading = future
            threading.Thread(target=read, name="controlplane-metrics-read", daemon=True).start()
            return future

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("controlplane_stats_up", "1 when control_plane.queue_stats could be read.")
        try:
            rows, workers = self._start_read().result(timeout=self._deadline)
        except Exception as exc:  # a scrape must answer even when the database does not
            why = (f"the database did not answer within {self._deadline:g} s" if isinstance(exc, FutureTimeout)
                   else loggable_error(exc))  # fmt: skip
            logger.warning("metrics: cannot read control_plane.queue_stats: %s", why)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name, column, text in QUEUE_GAUGES:
            if rows and column not in rows[0]:
                continue  # paused: the Postgres broker's (another's view has no such column), not a false 0
            family = GaugeMetricFamily(name, text, labels=["queue"])
            for row in rows:
                if row[column] is None:
                    continue  # not counted (completions on a large history without the BRIN index): no data, not 0
                family.add_metric([row["queue"]], float(row[column]))
            yield family
        if workers is None:  # another broker's workers do not heartbeat here: no gauge, not a false 0
            return
        live = GaugeMetricFamily(
            "controlplane_workers", "Worker processes that heartbeated within a lease, Postgres broker."
        )
        live.add_metric([], float(workers))
        yield live


def serve_queue_metrics(
    connection: Callable[[], AbstractContextManager[Any]],
    port: int,
    host: str = "0.0.0.0",
    stats: str = queries.QUEUE_STATS,
    silent_after: float = 30.0,
    workers: bool = True,
) -> tuple[HTTPServer, threading.Thread]:
    """Serve the queue gauges at ``http://host:port/metrics`` from a daemon thread.

    ``port`` 0 picks a free port: read it from ``server.server_port``. Stop with
    ``server.shutdown()``. ``stats``, ``silent_after`` (the workers' lease, in
    seconds) and ``workers`` (whether to export ``controlplane_workers``: the
    Postgres broker's workers heartbeat, RabbitMQ's do not): see :class:`QueueStatsCollector`.
    """
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(QueueStatsCollector(connection, stats, silent_after, workers))
    server, thread = start_http_server(port, addr=host, registry=registry)
    return server, thread


class WorkerMetrics(Prometheus):
    """Dramatiq's ``Prometheus`` middleware, served on ``CONTROLPLANE_METRICS_PORT``.

    Dramatiq's exposition server listens on ``dramatiq_prom_port`` (9191), read
    when its module is imported; this subclass serves the same multiprocess
    registry on the port our settings name instead.
    """

    @property
    def forks(self) -> list[Callable[[], int]]:
        return [serve_worker_metrics]

    # Two of Dramatiq's series are wrong under RabbitMQ, the only broker that exports them
    # (dramatiq#672): a retry is published to the queue's .DQ queue and, when due, published
    # again to the queue itself by whichever worker process held it, and Dramatiq counted it in
    # ``dramatiq_message_retries_total`` both times (once as ``queue.DQ``); it counted a
    # delayed message in ``dramatiq_delayed_messages_inprogress`` as ``queue.DQ`` and took it
    # off as ``queue`` when it started, in the process that happened to run it: the .DQ series
    # only grew, the other went below 0, and the gauge, per process (a ``pid`` label), kept each
    # process's value for good after it stopped. Here a retry counts when it is sent with its
    # delay, a delayed message until the process holding it hands it on (its .DQ delivery is
    # acked or rejected), both on the job's queue, and the gauge is summed over live processes.

    #: The Postgres broker holds no delayed message (it claims only due ones): no ack to look at.
    covered_by_postgres_broker = frozenset({"after_ack"})

    def after_process_boot(self, broker: Any) -> None:
        super().after_process_boot(broker)  # type: ignore[no-untyped-call]
        import prometheus_client as prom
        from dramatiq.middleware import prometheus as dramatiq_prometheus
        from prometheus_client import multiprocess

        # A live gauge's file under this process's pid is a dead process's (this one has written
        # none yet): one killed mid-job whose pid came round again (a container restarted, its
        # processes numbered as before), whose in-progress count this process would otherwise read
        # as its own and carry on from for good; forget_dead_processes cannot tell, the pid is live.
        multiprocess.mark_process_dead(os.getpid(), dramatiq_prometheus.DB_PATH)  # type: ignore[no-untyped-call]

        self.inprogress_delayed_messages = prom.Gauge(
            "dramatiq_delayed_messages_inprogress",
            "The number of delayed messages in memory.",
            ["queue_name", "actor_name"],
            registry=None,
            multiprocess_mode="livesum",
        )
        self._delayed_lock = threading.Lock()
        #: The delayed messages this process holds: message id -> labels.
        self._delayed: dict[str, tuple[str, str]] = {}

    def after_enqueue(self, broker: Any, message: Any, delay: int | None) -> None:
        if delay is not None and "retries" in message.options:
            self.total_retried_messages.labels(q_name(message.queue_name), message.actor_name).inc()

    def before_delay_message(self, broker: Any, message: Any) -> None:
        labels = (q_name(message.queue_name), message.actor_name)
        with self._delayed_lock:
            if message.message_id in self._delayed:
                return  # (delivered again to this process: counted once)
            self._delayed[message.message_id] = labels
        self.inprogress_delayed_messages.labels(*labels).inc()

    def _delayed_handed_on(self, message: Any) -> None:
        if message.queue_name == q_name(message.queue_name):
            return  # a delivery of the queue itself, not of its .DQ
        with self._delayed_lock:
            labels = self._delayed.pop(message.message_id, None)
        if labels is not None:
            self.inprogress_delayed_messages.labels(*labels).dec()

    def after_ack(self, broker: Any, message: Any) -> None:
        self._delayed_handed_on(message)

    def after_nack(self, broker: Any, message: Any) -> None:
        super().after_nack(broker, message)  # type: ignore[no-untyped-call]
        self._delayed_handed_on(message)


def forget_dead_processes(path: str) -> list[int]:
    """Drop the live gauges (``dramatiq_messages_inprogress``) of worker processes that are gone.

    Dramatiq marks a process dead at its clean shutdown only: one killed (SIGKILL, the OOM
    killer) left its in-progress count in the sum for good, and the gauge read 4 with nothing
    running (a helper's review). Its counters stay, as prometheus_client keeps them. The pids
    of this machine's processes (the folder is per deployment, on one machine)."""
    import os
    import re

    from prometheus_client import multiprocess

    dead: set[int] = set()
    for name in os.listdir(path) if os.path.isdir(path) else ():
        found = re.fullmatch(r"gauge_live\w*?_(\d+)\.db", name)
        if found is None:
            continue
        pid = int(found.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.add(pid)  # (one file per live gauge mode)
        except PermissionError:
            pass  # alive, another user's
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
    return sorted(dead)


def serve_worker_metrics() -> int:
    """Dramatiq fork process: serve the workers' multiprocess metrics on ``CONTROLPLANE_METRICS_PORT``."""
    import os
    from http.server import BaseHTTPRequestHandler

    from dramatiq.middleware import prometheus as dramatiq_prometheus

    from tasks.settings import Settings

    settings = Settings.from_env()
    path = dramatiq_prometheus.DB_PATH
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    os.environ["prometheus_multiproc_dir"] = path

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            import prometheus_client as prom
            from prometheus_client import multiprocess

            forget_dead_processes(path)
            registry = prom.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
            output = prom.generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", prom.CONTENT_TYPE_LATEST)
            self.end_headers()
            self.wfile.write(output)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug(format, *args)

    port = settings.metrics_port or dramatiq_prometheus.HTTP_PORT
    httpd = HTTPServer((settings.metrics_host, port), Handler)
    logger.info("serving the workers' Prometheus metrics on %s:%d", settings.metrics_host, port)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


__all__ = ["QUEUE_GAUGES", "QueueStatsCollector", "WorkerMetrics", "serve_queue_metrics", "serve_worker_metrics"]
