"""Prometheus metrics scraped over HTTP: queue gauges from SQL, and Dramatiq's own from a worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families

import tasks
from tasks import db
from tasks.metrics import serve_queue_metrics
from tests import actors
from tests.support import ROOT, claim_in_process, jobs_in, query, running_worker, settle_in_process, wait_for


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at ``url``: {(name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def try_scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    try:
        return scrape(url)
    except (urllib.error.URLError, ConnectionError):
        return None  # not listening yet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def add_job(url: str, queue: str, status: str, scheduled: str = "0 seconds") -> None:
    query(
        url,
        "INSERT INTO control_plane.jobs (id, type, queue, status, scheduled_at) "
        "VALUES (gen_random_uuid(), 'tests.noop', %s, %s, now() + %s::interval)",
        (queue, status, scheduled),
    )


def test_queue_gauges_are_served_from_sql(db_url: str) -> None:
    # Given, in queue "default", two ready jobs (the oldest waiting for 90 s), one
    # scheduled for later and one running; in queue "other", two failed jobs
    add_job(db_url, "default", "pending", "-90 seconds")
    add_job(db_url, "default", "pending", "-5 seconds")
    add_job(db_url, "default", "pending", "1 hour")
    add_job(db_url, "default", "running")
    add_job(db_url, "other", "failed")
    add_job(db_url, "other", "failed")
    # and two workers' heartbeats: one of now, one of a worker killed ten minutes ago
    query(db_url, "INSERT INTO control_plane.worker_heartbeats (id, hostname, pid, heartbeat_at) "
                  "VALUES ('alive', 'h', 1, now()), ('killed', 'h', 2, now() - interval '10 minutes')")
    server, _ = serve_queue_metrics(tasks.connection, 0, "127.0.0.1")
    try:
        # When the endpoint is scraped over HTTP
        samples = scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    # Then depth, lag and failures read from control_plane.queue_stats are there, per queue
    default, other = (("queue", "default"),), (("queue", "other"),)
    assert samples[("controlplane_stats_up", ())] == 1
    assert samples[("controlplane_queue_ready", default)] == 2
    assert samples[("controlplane_queue_scheduled", default)] == 1
    assert samples[("controlplane_queue_running", default)] == 1
    assert samples[("controlplane_queue_failed", default)] == 0
    assert samples[("controlplane_queue_failed", other)] == 2
    assert samples[("controlplane_queue_ready", other)] == 0
    assert samples[("controlplane_queue_completed_last_minute", default)] == 0
    # (the oldest ready job was scheduled 90 s before it was inserted, so it has waited at least that)
    assert samples[("controlplane_queue_oldest_ready_age_seconds", default)] >= 90
    assert samples[("controlplane_queue_oldest_ready_age_seconds", other)] == 0
    # and only the worker that heartbeated within a lease counts as live
    assert samples[("controlplane_workers", ())] == 1


def test_completions_are_not_counted_by_reading_a_large_history_without_the_brin_index(db_url: str) -> None:
    from models import queries

    # Given a job of queue "default" completed a moment ago and one ready in it (so that the
    # queue has a row whether its completions are counted or not), and the Postgres broker's stats
    # query with a bound of no rows on the history it reads without the BRIN index (PostgreSQL
    # before 16 has none: the count would read every row of jobs at every scrape)
    query(db_url, "INSERT INTO control_plane.jobs (id, type, queue, status, completed_at) "
                  "VALUES (gen_random_uuid(), 'tests.noop', 'default', 'completed', now())")  # fmt: skip
    query(db_url, "ANALYZE control_plane.jobs")
    actors.noop.send(1)
    brin = query(db_url, "SELECT 1 FROM pg_indexes WHERE indexname = 'ix_jobs_completed_at_brin'")
    for bound in (0, queries.STATS_COMPLETED_SCAN_MAX_ROWS):
        server, _ = serve_queue_metrics(tasks.connection, 0, "127.0.0.1", queries.queue_stats_via_messages(bound))
        try:
            # When scraped
            samples = scrape(f"http://127.0.0.1:{server.server_port}/metrics")
        finally:
            server.shutdown()
            server.server_close()
        # Then the stats are up; the completion is counted where the index finds it or the
        # history is within the bound, and otherwise left out (no data: not a false 0)
        completed = samples.get(("controlplane_queue_completed_last_minute", (("queue", "default"),)))
        assert samples[("controlplane_stats_up", ())] == 1
        assert samples[("controlplane_queue_ready", (("queue", "default"),))] == 1
        assert completed == (1 if brin or bound else None), (bound, brin)


def test_without_the_postgres_broker_no_worker_count_is_exported(db_url: str) -> None:
    # Given a live heartbeat in the table, and metrics served for another broker (RabbitMQ's
    # workers do not heartbeat here: a 0 would fire the "no workers" alert for good)
    query(db_url, "INSERT INTO control_plane.worker_heartbeats (id, hostname, pid) VALUES ('w', 'h', 1)")
    server, _ = serve_queue_metrics(tasks.connection, 0, "127.0.0.1", workers=False)
    try:
        # When scraped
        samples = scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    # Then the stats are up and there, and no worker gauge is
    assert samples[("controlplane_stats_up", ())] == 1
    assert not any(name == "controlplane_workers" for name, _ in samples)


def test_an_unreachable_database_is_reported_not_raised() -> None:
    # Given a collector whose database does not answer
    pool = db.Pool(lambda: "postgresql://root@127.0.0.1:1/nowhere", 1)
    server, _ = serve_queue_metrics(pool.connection, 0, "127.0.0.1")
    try:
        # When it is scraped
        samples = scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
    # Then the scrape succeeds and says the stats are down
    assert samples == {("controlplane_stats_up", ()): 0}


def test_a_database_that_does_not_answer_is_reported_down_by_each_scrape_with_one_read_waiting(db_url: str) -> None:
    import threading

    from tasks.metrics import QueueStatsCollector

    # Given a collector whose database stopped answering (a frozen server, a host cut off: no
    # timeout of the server's own ends the wait)
    thawed = threading.Event()
    reads: list[int] = []

    def connection() -> Any:
        if not thawed.is_set():
            reads.append(1)
            thawed.wait(60)
            raise psycopg2.OperationalError("could not receive data from server: Connection timed out")
        return tasks.connection()

    collector = QueueStatsCollector(connection, deadline=0.2)

    def up() -> float:
        families = list(collector.collect())
        return float(families[0].samples[0].value) if families[0].name == "controlplane_stats_up" else -1.0

    # When it is scraped three times
    # Then each scrape answers, the stats down, and one read waits on the database, not three
    assert [up(), up(), up()] == [0.0, 0.0, 0.0]
    assert reads == [1]
    # And once the database answers again, the next scrapes read it
    thawed.set()
    wait_for(lambda: up() == 1.0, what="a scrape reading the stats again")


def test_the_in_progress_gauge_of_a_killed_worker_process_is_dropped_at_the_next_scrape(tmp_path: Path) -> None:
    from tasks.metrics import forget_dead_processes

    # Given the multiprocess files of a worker process killed mid-job (it never marked itself
    # dead: its in-progress gauge stayed in the sum), and those of a live one
    count_one = ("from prometheus_client import Counter, Gauge; Gauge('x_inprogress', 'x', "
                 "multiprocess_mode='livesum').inc(); Counter('x_total', 'x').inc()")  # fmt: skip
    subprocess.run([sys.executable, "-c", count_one], env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)},
                   check=True)  # fmt: skip
    killed = sorted(p.name for p in tmp_path.iterdir())
    live = tmp_path / f"gauge_livesum_{os.getpid()}.db"
    live.write_bytes(b"")
    # When the workers' metrics are scraped
    gone = forget_dead_processes(str(tmp_path))
    # Then the killed process's live gauge is gone, its counter kept, and the live one's stays
    assert len(gone) == 1 and f"gauge_livesum_{gone[0]}.db" in killed
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"counter_{gone[0]}.db", live.name])


def test_controlplane_metrics_serves_the_gauges(db_url: str) -> None:
    # Given `controlplane metrics --port 0` (any free port), one ready job and one failed for
    # good, a queue whose only job completed an hour ago, and a paused queue
    query(db_url, "SELECT control_plane.pause_queue('slow')")
    actors.noop.send(1)
    actors.noop.send(2)
    consumer, held = claim_in_process()
    settle_in_process(consumer, held, "nack")
    query(
        db_url,
        "INSERT INTO control_plane.jobs (id, type, queue, status, completed_at) "
        "VALUES (gen_random_uuid(), 'old', 'archive', 'completed', now() - interval '1 hour')",
    )
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "metrics", "--port", "0", "--host", "127.0.0.1"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving queue metrics on http://127.0.0.1:"), (line, proc.stderr)
        # When its endpoint is scraped
        samples = scrape(line.split(" on ", 1)[1].strip())
        # Then the queue gauges are there, read from the message table (the Postgres broker's):
        # the queue with only old history has none (the view would list it with zeros)
        assert samples[("controlplane_queue_ready", (("queue", "default"),))] == 1
        assert samples[("controlplane_queue_failed", (("queue", "default"),))] == 1
        assert samples[("controlplane_queue_paused", (("queue", "slow"),))] == 1
        assert samples[("controlplane_queue_paused", (("queue", "default"),))] == 0
        assert not [key for key in samples if ("queue", "archive") in key[1]], samples
    finally:
        # And SIGTERM stops it cleanly
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_a_worker_serves_dramatiqs_metrics_on_the_configured_port(db_url: str, tmp_path: Path) -> None:
    # Given a worker with CONTROLPLANE_METRICS_PORT set (its own multiprocess folder)
    port = free_port()
    env = {
        "CONTROLPLANE_METRICS_PORT": str(port),
        "CONTROLPLANE_METRICS_HOST": "127.0.0.1",
        "dramatiq_prom_db": str(tmp_path / "prometheus"),
    }
    (tmp_path / "prometheus").mkdir()
    ids = [actors.noop.send(i).message_id for i in range(3)]
    with running_worker(db_url, tmp_path, processes=2, threads=2, extra_env=env):
        wait_for(lambda: jobs_in(db_url, ids, "completed"), what="3 jobs to complete")
        # When its endpoint is scraped
        labels = (("actor_name", "tests.noop"), ("queue_name", "default"))
        samples = wait_for(
            lambda: (
                (s := try_scrape(f"http://127.0.0.1:{port}/metrics"))
                and s.get(("dramatiq_messages_total", labels)) == 3
                and s
            ),
            what="dramatiq_messages_total to count 3 messages",
        )
    # Then Dramatiq's counters, summed over the worker processes, say what ran
    assert samples[("dramatiq_message_duration_milliseconds_count", labels)] == 3
    assert samples[("dramatiq_messages_inprogress", labels)] == 0
    assert ("dramatiq_message_errors_total", labels) not in samples  # no error ever counted


def test_a_scrape_while_the_tables_are_locked_says_the_stats_are_down_instead_of_hanging(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import metrics

    # Given a migration (or an operator) holding control_plane.jobs exclusively
    monkeypatch.setattr(metrics, "SCRAPE_TIMEOUT_MS", 200)
    locker = psycopg2.connect(db_url)
    server, _ = serve_queue_metrics(tasks.connection, 0, "127.0.0.1")
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE control_plane.jobs IN ACCESS EXCLUSIVE MODE")
        # When the endpoint is scraped, Then it answers, saying the stats could not be read
        assert scrape(f"http://127.0.0.1:{server.server_port}/metrics") == {("controlplane_stats_up", ()): 0}
        locker.rollback()
        # and once the lock is gone it reads them again, on the same pool
        assert scrape(f"http://127.0.0.1:{server.server_port}/metrics")[("controlplane_stats_up", ())] == 1
    finally:
        locker.close()
        server.shutdown()
        server.server_close()


def test_a_worker_process_whose_pid_a_killed_one_had_does_not_carry_on_its_in_progress_count(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    # Given the multiprocess files of a worker process killed with 2 jobs in progress (it never
    # marked itself dead), whose pid a new worker process has (a container restarted: its
    # processes numbered as before), which then runs one job
    killed = ("import sys; from prometheus_client import values; "
              "values.ValueClass = values.MultiProcessValue(lambda: int(sys.argv[1])); "
              "from prometheus_client import Gauge; Gauge('dramatiq_messages_inprogress', 'x', ['queue_name', "
              "'actor_name'], multiprocess_mode='livesum').labels('default', 'tests.noop').inc(2)")  # fmt: skip
    booted = (
        "import os, subprocess, sys\n"
        f"subprocess.run([sys.executable, '-c', {killed!r}, str(os.getpid())], check=True)\n"
        "import dramatiq\n"
        "from tasks.metrics import WorkerMetrics\n"
        "middleware = WorkerMetrics()\n"
        "middleware.after_process_boot(None)\n"
        "message = dramatiq.Message(queue_name='default', actor_name='tests.noop', args=(), kwargs={}, options={})\n"
        "middleware.before_process_message(None, message)\n"
        "middleware.after_process_message(None, message, result=None)\n"
    )
    env = {**os.environ, "BROKER_URL": "stub://", "dramatiq_prom_db": str(tmp_path),
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", booted], env=env, cwd=ROOT, check=True, timeout=60)
    # When the workers' metrics are read (the new process is gone too, not marked dead: the
    # folder as a scrape right after its job would see it, but for the pid of the scrape's check)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    in_progress = registry.get_sample_value(
        "dramatiq_messages_inprogress", {"queue_name": "default", "actor_name": "tests.noop"}
    )
    # Then nothing is in progress: the killed process's 2 are not the new one's
    assert in_progress == 0
