"""Pausing a queue (``controlplane queues pause``, ``control_plane.pause_queue``): workers take none
of its jobs and give back those they hold unstarted; running jobs go on; resuming lets them run."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2.errors
import psycopg2.extensions
import pytest
from dramatiq.results import ResultFailure

import tasks
from tasks.cli import main
from tests import actors
from tests.support import (
    claim_in_process,
    disagreements,
    effects,
    job,
    open_gate,
    query,
    running_worker,
    settle_in_process,
    wait_for,
)


def _claimed(url: str) -> list[str]:
    rows = query(url, "SELECT id::text FROM control_plane.messages WHERE claim_token IS NOT NULL ORDER BY id")
    return [r["id"] for r in rows]


def test_a_paused_queue_is_not_claimed_until_it_is_resumed(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    # Given a job ready in queue "default", and an operator who pauses the queue, saying why
    sent = actors.noop.send("held back")
    assert main(["queues", "pause", "default", "--reason", "auth service is down"]) == 0
    assert capsys.readouterr().out.startswith("paused default: its workers take none of its jobs")
    consumer = tasks.broker.consume("default", prefetch=4, timeout=500)
    try:
        # When a consumer of the queue looks for work
        # Then it finds none, and the job waits, pending and unclaimed
        assert next(consumer) is None
        assert job(db_url, sent.message_id)["status"] == "pending"
        assert _claimed(db_url) == []
        # And the operator's views say the queue is paused, and why
        assert main(["queues", "list", "--json"]) == 0
        (paused,) = json.loads(capsys.readouterr().out)
        assert (paused["queue"], paused["reason"]) == ("default", "auth service is down")
        assert main(["stats", "--json"]) == 0
        stats = {r["queue"]: r for r in json.loads(capsys.readouterr().out)}
        assert (stats["default"]["paused"], stats["default"]["ready"]) == (True, 1)
        # And a second pause changes nothing, saying so
        assert main(["queues", "pause", "default", "--reason", "another"]) == 0
        assert capsys.readouterr().out == "default was paused already (its reason and time are kept)\n"
        # When the queue is resumed, the consumer's poll, heartbeat and reap put off (only the
        # resume's NOTIFY can wake it, as in production, where they come every second or more)
        consumer._next_poll = consumer._next_heartbeat = consumer._next_reap = time.monotonic() + 3600
        assert main(["queues", "resume", "default"]) == 0
        assert capsys.readouterr().out == "resumed default: its workers take its jobs again\n"
        # Then the consumer takes the job
        held = wait_for(lambda: next(consumer), what="the consumer to claim the job")
        assert held.message_id == sent.message_id
    finally:
        consumer.close()
    assert main(["queues", "resume", "default"]) == 0
    assert capsys.readouterr().out == "default was not paused\n"
    assert main(["queues", "list"]) == 0
    assert capsys.readouterr().out == "no queue is paused\n"


def test_a_pause_reaches_a_consumer_holding_a_job_at_once_not_at_its_next_heartbeat(db_url: str) -> None:
    # Given a consumer holding a job no thread has started, its next heartbeat and reap an hour
    # off (only the pause's NOTIFY can tell it before then)
    sent = actors.noop.send("held")
    consumer = tasks.broker.consume("default", prefetch=2, timeout=200)
    try:
        held = next(consumer)
        assert held is not None and held.message_id == sent.message_id
        consumer._next_heartbeat = consumer._next_reap = time.monotonic() + 3600
        # When the queue is paused
        assert query(db_url, "SELECT control_plane.pause_queue('default') AS ok")[0]["ok"] is True

        # Then the consumer gives the job back as it next looks for work
        def given_back() -> bool:
            next(consumer)
            return _claimed(db_url) == []

        wait_for(given_back, what="the held job to be given back")
        assert job(db_url, sent.message_id)["status"] == "pending"
    finally:
        consumer.close()


def test_pausing_a_queue_no_one_knows_says_so_and_a_bad_name_is_refused(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", db_url)
    # A misspelt queue: paused (a queue may be paused before its first job), with a note
    assert main(["queues", "pause", "defualt"]) == 0
    captured = capsys.readouterr()
    assert "no actor a worker declared sends to queue 'defualt' and it holds no jobs" in captured.err
    # A name no queue can have: refused, naming the problem, nothing paused
    with pytest.raises(SystemExit) as refused:
        main(["queues", "pause", "default; DROP TABLE x"])
    assert refused.value.code == 2
    assert "the queue name 'default; DROP TABLE x' is not one" in capsys.readouterr().err
    # And so is a name no actor may have (Dramatiq's delay queue's)
    with pytest.raises(SystemExit):
        main(["queues", "pause", "default.DQ"])
    assert "ends in .DQ" in capsys.readouterr().err
    # And in SQL, where no note is given, a name with a space, say, is refused by the table
    with pytest.raises(psycopg2.errors.CheckViolation):
        query(db_url, "SELECT control_plane.pause_queue('default ')")
    assert [r["queue"] for r in query(db_url, "SELECT queue FROM control_plane.queue_pauses")] == ["defualt"]


def test_pausing_gives_back_the_held_jobs_no_thread_started_and_lets_the_running_one_finish(
    db_url: str, tmp_path: Path
) -> None:
    # Given a worker with one thread running a long job, and holding another it has no thread for
    long_job = actors.wait_for_gate.send("paused")
    with running_worker(db_url, tmp_path, threads=1) as worker:
        wait_for(lambda: len(effects(db_url, "started")) == 1, what="the long job to start")
        waiting = [actors.noop.send(n) for n in range(3)]
        wait_for(lambda: len(_claimed(db_url)) == 2, what="the worker to hold a job it has no thread for")
        # When an operator pauses the queue (in SQL, as the CLI does)
        assert query(db_url, "SELECT control_plane.pause_queue('default') AS ok")[0]["ok"] is True
        # Then the worker gives back what it held unstarted, at once, while the long job runs on
        wait_for(lambda: _claimed(db_url) == [long_job.message_id], timeout=30, what="the held job to be given back")
        wait_for(lambda: job(db_url, long_job.message_id)["status"] == "running", what="the long job's running mark")
        assert _claimed(db_url) == [long_job.message_id]
        # And when the long job ends, no other job of the queue starts: they wait, pending
        open_gate(db_url, "paused")
        wait_for(lambda: job(db_url, long_job.message_id)["status"] == "completed", what="the long job to finish")
        assert {job(db_url, m.message_id)["status"] for m in waiting} == {"pending"}
        # When the queue is resumed
        assert query(db_url, "SELECT control_plane.resume_queue('default') AS ok")[0]["ok"] is True
        # Then every waiting job runs, each once (the one given back was not also run by its thread)
        ids = [m.message_id for m in waiting]
        wait_for(
            lambda: {job(db_url, i)["status"] for i in ids} == {"completed"}, what="the waiting jobs to run"
        )
        # And the worker said so once, not also once per message its thread then skipped
        assert worker.log_path is not None
        log = worker.log_path.read_text()
        assert "is paused: gave back 1 message(s) no thread had started" in log
        assert "was skipped" not in log
    ran = [e["message_id"] for e in effects(db_url, "noop")]
    assert sorted(map(str, ran)) == sorted(ids)
    assert all(job(db_url, i)["attempts"] == 1 for i in ids)
    assert disagreements(db_url) == []


def test_a_worker_on_a_database_before_0017_consumes_as_before_and_says_to_migrate(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a database whose release step has not run yet (new workers started first: a deploy
    # in the wrong order), at the revision before the pauses
    import importlib

    from alembic import command

    import migrations

    broker_module = importlib.import_module("tasks.broker")  # (tasks.broker, the attribute, is the broker)
    command.downgrade(migrations.alembic_config(db_url), "0016")
    broker_module._pauses_missing.clear()
    try:
        sent = actors.noop.send("before 0017")
        # When a consumer claims, heartbeats and settles
        consumer, held = claim_in_process()
        consumer._next_heartbeat = 0.0
        consumer._housekeeping()
        settle_in_process(consumer, held, "ack")
        # Then the job ran as before, and the worker said what to do, once
        assert held.message_id == sent.message_id
        assert job(db_url, sent.message_id)["status"] == "completed"
        assert caplog.text.count("queue pauses are not read: the database is at a revision before 0017") == 1
        # And a consumer that started before the migration reads pauses once it is done, at its next reap
        consumer = tasks.broker.consume("default", prefetch=1, timeout=500)
        assert next(consumer) is None
        migrations.upgrade(db_url)
        assert query(db_url, "SELECT control_plane.pause_queue('default') AS ok")[0]["ok"] is True
        later = actors.noop.send("after 0017")
        consumer._next_reap = 0.0
        try:
            assert next(consumer) is None
            assert job(db_url, later.message_id)["status"] == "pending"
        finally:
            consumer.close()
    finally:
        migrations.upgrade(db_url)


def test_a_worker_that_could_not_record_its_actors_tries_again_at_each_reap(db_url: str) -> None:
    # Given a consumer whose actors could not be recorded when it connected (its role was
    # granted actor_defaults only later)
    consumer = tasks.broker.consume("default", prefetch=1, timeout=100)
    try:
        query(db_url, "DELETE FROM control_plane.actor_defaults")
        consumer._declared = False
        # When it reaps
        consumer._next_reap = 0.0
        assert next(consumer) is None
    finally:
        consumer.close()
    # Then they are recorded (what senders by name read: the actors' priorities and attempts)
    declared = query(db_url, "SELECT actor FROM control_plane.actor_defaults WHERE actor = 'tests.noop'")
    assert declared == [{"actor": "tests.noop"}]


def test_a_cancel_landing_as_a_paused_queue_gives_back_its_job_still_sends_its_hooks_and_tells_its_caller(
    db_url: str,
) -> None:
    # Given a job held by a consumer of a queue just paused, whose on_final_failure is set
    sent = actors.noop.send_with_options(args=("doomed",), on_final_failure="tests.callback_sink")
    consumer, held = claim_in_process()
    assert held.message_id == sent.message_id
    assert query(db_url, "SELECT control_plane.pause_queue('default') AS ok")[0]["ok"] is True
    release = consumer._release

    def cancelled_just_before(proxies: Any) -> None:
        # When an operator cancels it between the heartbeat that saw the pause and the give-back
        query(db_url, "SELECT control_plane.cancel_job(%s)", (sent.message_id,))
        release(proxies)

    consumer._release = cancelled_just_before
    consumer._next_heartbeat = 0.0
    try:
        consumer._housekeeping()
    finally:
        consumer._release = release
        consumer.close()
    # Then the give-back ends it cancelled, as the cancel alone would: its hook sent, its caller told
    assert job(db_url, sent.message_id)["status"] == "cancelled"
    hooks = query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'tests.callback_sink'")
    assert hooks[0]["n"] == 1
    with pytest.raises(ResultFailure, match="cancelled"):
        sent.get_result()
    assert disagreements(db_url) == []


def test_a_worker_role_that_may_not_read_the_pauses_consumes_all_the_same_and_says_what_to_grant(
    db_url: str, tmp_path: Path
) -> None:
    # Given a worker's role granted the tables one by one before 0017, so not the pauses
    role = f"cp_worker_{uuid.uuid4().hex[:10]}"
    db = psycopg2.extensions.parse_dsn(db_url)["dbname"]
    query(db_url, f"""CREATE ROLE {role} LOGIN; GRANT CONNECT ON DATABASE "{db}" TO {role};
        GRANT USAGE ON SCHEMA control_plane, test_support TO {role};
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA control_plane, test_support TO {role};
        GRANT USAGE ON ALL SEQUENCES IN SCHEMA control_plane, test_support TO {role};
        REVOKE ALL ON control_plane.queue_pauses FROM {role}""")
    try:
        sent = actors.noop.send("no pauses read")
        # When its worker runs
        parts = urlsplit(db_url)
        url = urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rsplit('@', 1)[-1]}"))
        with running_worker(url, tmp_path) as worker:
            # Then it consumes, as before the pauses, and says what to grant, instead of failing each claim
            wait_for(lambda: job(db_url, sent.message_id)["status"] == "completed", what="the job to run")
            assert "this role may not read control_plane.queue_pauses: GRANT SELECT" in worker.log()
            assert "permission denied" not in worker.log()
    finally:
        query(db_url, f'REVOKE ALL ON DATABASE "{db}" FROM {role}; DROP OWNED BY {role}; DROP ROLE {role}')
