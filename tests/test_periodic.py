"""Periodic tasks: the clock enqueues each tick once, however many clocks run; retention runs daily."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dramatiq
import psycopg2
import pytest

import tasks
from tasks import maintenance
from tasks.cron import CronSchedule
from tasks.errors import ConfigurationError
from tasks.periodic import Clock, Schedule, periodic, schedule, schedule_names, schedules, unschedule
from tasks.settings import INTERVAL_WORDS, Settings, retention_problem
from tests import actors
from tests.support import ROOT, query, running_worker, wait_for


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def every(cron: str, name: str, *args: Any) -> Schedule:
    return Schedule(name=name, cron=CronSchedule.parse(cron), actor_name="tests.noop", args=args)


def ticks(url: str, name: str) -> list[dict[str, Any]]:
    return query(
        url,
        "SELECT t.tick_at, t.job_id::text, j.status, j.payload FROM control_plane.schedule_ticks t "
        "LEFT JOIN control_plane.jobs j ON j.id = t.job_id WHERE t.schedule_name = %s ORDER BY t.tick_at",
        (name,),
    )


def noop_jobs(url: str) -> list[dict[str, Any]]:
    return query(url, "SELECT id::text, payload FROM control_plane.jobs WHERE type = 'tests.noop'")


def test_two_clocks_in_threads_enqueue_each_tick_once(db_url: str) -> None:
    # Given a schedule every five minutes and two clocks, each with its own connection
    entry = every("*/5 * * * *", "tests.every5", "five")
    clocks = [Clock(schedules=[entry], url=db_url, broker=tasks.broker) for _ in range(2)]
    won: list[list[Any]] = [[], []]
    start = threading.Barrier(2)

    def run(i: int, now: datetime) -> None:
        start.wait()  # both look at the same moment
        won[i].extend(clocks[i].run_pending(now))

    # When both look at every minute from 10:00 to 10:30 (the injected clock), at the same time
    minute = at("2026-03-02 10:00")
    while minute <= at("2026-03-02 10:30"):
        threads = [threading.Thread(target=run, args=(i, minute + timedelta(seconds=1))) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        minute += timedelta(minutes=1)
    for clock in clocks:
        clock.close()
    # Then each of the seven ticks was enqueued exactly once, as one pending job
    rows = ticks(db_url, "tests.every5")
    assert [r["tick_at"] for r in rows] == [at("2026-03-02 10:00") + timedelta(minutes=5 * i) for i in range(7)]
    assert all(r["status"] == "pending" and r["payload"] == {"args": ["five"], "kwargs": {}} for r in rows)
    assert sorted(r["id"] for r in noop_jobs(db_url)) == sorted(r["job_id"] for r in rows)
    # And the clocks split the ticks between them: what one won, the other did not
    assert len(won[0]) + len(won[1]) == 7
    assert {t.job_id for t in won[0]}.isdisjoint({t.job_id for t in won[1]})


def test_two_clock_processes_enqueue_each_tick_once(db_url: str) -> None:
    # Given two `controlplane clock --once` processes started together, with an every-minute schedule
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "tasks.cli", "clock", "--once", "--json", "--module", "tests.periodic_schedules"]
    procs = [
        subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    # When both have run
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    # Then every tick recorded (one, or two if they straddled a minute) has exactly one job,
    # enqueued by exactly one of the two processes
    won = [t for out, _ in outputs for t in json.loads(out) if t["schedule"] == "tests.every_minute"]
    rows = ticks(db_url, "tests.every_minute")
    assert rows and len(won) == len(rows)
    assert sorted(t["job_id"] for t in won) == sorted(r["job_id"] for r in rows)
    assert sorted(j["id"] for j in noop_jobs(db_url)) == sorted(r["job_id"] for r in rows)


def test_a_clock_that_was_down_runs_the_latest_missed_tick_once(db_url: str) -> None:
    # Given an every-five-minutes schedule whose 10:00 tick ran
    entry = every("*/5 * * * *", "tests.catch_up")
    clock = Clock(schedules=[entry], url=db_url, broker=tasks.broker)
    assert len(clock.run_pending(at("2026-03-02 10:00:02"))) == 1
    # When the clock comes back at 10:17, having missed 10:05, 10:10 and 10:15
    caught_up = clock.run_pending(at("2026-03-02 10:17:30"))
    # Then only the latest missed tick runs, once
    assert [t.tick_at for t in caught_up] == [at("2026-03-02 10:15")]
    assert clock.run_pending(at("2026-03-02 10:18:00")) == []
    # And the next tick runs on time
    assert [t.tick_at for t in clock.run_pending(at("2026-03-02 10:20:00.5"))] == [at("2026-03-02 10:20")]
    clock.close()
    assert len(noop_jobs(db_url)) == 3


def _rounds_until_it_waits(
    monkeypatch: pytest.MonkeyPatch, clock: Clock, times: Iterator[datetime], learned_skew: timedelta | None = None
) -> tuple[list[str], list[float]]:
    """Run ``clock`` with ``times`` as the host's clock until it first waits: its rounds (each doing
    nothing but learn ``learned_skew``, as a look does) and that wait's length in seconds."""
    import tasks.periodic as periodic_module

    monkeypatch.setattr(periodic_module, "utc_now", lambda: next(times))
    stop = threading.Event()
    rounds: list[str] = []
    waits: list[float] = []

    def run_pending() -> list[Any]:
        rounds.append("round")
        if learned_skew is not None:
            clock.skew = learned_skew
        return []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        stop.set()
        return True

    monkeypatch.setattr(clock, "run_pending", run_pending)
    monkeypatch.setattr(stop, "wait", wait)
    clock.run_forever(stop)
    return rounds, waits


def test_a_round_that_runs_into_the_next_minute_looks_again_at_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a clock whose round of 10:25 ends at 10:26:11 (a lock held its inserts 70 s)
    clock = Clock(schedules=[every("* * * * *", "tests.round_late")], url=db_url, broker=tasks.broker)
    times = iter([at("2026-03-02 10:25:00.06"), at("2026-03-02 10:26:11"), at("2026-03-02 10:26:11.5"),
                  at("2026-03-02 10:26:12")])  # fmt: skip
    clock.skew = timedelta(0)
    # When it runs
    with caplog.at_level("WARNING", logger="tasks.periodic"):
        rounds, waits = _rounds_until_it_waits(monkeypatch, clock, times)
    # Then it looks again at once for 10:26's ticks, saying so, before it waits for 10:27
    assert rounds == ["round", "round"]
    assert len(waits) == 1 and 47 < waits[0] < 49
    assert "the round of 10:25 ended at 10:26:11, past its minute: looking again at once" in caplog.text


def test_a_clock_on_a_host_behind_does_not_say_its_first_round_ran_past_its_minute(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a clock on a host 10 minutes behind the database, which its first look learns
    clock = Clock(schedules=[every("* * * * *", "tests.round_late")], url=db_url, broker=tasks.broker)
    times = itertools.chain([at("2026-03-02 10:15:00.06")], itertools.repeat(at("2026-03-02 10:15:01")))
    # When it runs its first round (a second long)
    with caplog.at_level("WARNING", logger="tasks.periodic"):
        rounds, waits = _rounds_until_it_waits(monkeypatch, clock, times, learned_skew=timedelta(minutes=10))
    # Then it waits for the database's next minute, without a word of a round past its minute
    assert rounds == ["round"]
    assert len(waits) == 1 and 58 < waits[0] < 60
    assert "past its minute" not in caplog.text


def test_the_clock_finds_each_schedules_latest_tick_at_the_end_of_its_index_not_in_all_it_keeps(db_url: str) -> None:
    from models import queries

    # Given a day of ticks kept for each of three schedules
    query(db_url, "INSERT INTO control_plane.schedule_ticks (schedule_name, tick_at) SELECT 's' || n, "
                  "timestamptz '2026-03-01' + m * interval '1 minute' FROM generate_series(1, 3) AS n, "
                  "generate_series(0, 1439) AS m")  # fmt: skip
    # When the clock looks for their latest ticks
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute("ANALYZE control_plane.schedule_ticks")
            cur.execute("EXPLAIN " + queries.SCHEDULE_LAST_TICKS, {"names": ["s1", "s2", "s3", "none"]})
            plan = "\n".join(row[0] for row in cur.fetchall())
            cur.execute(queries.SCHEDULE_LAST_TICKS, {"names": ["s1", "s2", "s3", "none"]})
            found = sorted(cur.fetchall())
    finally:
        conn.close()
    # Then each is one probe of the primary key's end (not every tick kept, grouped), and a
    # schedule with no tick has no row
    assert "Index Only Scan Backward" in plan, plan
    assert [(name, tick.isoformat()) for name, tick in found] == [
        (f"s{n}", "2026-03-01T23:59:00+00:00") for n in (1, 2, 3)]  # fmt: skip


def test_a_late_clock_cannot_run_a_tick_that_a_newer_one_superseded(db_url: str) -> None:
    # Given an every-five-minutes schedule, and a clock running late that found the 10:00 tick due
    entry = every("*/5 * * * *", "tests.superseded")
    late = Clock(schedules=[entry], url=db_url, broker=tasks.broker)
    fast = Clock(schedules=[entry], url=db_url, broker=tasks.broker)
    assert late.due(at("2026-03-02 10:00:30")) == [(entry, at("2026-03-02 10:00"))]
    # When a clock on time runs 10:05 before the late one gets to enqueue 10:00
    assert [t.tick_at for t in fast.run_pending(at("2026-03-02 10:05:01"))] == [at("2026-03-02 10:05")]
    superseded = late._enqueue_tick(entry, at("2026-03-02 10:00"))
    late.close()
    fast.close()
    # Then the late clock's tick is not recorded nor sent: the schedule's last tick stays 10:05
    assert superseded is None
    assert [r["tick_at"] for r in ticks(db_url, "tests.superseded")] == [at("2026-03-02 10:05")]
    assert len(noop_jobs(db_url)) == 1


def test_clock_list_shows_ticks_in_utc_whatever_the_sessions_time_zone(db_url: str) -> None:
    # Given a tick recorded, and a session whose time zone is Tokyo's (PGTZ, or the server's TimeZone)
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "tasks.cli", "clock", "--module", "tests.periodic_schedules"]
    done = subprocess.run([*base, "--once"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (row,) = ticks(db_url, "tests.every_minute")[-1:]
    # When the schedules are listed
    listed = subprocess.run([*base, "--list"], env={**env, "PGTZ": "Asia/Tokyo"}, cwd=ROOT, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    # Then the last tick shows as the UTC time it is, labelled UTC
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith("tests.every_minute"))
    assert row["tick_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") in line


def test_a_clock_refuses_at_start_a_retention_the_server_does_not_read(db_url: str) -> None:
    # Given a retention that passes the check without a server but not PostgreSQL's ("7,5 days")
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT), "CONTROLPLANE_RETENTION_FAILED": "7,5 days"}
    assert Settings.from_env(env).retention_failed == "7,5 days"
    base = [sys.executable, "-m", "tasks.cli", "clock", "--module", "tests.periodic_schedules"]
    # When a clock starts with it
    done = subprocess.run([*base, "--once"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    # Then it stops at once, naming the setting and the value, and sends no tick (the daily prune
    # would have failed at 03:00, every day)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "CONTROLPLANE_RETENTION_FAILED must be a PostgreSQL interval" in done.stderr
    assert "'7,5 days' is not a PostgreSQL interval" in done.stderr
    assert ticks(db_url, "tests.every_minute") == []
    # And with the prune off (CONTROLPLANE_PRUNE_SCHEDULE=off) the retention is not the clock's business
    done = subprocess.run([*base, "--once"], env={**env, "CONTROLPLANE_PRUNE_SCHEDULE": "off"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(ticks(db_url, "tests.every_minute")) == 1


def test_a_clock_started_before_its_database_is_up_waits_for_it(tmp_path: Path) -> None:
    # Given no server where the clock's DATABASE_URL points (a clock started before PostgreSQL)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # (free: nothing listens once it is closed)
    env = {**os.environ, "DATABASE_URL": f"postgresql://root@127.0.0.1:{port}/postgres", "PYTHONPATH": str(ROOT)}
    log = tmp_path / "clock.log"
    with open(log, "w") as out:
        clock = subprocess.Popen([sys.executable, "-m", "tasks.cli", "clock"], env=env, cwd=ROOT, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        # When it starts, Then it says it could not check the retentions, and keeps trying to
        # read its ticks, running, as the workers wait for their database (it used to exit 1)
        wait_for(lambda: "trying again" in log.read_text() or clock.poll() is not None, what="the clock's first look")
        assert clock.poll() is None, log.read_text()
        assert "the retentions are not checked against the server" in log.read_text()
    finally:
        clock.terminate()
        clock.wait(30)


def test_a_clock_at_log_level_warning_enqueues_its_ticks_without_a_line_for_each(db_url: str, tmp_path: Path) -> None:
    # Given a clock run at WARNING (INFO, the default, logs each tick it wins: 215 MB a day for
    # 1,000 every-minute schedules)
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "clock.log"
    schedules = "tests.periodic_schedules"
    command = [sys.executable, "-m", "tasks.cli", "clock", "--log-level", "warning", "--module", schedules]
    with open(log, "w") as out:
        clock = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # fmt: skip
    try:
        # When it has enqueued its first tick
        wait_for(lambda: noop_jobs(db_url) or clock.poll() is not None, what="the clock's first tick")
        assert clock.poll() is None, log.read_text()
    finally:
        clock.terminate()
        assert clock.wait(30) == 0
    # Then the tick is recorded and its job sent, the start line names the schedules, and no line
    # was logged for the tick
    assert len(ticks(db_url, "tests.every_minute")) == 1
    text = log.read_text()
    assert "tests.every_minute" in text.splitlines()[0], text
    assert "enqueued as job" not in text and "clock started" not in text, text
    # And a level it does not know is refused, naming the ones it does
    bad = subprocess.run([sys.executable, "-m", "tasks.cli", "clock", "--log-level", "loud"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "invalid choice: 'LOUD'" in bad.stderr and "'WARNING'" in bad.stderr, bad.stderr


def test_a_clock_names_its_first_twenty_schedules_at_start_and_counts_the_rest() -> None:
    many = [every("* * * * *", f"tests.s{i:04}") for i in range(1000)]
    line = schedule_names(many)
    assert line.startswith("tests.s0000, tests.s0001, ") and "tests.s0019 and 980 more" in line
    assert "tests.s0020" not in line
    assert schedule_names(many[:20]).endswith("tests.s0018, tests.s0019")
    assert schedule_names([]) == "none"


def test_the_clock_goes_by_the_databases_time_not_its_hosts(
    db_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a clock on a host whose clock runs three hours ahead of the database's
    real = datetime.now(UTC)
    monkeypatch.setattr("tasks.periodic.utc_now", lambda: datetime.now(UTC) + timedelta(hours=3))
    clock = Clock(schedules=[every("* * * * *", "tests.skewed")], url=db_url, broker=tasks.broker)
    # When it looks
    with caplog.at_level("WARNING", logger="tasks.periodic"):
        (tick,) = clock.run_pending()
    clock.close()
    # Then it ran the database's current minute, not one three hours ahead, and said its host is off
    assert abs(tick.tick_at - real.replace(second=0, microsecond=0)) <= timedelta(minutes=1)
    assert clock.skew < -timedelta(hours=2)
    assert "s ahead of the database's" in caplog.text


def test_a_tick_ahead_of_the_databases_time_is_refused_and_blocks_nothing(db_url: str) -> None:
    # Given a clock told it is three hours later than the database says (as an older release's
    # clock on a fast host was), and a clock that is not
    minutely = every("* * * * *", "tests.minutely")
    now = datetime.now(UTC)
    fast = Clock(schedules=[minutely], url=db_url, broker=tasks.broker, now=lambda: now + timedelta(hours=3))
    right = Clock(schedules=[minutely], url=db_url, broker=tasks.broker, now=lambda: now)
    # When both look, the fast one first
    early = fast.run_pending()
    on_time = right.run_pending()
    fast.close()
    right.close()
    # Then the fast one's tick was not recorded nor sent, and the right one's ran
    assert early == []
    assert [t.tick_at for t in on_time] == [now.replace(second=0, microsecond=0)]
    assert [r["tick_at"] for r in ticks(db_url, "tests.minutely")] == [t.tick_at for t in on_time]
    assert len(noop_jobs(db_url)) == 1


def test_a_naive_time_is_utc_to_the_clock_as_to_cron(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a process whose local time zone is not UTC, and a new every-minute schedule
    monkeypatch.setenv("TZ", "America/New_York")
    import time

    time.tzset()
    try:
        clock = Clock(schedules=[every("* * * * *", "tests.naive")], url=db_url, broker=tasks.broker)
        # When it looks at a naive 10:00:30
        won = clock.run_pending(datetime(2026, 3, 2, 10, 0, 30))
        clock.close()
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    # Then the 10:00 UTC tick ran (not skipped as five hours past)
    assert [t.tick_at for t in won] == [at("2026-03-02 10:00")]


def test_a_schedule_whose_options_or_queue_no_worker_could_use_is_refused_when_declared() -> None:
    from tasks.errors import InvalidOption

    # When a schedule gives a message option a worker could not use, or a queue no worker reads,
    # Then it is refused at once, naming it, not at every tick's send
    with pytest.raises(InvalidOption, match="the min_backoff option"):
        schedule("* * * * *", actors.noop, name="tests.bad-options", min_backoff="1000")
    with pytest.raises(InvalidOption, match="the queue name 'bad queue' is not one"):
        schedule("* * * * *", "elsewhere.job", name="tests.bad-queue", queue_name="bad queue")
    assert not {"tests.bad-options", "tests.bad-queue"} & {s.name for s in schedules()}


def test_two_different_schedules_under_one_name_are_refused() -> None:
    try:
        # Given a schedule of an actor under its default name
        schedule("0 3 * * *", "tests.report", args=("daily",))
        # When the same definition is declared again (a module imported twice), nothing happens
        schedule("0 3 * * *", "tests.report", args=("daily",))
        # But a second schedule of the actor without a name of its own is refused, naming the way out
        with pytest.raises(ValueError, match=r"already named 'tests.report'.*name="):
            schedule("0 4 * * 1", "tests.report", args=("weekly",))
        # And with a name it is a second schedule
        schedule("0 4 * * 1", "tests.report", args=("weekly",), name="tests.report.weekly")
        assert {"tests.report", "tests.report.weekly"} <= {s.name for s in schedules()}
        # And an expression that never fires is refused at once
        from tasks.cron import CronError

        with pytest.raises(CronError, match="never fires"):
            schedule("0 0 31 2 *", "tests.report", name="tests.report.never")
        # And an option no message has (a time zone, a misspelt option) is refused, not ignored
        with pytest.raises(ValueError, match=r"unknown option\(s\) max_attempt, timezone; cron is in UTC"):
            schedule("0 9 * * *", "tests.report", name="tests.report.never", timezone="Europe/Paris", max_attempt=5)
        schedule("0 9 * * *", "tests.report", name="tests.report.never", max_attempts=5, unique_key="r", priority=1)
    finally:
        for name in ("tests.report", "tests.report.weekly", "tests.report.never"):
            unschedule(name)


def test_a_new_schedule_starts_at_its_next_tick_not_a_past_one(db_url: str) -> None:
    # Given a daily 03:00 schedule first seen by a clock at 10:00
    clock = Clock(schedules=[every("0 3 * * *", "tests.daily")], url=db_url, broker=tasks.broker)
    # When the clock looks at 10:00, then the next day at 03:00
    first = clock.run_pending(at("2026-03-02 10:00:00"))
    second = clock.run_pending(at("2026-03-03 03:00:01"))
    clock.close()
    # Then the tick long past did not run; the next day's did
    assert first == []
    assert [t.tick_at for t in second] == [at("2026-03-03 03:00")]


def test_a_tick_whose_message_cannot_be_sent_is_not_recorded(db_url: str) -> None:
    # Given one schedule whose arguments JSON cannot encode, and a good one
    bad = every("* * * * *", "tests.bad", object())
    good = every("* * * * *", "tests.good")
    clock = Clock(schedules=[bad, good], url=db_url, broker=tasks.broker)
    # When the clock looks
    won = clock.run_pending(at("2026-03-02 10:00:00"))
    clock.close()
    # Then the good tick ran, and the bad one left no tick row (its transaction rolled back)
    assert [t.schedule_name for t in won] == ["tests.good"]
    assert ticks(db_url, "tests.bad") == []
    assert len(ticks(db_url, "tests.good")) == 1


def test_a_tick_of_a_unique_job_records_the_live_job(db_url: str) -> None:
    # Given a schedule with a unique key, and a live job already holding that key
    holder = actors.noop.send_with_options(args=("held",), unique_key="tests.unique_tick")
    entry = dataclasses.replace(every("* * * * *", "tests.unique"), options={"unique_key": "tests.unique_tick"})
    clock = Clock(schedules=[entry], url=db_url, broker=tasks.broker)
    # When a tick comes
    won = clock.run_pending(at("2026-03-02 10:00:00"))
    clock.close()
    # Then no second job exists, and the tick points at the live one
    assert [t.job_id for t in won] == [holder.message_id]
    assert [r["job_id"] for r in ticks(db_url, "tests.unique")] == [holder.message_id]
    assert len(noop_jobs(db_url)) == 1


def test_periodic_decorates_actors_and_refuses_plain_functions() -> None:
    # Given an actor decorated with @periodic
    @periodic("*/10 * * * *", args=(1,), name="tests.decorated", priority=5)
    @dramatiq.actor(actor_name="tests.decorated_actor", queue_name="default")
    def decorated(n: int) -> None: ...

    try:
        # Then its schedule is declared with the actor, its queue, arguments and options
        (found,) = [s for s in schedules() if s.name == "tests.decorated"]
        assert (found.actor_name, found.queue_name, found.args, found.options) == (
            "tests.decorated_actor",
            "default",
            (1,),
            {"priority": 5},
        )
        assert found.cron.minutes == frozenset(range(0, 60, 10))
    finally:
        unschedule("tests.decorated")
        tasks.broker.actors.pop("tests.decorated_actor", None)
    # And @periodic below @dramatiq.actor (on a plain function) is refused with a clear error
    with pytest.raises(TypeError, match=r"above @dramatiq\.actor"):
        periodic("* * * * *")(lambda: None)  # type: ignore[type-var]
    # And a bad cron expression is refused when declared
    with pytest.raises(ValueError, match="minute: 61 is out of range"):
        schedule("61 * * * *", "tests.noop")


def test_a_retention_with_a_word_postgresql_does_not_know_is_refused_at_start_and_every_unit_it_knows_is_taken(
    server_url: str,
) -> None:
    # Given PostgreSQL's own reading of a retention with each interval word this release knows, and
    # of words it does not
    def postgres_reads(value: str) -> bool:
        try:
            query(server_url, "SELECT %s::interval", (value,))
        except psycopg2.DataError:
            return False
        return True

    for word in sorted(INTERVAL_WORDS):
        # Then every such word PostgreSQL takes, and so does the setting
        assert postgres_reads(f"2 {word}"), word
        assert retention_problem(f"2 {word}") is None, word
    # and so are PostgreSQL's other spellings: SQL-standard, ISO 8601, mixed case, signs
    for value in ("3 Microseconds 1 DAY", "1 usecond", "1 msecond", "1-2", "1-2 3 4:05:06", "P0001-02-03",
                  "P0001-02-03T04:05:06", "PT1.5H", "P1W", "@ 1 minute", "+7 days", "1.5 days"):  # fmt: skip
        assert postgres_reads(value) and retention_problem(value) is None, value
    for value in ("banana 3", "7 dyas", "1 fortnight", "2 days and 3 hours", "p7d", "7 день"):
        # And a word it refuses is refused at start-up, naming the word, instead of at the first prune
        assert not postgres_reads(value), value
        with pytest.raises(ConfigurationError, match=r"RETENTION_FAILED .* is not a unit PostgreSQL knows"):
            Settings.from_env({"CONTROLPLANE_RETENTION_FAILED": value})


def test_the_new_settings_are_validated() -> None:
    # Given the defaults
    defaults = Settings.from_env({})
    # Then the Postgres broker, 7 and 30 days of retention, a daily prune at 03:00 and no metrics port
    assert (defaults.broker_url, defaults.retention_completed, defaults.retention_failed) == (None, "7 days", "30 days")
    assert (defaults.prune_schedule, defaults.metrics_port) == ("0 3 * * *", None)
    # And values are read, "off" disables the prune
    custom = Settings.from_env(
        {
            "BROKER_URL": "amqp://guest:guest@127.0.0.1:5672/%2F",
            "CONTROLPLANE_PRUNE_SCHEDULE": "off",
            "CONTROLPLANE_METRICS_PORT": "9191",
            "CONTROLPLANE_RETENTION_FAILED": "90 days",
        }
    )
    assert (custom.broker_url, custom.prune_schedule, custom.metrics_port) == (
        "amqp://guest:guest@127.0.0.1:5672/%2F",
        None,
        9191,
    )
    assert custom.retention_failed == "90 days"
    # and PostgreSQL's other interval forms are taken as they are
    for value in ("1 day 12:00:00", "36:00:00", "P7D", "@ 7 days"):
        assert Settings.from_env({"CONTROLPLANE_RETENTION_COMPLETED": value}).retention_completed == value
    # And a bad value is refused, naming the setting
    for name, value, fragment in [
        ("BROKER_URL", "redis://localhost", "BROKER_URL must be an amqp:// URL"),
        ("CONTROLPLANE_PRUNE_SCHEDULE", "0 25 * * *", "CONTROLPLANE_PRUNE_SCHEDULE: hour: 25 is out of range"),
        ("CONTROLPLANE_PRUNE_SCHEDULE", "0 0 31 2 *", "CONTROLPLANE_PRUNE_SCHEDULE: '0 0 31 2 \\*' never fires"),
        ("CONTROLPLANE_METRICS_PORT", "70000", "CONTROLPLANE_METRICS_PORT must be a TCP port"),
        ("CONTROLPLANE_RETENTION_COMPLETED", "forever", "CONTROLPLANE_RETENTION_COMPLETED must be a PostgreSQL"),
        # what PostgreSQL would take as 30 seconds, or as a negative period: every finished job pruned
        ("CONTROLPLANE_RETENTION_FAILED", "30", "'30' has no unit .*seconds.*'30 days'"),
        ("CONTROLPLANE_RETENTION_COMPLETED", "7 days ago", "is negative"),
        ("CONTROLPLANE_RETENTION_COMPLETED", "-7 days", "is negative"),
        ("CONTROLPLANE_RETENTION_COMPLETED", "0 days", "'0 days' is zero"),
        ("CONTROLPLANE_LEASE_SECONDS", "nan", "CONTROLPLANE_LEASE_SECONDS must be a positive number of seconds"),
        ("SERVICE_TIMEOUT_SECONDS", "inf", "SERVICE_TIMEOUT_SECONDS must be a positive number of seconds"),
        # past what PostgreSQL's timestamps and ints hold: every claim, result store or burst failed,
        # and a poll interval of years never looked at delayed jobs
        ("CONTROLPLANE_LEASE_SECONDS", "1e300", "CONTROLPLANE_LEASE_SECONDS must be .* up to 86400"),
        ("CONTROLPLANE_POLL_INTERVAL", "1e300", "CONTROLPLANE_POLL_INTERVAL must be .* up to 86400"),
        ("CONTROLPLANE_RESULT_TTL_MS", "99999999999999999999", "CONTROLPLANE_RESULT_TTL_MS must be at most"),
        ("CONTROLPLANE_BURST_PREFETCH", "100000000000000000000", "CONTROLPLANE_BURST_PREFETCH must be at most 1000"),
        ("CONTROLPLANE_MAX_ATTEMPTS", "2000000000", "CONTROLPLANE_MAX_ATTEMPTS must be at most 1000000000"),
        ("PROVISION_STATEMENT_TIMEOUT_MS", "3000000000", "PROVISION_STATEMENT_TIMEOUT_MS must be at most 2147483647"),
    ]:
        with pytest.raises(ConfigurationError, match=fragment):
            Settings.from_env({name: value})


class _EnvironmentLosingAName(Mapping[str, str]):
    """An environment from which another thread deletes a name after it was listed."""

    def __init__(self, values: dict[str, str], lost: str) -> None:
        self.values, self.lost = values, lost

    def __iter__(self) -> Iterator[str]:
        return iter([*self.values, self.lost])

    def __len__(self) -> int:
        return len(self.values) + 1

    def __getitem__(self, name: str) -> str:
        return self.values[name]


def test_the_settings_are_read_while_another_thread_deletes_a_variable() -> None:
    # Given an environment that lists a variable deleted before it is read, as os.environ
    # does when another thread deletes one while it is copied
    environ = _EnvironmentLosingAName({"CONTROLPLANE_POOL_SIZE": "7"}, lost="SOME_OTHER_VARIABLE")
    with pytest.raises(KeyError):
        dict(environ)
    # When the settings are read from it / Then they are, from what is left
    assert Settings.from_env(environ).pool_size == 7


# -- retention ------------------------------------------------------------------------


def insert_finished(url: str, label: str, status: str, age: str) -> None:
    query(
        url,
        "INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at) "
        "VALUES (gen_random_uuid(), %s, 'default', %s, now() - %s::interval - interval '1 minute', "
        "now() - %s::interval)",
        (label, status, age, age),
    )


def test_prune_is_a_daily_periodic_task() -> None:
    # Given the built-in maintenance module (loaded by every clock)
    # Then controlplane.prune runs every day at 03:00 UTC on the controlplane queue
    (found,) = [s for s in schedules() if s.name == "controlplane.prune"]
    assert (found.cron.expression, found.actor_name, found.queue_name) == (
        "0 3 * * *",
        "controlplane.prune",
        "controlplane",
    )


def test_prune_applies_the_retention_settings(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given retention of 2 days for completed jobs and 5 for failed ones
    monkeypatch.setattr(
        tasks, "settings", dataclasses.replace(tasks.settings, retention_completed="2 days", retention_failed="5 days")
    )
    for label, status, age in [
        ("completed 3 days ago", "completed", "3 days"),
        ("completed 1 day ago", "completed", "1 day"),
        ("failed 3 days ago", "failed", "3 days"),
        ("failed 6 days ago", "failed", "6 days"),
    ]:
        insert_finished(db_url, label, status, age)
    # And old schedule ticks, the latest of which must stay, and expired rate-limit counters
    query(
        db_url,
        "INSERT INTO control_plane.schedule_ticks (schedule_name, tick_at) VALUES "
        "('s', now() - interval '9 days'), ('s', now() - interval '8 days')",
    )
    query(db_url, "INSERT INTO control_plane.rate_limits VALUES ('gone', 1, now() - interval '1 second')")
    # When the prune actor runs
    counts = maintenance.prune()
    # Then what the settings call old is gone, and nothing else
    assert counts == {"jobs_and_results": 2, "jobs": 2, "results": 0, "schedule_ticks": 1, "rate_limits": 1}
    kept = {r["type"] for r in query(db_url, "SELECT type FROM control_plane.jobs")}
    assert kept == {"completed 1 day ago", "failed 3 days ago"}
    assert len(query(db_url, "SELECT 1 FROM control_plane.schedule_ticks")) == 1


def _transactions_deleting_from(db_url: str, table: str) -> Callable[[], int]:
    """Have each ``DELETE`` statement on ``table`` note its transaction; returns how many distinct
    transactions have deleted from it so far."""
    query(db_url, f"""
        CREATE TABLE deleting_transactions (xid xid8);
        CREATE FUNCTION note_deleting_transaction() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN INSERT INTO deleting_transactions VALUES (pg_current_xact_id()); RETURN NULL; END $$;
        CREATE TRIGGER note AFTER DELETE ON {table}
            FOR EACH STATEMENT EXECUTE FUNCTION note_deleting_transaction()""")  # noqa: S608 (a test's own table name)
    return lambda: int(query(db_url, "SELECT count(DISTINCT xid) AS n FROM deleting_transactions")[0]["n"])


def test_a_large_history_is_pruned_in_batches_each_its_own_transaction(db_url: str) -> None:
    from models import queries

    batch = queries.PRUNE_BATCH
    # Given more old completed jobs than two batches, half of them created in one transaction (one
    # created_at for all, more than a batch), two at -infinity, failed ones a retention keeps among them, jobs
    # finished a day ago, and more expired results than a batch beside a live one
    query(db_url, """
        INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at)
        SELECT gen_random_uuid(), 'old', 'default', 'completed',
               CASE WHEN i %% 2 = 0 THEN timestamptz '2020-01-01'
                    WHEN i < 4 THEN timestamptz '-infinity'
                    ELSE now() - interval '9 days' - i * interval '1 ms' END,
               now() - interval '8 days'
        FROM generate_series(1, %s) AS i""", (2 * batch + 500,))  # fmt: skip
    query(db_url, """
        INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at)
        SELECT gen_random_uuid(), kind, 'default', status, now() - interval '9 days', completed
        FROM (VALUES ('failed 8 days ago', 'failed', now() - interval '8 days'),
                     ('completed a day ago', 'completed', now() - interval '1 day')) AS k (kind, status, completed),
             generate_series(1, 300)""")  # fmt: skip
    query(db_url, "INSERT INTO control_plane.results (key, value, expires_at) SELECT 'r' || i, 'x'::bytea, now() - "
                  "interval '1 second' FROM generate_series(1, %s) AS i UNION ALL SELECT 'live', 'x'::bytea, now() + "
                  "interval '1 hour'", (batch + 7,))  # fmt: skip
    # (each DELETE statement on the history notes its transaction)
    transactions = _transactions_deleting_from(db_url, "control_plane.jobs")
    # When the daily prune runs with the default retentions (7 days, failed 30)
    counts = maintenance.prune()
    # Then every old completed job and expired result went, and nothing else
    assert (counts["jobs"], counts["results"]) == (2 * batch + 500, batch + 7)
    kept = query(db_url, "SELECT type, count(*) AS n FROM control_plane.jobs GROUP BY type ORDER BY type")
    assert [(r["type"], r["n"]) for r in kept] == [("completed a day ago", 300), ("failed 8 days ago", 300)]
    assert [r["key"] for r in query(db_url, "SELECT key FROM control_plane.results")] == ["live"]
    # And in batches, each committed on its own: no snapshot held for the whole prune
    assert transactions() >= 3
    # And a second run finds nothing
    assert maintenance.prune()["jobs_and_results"] == 0
    # And given a cursor whose batches would make one transaction, prune_rows refuses it
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur, pytest.raises(ValueError, match="autocommit"):
            maintenance.prune_rows(cur, "7 days", "30 days")
    finally:
        conn.close()


def test_a_prune_batch_the_server_rolls_back_to_break_a_deadlock_is_run_again(db_url: str) -> None:
    from models import queries

    # Given old completed jobs, and a prune whose first jobs batch the server rolls back to
    # break a deadlock (finished jobs re-sent under their ids at the same moment: a review's
    # prune died of it 8 times in 8, "controlplane: error: the database refused: deadlock detected")
    query(db_url, """
        INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at)
        SELECT gen_random_uuid(), 'old', 'default', 'completed', now() - interval '9 days', now() - interval '8 days'
        FROM generate_series(1, 10)""")  # fmt: skip

    class DeadlockOnce:
        def __init__(self, cur: Any) -> None:
            self._cur, self.refused = cur, 0

        def execute(self, sql: str, params: Any = None) -> None:
            if sql is queries.PRUNE_JOBS_BATCH and not self.refused:
                self.refused += 1
                raise psycopg2.errors.DeadlockDetected("deadlock detected")
            self._cur.execute(sql, params)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._cur, name)

    # When it runs
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            refusing = DeadlockOnce(cur)
            counts = maintenance.prune_rows(refusing, "7 days", "30 days")
    finally:
        conn.close()
    # Then the batch was run again and the prune finished
    assert refusing.refused == 1 and counts["jobs"] == 10
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs")[0]["n"] == 0


def test_schedule_ticks_are_pruned_one_schedule_per_transaction_each_keeping_its_latest(db_url: str) -> None:
    # Given ten days of ticks of two every-minute schedules, and one schedule whose only ticks are old
    query(db_url, """
        INSERT INTO control_plane.schedule_ticks (schedule_name, tick_at)
        SELECT name, now() - m * interval '1 minute'
        FROM (VALUES ('a'), ('b')) AS s (name), generate_series(1, 14400) AS m
        UNION ALL SELECT 'old', now() - interval '30 days' - m * interval '1 day' FROM generate_series(0, 2) AS m""")
    transactions = _transactions_deleting_from(db_url, "control_plane.schedule_ticks")
    # When the daily prune runs (ticks are kept as long as completed jobs: 7 days)
    counts = maintenance.prune()
    # Then what is past 7 days went, each schedule's latest tick kept (the clock reads it), in a
    # transaction per schedule: no snapshot held for the whole table
    kept = query(db_url, "SELECT schedule_name AS name, count(*) AS n, max(tick_at) < now() - interval '7 days' AS "
                         "old FROM control_plane.schedule_ticks GROUP BY 1 ORDER BY 1")  # fmt: skip
    assert [(r["name"], r["old"]) for r in kept] == [("a", False), ("b", False), ("old", True)]
    assert [r["n"] for r in kept][2] == 1 and all(7 * 1440 - 2 <= r["n"] <= 7 * 1440 for r in kept[:2]), kept
    assert counts["schedule_ticks"] == 2 * 14400 + 3 - sum(r["n"] for r in kept)
    assert transactions() >= 3


def test_the_prune_goes_on_past_a_full_batch_of_jobs_it_keeps_and_prunes_cancelled_jobs(db_url: str) -> None:
    from models import queries

    batch = queries.PRUNE_BATCH
    # Given, oldest first: more failed jobs than a batch, sent in one transaction (one created_at)
    # and kept by the failed retention; then a cancelled job and 200 completed ones, finished long ago
    query(db_url, """
        INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at)
        SELECT gen_random_uuid(), 'kept', 'default', 'failed', now() - interval '20 days', now() - interval '8 days'
        FROM generate_series(1, %s)""", (batch + 1,))  # fmt: skip
    query(db_url, """
        INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at)
        VALUES (gen_random_uuid(), 'cancelled', 'default', 'cancelled', now() - interval '19 days',
                now() - interval '10 days')""")  # fmt: skip
    query(db_url, """
        INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at)
        SELECT gen_random_uuid(), 'old', 'default', 'completed', now() - interval '18 days' + i * interval '1 ms',
               now() - interval '10 days'
        FROM generate_series(1, 200) AS i""")  # fmt: skip
    # When the daily prune runs (in a thread: one that read the kept group again at each batch would never end)
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(maintenance.prune()), daemon=True)
    thread.start()
    wait_for(lambda: not thread.is_alive(), timeout=60, what="the prune to end")
    # Then every job past its retention went, the cancelled one too, though the first batch deleted nothing
    assert out["jobs"] == 201
    kept = query(db_url, "SELECT type, count(*) AS n FROM control_plane.jobs GROUP BY type")
    assert [(r["type"], r["n"]) for r in kept] == [("kept", batch + 1)]


def test_the_clock_sends_prune_and_a_worker_runs_it(db_url: str, tmp_path: Path) -> None:
    # Given a completed job 8 days old and one a day old (default retention: 7 days)
    insert_finished(db_url, "old", "completed", "8 days")
    insert_finished(db_url, "recent", "completed", "1 day")
    (prune_schedule,) = [s for s in schedules() if s.name == "controlplane.prune"]
    clock = Clock(schedules=[prune_schedule], url=db_url, broker=tasks.broker)
    with running_worker(db_url, tmp_path, module="tasks.maintenance"):
        # When the clock reaches 03:00 UTC
        (tick,) = clock.run_pending(at("2026-03-03 03:00:00.2"))
        clock.close()
        # Then a worker of the controlplane queue runs the prune job
        wait_for(
            lambda: (
                query(db_url, "SELECT status FROM control_plane.jobs WHERE id = %s", (tick.job_id,))[0]["status"]
                == "completed"
            ),
            what="the prune job to complete",
        )
    # And the old job is gone, the recent one kept
    assert {r["type"] for r in query(db_url, "SELECT type FROM control_plane.jobs")} == {"recent", "controlplane.prune"}
    result = query(db_url, "SELECT result FROM control_plane.jobs WHERE id = %s", (tick.job_id,))[0]["result"]
    assert result["jobs_and_results"] == 1

def test_a_clock_frozen_inside_its_claim_does_not_stop_every_other_clock(db_url: str, tmp_path: Path) -> None:
    # Given a clock that claimed schedule tests.pair_a's tick in its transaction and then froze
    # before its COMMIT (`docker pause`, a VM stall, a network cut: the server keeps its session,
    # and the row lock, until TCP keepalive gives up, over two hours by default). Its claims of
    # this minute and the next two, so that the other clock's look finds one of them held.
    frozen = psycopg2.connect(db_url)
    with frozen.cursor() as cur:
        cur.execute(
            "INSERT INTO control_plane.schedule_ticks (schedule_name, tick_at, job_id) "
            "SELECT 'tests.pair_a', date_trunc('minute', statement_timestamp()) + m * interval '1 minute', %s "
            "FROM generate_series(0, 2) AS m",
            (str(uuid.uuid4()),),
        )
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)}
    log = tmp_path / "clock.log"
    try:
        # When another clock process looks (`controlplane clock --once`, as a second replica's round)
        with open(log, "w") as out:
            clock = subprocess.Popen(
                [sys.executable, "-m", "tasks.cli", "clock", "--once", "--module", "tests.clock_pair_schedules"],
                env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            # Then it still enqueues the other schedule's tick, and its round ends
            wait_for(
                lambda: query(db_url, "SELECT 1 FROM control_plane.schedule_ticks WHERE schedule_name = 'tests.pair_b'")
                or clock.poll() is not None,
                what="the other schedule's tick",
            )
            assert query(db_url, "SELECT 1 FROM control_plane.schedule_ticks WHERE schedule_name = 'tests.pair_b'"), (
                log.read_text()
            )
            assert clock.wait(60) == 0, log.read_text()
        finally:
            if clock.poll() is None:
                clock.kill()
                clock.wait()
    finally:
        frozen.rollback()
        frozen.close()


@pytest.mark.parametrize("ran_here", [False, True])
def test_a_schedule_whose_arguments_its_actor_cannot_take_is_refused_when_declared(
    ran_here: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an actor taking one optional argument (tests.noop(value=None)); and, in a process
    # that ran one of its jobs, its function wrapped by the cancellation middleware (which a
    # check of "another decorator's" wrapper skipped: this test failed after others in its process)
    if ran_here:
        from tasks.middleware.cancellation import Cancellation
        from tasks.middleware.option_checks import INTERRUPTIBLE

        (middleware,) = [m for m in tasks.broker.middleware if isinstance(m, Cancellation)]
        # (wrapped once, as the middleware does: it may have been already, by a job an earlier
        # test of this process ran; wrapped twice, the check cannot see through the outer one)
        if not getattr(actors.noop.fn, INTERRUPTIBLE, False):
            monkeypatch.setattr(actors.noop, "fn", middleware._interruptible(actors.noop.fn))
    # When a schedule of it is declared with arguments it cannot take (the actor's signature
    # changed, the schedule's did not), as `controlplane send` refuses them
    # Then it is refused at import, naming the schedule, rather than every tick's job failing with
    # TypeError 20 times, days of backoff apart
    try:
        with pytest.raises(TypeError, match=r"schedule 'tests.pair_bad_args'.*cannot be called"):
            schedule("* * * * *", actors.noop, args=(1, 2), name="tests.pair_bad_args")
        with pytest.raises(TypeError, match=r"schedule 'tests.pair_bad_kwargs'.*cannot be called"):
            schedule("* * * * *", actors.noop, kwargs={"amount": 1}, name="tests.pair_bad_kwargs")
        assert not {"tests.pair_bad_args", "tests.pair_bad_kwargs"} & {s.name for s in schedules()}
        # And arguments it can take are accepted
        schedule("* * * * *", actors.noop, kwargs={"value": 1}, name="tests.good_args")
    finally:
        for name in ("tests.pair_bad_args", "tests.pair_bad_kwargs", "tests.good_args"):
            unschedule(name)


def test_a_retention_past_the_earliest_time_postgresql_holds_is_refused_at_start_not_at_every_prune(
    db_url: str,
) -> None:
    # Given "keep failed jobs forever" written as 10,000 years: an interval PostgreSQL reads, but
    # now() minus it is before 4713 BC, which no timestamp holds
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT),
           "CONTROLPLANE_RETENTION_FAILED": "10000 years"}
    # (every prune then fails, "timestamp out of range", and keeps the completed jobs too)
    query(db_url, "INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at) VALUES "
                  "(gen_random_uuid(), 'old', 'default', 'completed', now() - interval '9 days', "
                  "now() - interval '8 days')")  # fmt: skip
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.DataError, match="timestamp out of range"):
            maintenance.prune_rows(cur, "7 days", "10000 years")
    finally:
        conn.close()
    # When a clock starts with it
    base = [sys.executable, "-m", "tasks.cli", "clock", "--once", "--module", "tests.periodic_schedules"]
    done = subprocess.run(base, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    # Then it stops at once naming the setting, as for a value the server cannot read (docs/operations.md,
    # "Retention"), rather than start and have the daily prune fail every day
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "CONTROLPLANE_RETENTION_FAILED must be a PostgreSQL interval" in done.stderr, done.stderr
    # And `controlplane prune` names the option, not only "the database refused: timestamp out of range"
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "prune", "--failed-after", "10000 years"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "--failed-after must be a PostgreSQL interval" in done.stderr, done.stderr


def test_a_schedule_by_name_to_a_queue_its_workers_do_not_declare_it_on_is_not_sent_there_silently(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given workers that declare tests.noop on queue 'default' (control_plane.actor_defaults, as
    # every worker records), and a schedule of it by name, written as a Celery beat entry would be,
    # without the queue ("billing" is where the clock's module thinks it runs)
    with running_worker(db_url, tmp_path):
        wait_for(lambda: query(db_url, "SELECT 1 FROM control_plane.actor_defaults WHERE actor = 'tests.noop'"),
                 what="the worker to declare its actors")  # fmt: skip
    entry = Schedule(name="tests.pair_by_name", cron=CronSchedule.parse("* * * * *"), actor_name="tests.noop",
                     queue_name="billing")  # fmt: skip
    broker_actors = dict(tasks.broker.actors)
    tasks.broker.actors.pop("tests.noop")  # (the clock's process does not import the workers' module)
    try:
        clock = Clock(schedules=[entry], url=db_url, broker=tasks.broker)
        with caplog.at_level("ERROR", logger="tasks.periodic"):
            won = clock.run_pending()
        clock.close()
    finally:
        tasks.broker.actors.clear()
        tasks.broker.actors.update(broker_actors)
    # Then no job waits in a queue no worker of that actor reads (`controlplane send` refuses the
    # same send, naming the queue its workers declared): the tick is not sent, and says why
    stuck = query(db_url, "SELECT queue FROM control_plane.jobs WHERE type = 'tests.noop' AND queue = 'billing'")
    assert won == [] and stuck == [], stuck
    assert "declared by its workers on queue 'default'" in caplog.text, caplog.text


def test_a_tick_published_to_another_broker_slower_than_the_idle_timeout_is_sent_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dramatiq.brokers.stub import StubBroker

    import tasks.periodic as periodic

    monkeypatch.setattr(periodic, "IDLE_IN_TRANSACTION_TIMEOUT", "1s")
    clock_sessions = ("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'controlplane-clock' "
                      "AND datname = current_database()")  # fmt: skip

    idle_long = ("SELECT count(*) AS n FROM pg_stat_activity WHERE application_name = 'controlplane-clock' "
                 "AND datname = current_database() AND state = 'idle in transaction' "
                 "AND state_change < now() - interval '3 seconds'")  # fmt: skip

    class SlowToPublish(StubBroker):
        """Another broker (RabbitMQ): its publish is made while the clock's transaction, which
        claimed the tick, is open. This one waits as a publish does under a RabbitMQ memory or disk
        alarm (its connection blocked): until the server ended the clock's session, idle in it."""

        published: list[str] = []

        def enqueue(self, message: dramatiq.Message, *, delay: int | None = None) -> dramatiq.Message:
            if not self.published:
                # (until the server ended the session, or it sat idle in its transaction three times
                # the timeout: the server then keeps it)
                wait_for(lambda: query(db_url, clock_sessions)[0]["n"] == 0 or query(db_url, idle_long)[0]["n"],
                         what="the idle clock session to end, or to be kept past its timeout")  # fmt: skip
            self.published.append(message.message_id)
            return super().enqueue(message, delay=delay)

    other = SlowToPublish()
    other.declare_queue("default")
    entry = Schedule(name="tests.rabbit", cron=CronSchedule.parse("* * * * *"), actor_name="tests.noop", args=())
    clock = Clock(schedules=[entry], url=db_url, broker=other)
    now = datetime(2026, 3, 2, 10, 0, 2, tzinfo=UTC)
    try:
        # When the clock publishes a tick slower than its session's idle-in-transaction timeout,
        # and looks again in the same minute (or another clock does)
        clock.run_pending(now)
        clock.run_pending(now)
    finally:
        clock.close()
    # Then the tick was published once (at least once is for a crash between publish and commit)
    assert len(other.published) == 1, f"one tick published {len(other.published)} times"
