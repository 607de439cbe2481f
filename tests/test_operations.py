"""Operating the queue: unique jobs, and cancel_job, retry_job, prune_jobs called from SQL."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from typing import Any

import psycopg2
import pytest
from dramatiq.message import Message
from dramatiq.middleware import SkipMessage
from dramatiq.results import ResultFailure, ResultMissing

import tasks
from tasks.broker import PostgresBroker
from tests import actors
from tests.support import (
    ROOT,
    claim_in_process,
    disagreements,
    job,
    query,
    settle_in_process,
    wait_for,
)


def count(url: str, table: str, where: str = "true") -> int:
    return int(query(url, f"SELECT count(*) AS n FROM control_plane.{table} WHERE {where}")[0]["n"])  # noqa: S608


def scalar(url: str, sql: str, *params: Any) -> Any:
    return next(iter(query(url, sql, params)[0].values()))


def listen(url: str) -> Any:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("LISTEN control_plane_messages")
    return conn


def notifications(conn: Any) -> list[str]:
    conn.poll()
    payloads = [n.payload for n in conn.notifies]
    conn.notifies.clear()
    return payloads


# -- unique jobs ---------------------------------------------------------------------


def test_a_second_send_of_a_live_unique_key_returns_the_existing_job(db_url: str) -> None:
    # Given a pending job with unique key "report:7"
    first = actors.noop.send_with_options(args=(1,), unique_key="report:7")
    # When the same key is sent again, alone and twice more inside one batch with another key
    second = actors.noop.send_with_options(args=(2,), unique_key="report:7")
    batch = tasks.broker.enqueue_batch(
        [
            actors.noop.message_with_options(args=(3,), unique_key="report:7"),
            actors.noop.message_with_options(args=(4,), unique_key="report:8"),
            actors.noop.message_with_options(args=(5,), unique_key="report:8"),
        ]
    )
    # Then every duplicate carries the live job's id, and only one job and one message exist per key
    assert second.message_id == first.message_id
    assert batch[0].message_id == first.message_id
    assert batch[2].message_id == batch[1].message_id != first.message_id
    rows = query(db_url, "SELECT unique_key, payload FROM control_plane.jobs ORDER BY unique_key")
    assert [(r["unique_key"], r["payload"]["args"]) for r in rows] == [("report:7", [1]), ("report:8", [4])]
    assert count(db_url, "messages") == 2
    assert disagreements(db_url) == []


def test_a_finished_keyed_message_sent_again_while_another_job_holds_its_key_returns_the_holder(db_url: str) -> None:
    # Given a keyed job that has finished, and a newer live job holding the same key
    first = actors.noop.message_with_options(args=(1,), unique_key="invoice:9")
    tasks.broker.enqueue(first)
    assert scalar(db_url, "SELECT control_plane.cancel_job(%s)", first.message_id) == "cancelled"
    holder = actors.noop.send_with_options(args=(2,), unique_key="invoice:9")
    # When the first message is sent again (a producer's retry, a group run twice), alone, in a
    # batch, and inside a transaction of the caller's
    again = tasks.broker.enqueue(first)
    batch = tasks.broker.enqueue_batch([first, actors.noop.message_with_options(args=(3,), unique_key="x")])
    conn = psycopg2.connect(db_url)
    try:
        with tasks.enqueue_in(conn):
            joined = tasks.broker.enqueue(first)
            after = actors.noop.send(4)  # the caller's transaction is still usable
        conn.commit()
    finally:
        conn.close()
    # Then each is a duplicate of the holder, as a first send of the key would be, not a unique violation
    assert again.message_id == batch[0].message_id == joined.message_id == holder.message_id
    assert job(db_url, first.message_id)["status"] == "cancelled"
    assert job(db_url, after.message_id)["status"] == "pending"
    assert count(db_url, "messages") == 3
    assert disagreements(db_url) == []


def test_finished_keyed_messages_sent_again_together_revive_one_job_for_their_key(db_url: str) -> None:
    # Given two finished jobs that had the same key (a group of keyed children, run before)
    first = actors.noop.message_with_options(args=(1,), unique_key="nightly:7")
    second = actors.noop.message_with_options(args=(2,), unique_key="nightly:7")
    for message in (first, second):
        tasks.broker.enqueue(message)
        assert scalar(db_url, "SELECT control_plane.cancel_job(%s)", message.message_id) == "cancelled"
    # When both are sent again in one batch (the group run again)
    again = tasks.broker.enqueue_batch([first, second])
    # Then the first takes the key again and the second is its duplicate, not a unique violation
    assert [m.message_id for m in again] == [first.message_id, first.message_id]
    assert [job(db_url, m.message_id)["status"] for m in (first, second)] == ["pending", "cancelled"]
    assert disagreements(db_url) == []


@pytest.mark.parametrize("joined", [False, True], ids=["alone", "in-the-callers-transaction"])
def test_a_finished_keyed_message_sent_again_while_a_new_holder_commits_returns_that_holder(
    db_url: str, joined: bool
) -> None:
    # Given a finished keyed job, and an application transaction, not committed, that sent a new
    # job with the same key
    old = actors.noop.message_with_options(args=(1,), unique_key="report:9")
    tasks.broker.enqueue(old)
    assert scalar(db_url, "SELECT control_plane.cancel_job(%s)", old.message_id) == "cancelled"
    app = psycopg2.connect(db_url)
    with tasks.enqueue_in(app):
        new = actors.noop.send_with_options(args=(2,), unique_key="report:9")
    got: list[Any] = []

    def send_again() -> None:
        if not joined:
            got.append(tasks.broker.enqueue(old))
            return
        caller = psycopg2.connect(db_url)
        try:
            with tasks.enqueue_in(caller):
                got.append(tasks.broker.enqueue(old))
                after = actors.noop.send(3)  # and the caller's transaction goes on
            caller.commit()
            got.append(job(db_url, after.message_id)["status"])
        finally:
            caller.close()

    resend = threading.Thread(target=send_again)
    try:
        # When the finished one is sent again meanwhile (its statement waits on the key's index),
        # and the application commits
        resend.start()
        wait_for(lambda: scalar(db_url, "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                                app.info.backend_pid) or not resend.is_alive(),
                 what="the re-send to wait for the application's transaction")  # fmt: skip
        app.commit()
        resend.join(timeout=30)
    finally:
        app.close()
    # Then the re-send is the new job's duplicate (it raised UniqueViolation), and the old one stays finished
    assert [m.message_id for m in got[:1]] == [new.message_id]
    assert got[1:] == (["pending"] if joined else [])
    assert job(db_url, old.message_id)["status"] == "cancelled"
    assert disagreements(db_url) == []


def test_a_duplicate_sent_by_another_actor_names_the_holders_actor_and_queue(db_url: str) -> None:
    # Given a live job of one actor (queue "slow") holding a key
    holder = actors.slow_noop.send_with_options(args=(0.1,), unique_key="nightly")
    # When another actor (queue "default") sends with the same key, alone and in a transaction of the caller's
    alone = actors.noop.send_with_options(args=(1,), unique_key="nightly")
    conn = psycopg2.connect(db_url)
    try:
        with tasks.enqueue_in(conn):
            joined = actors.noop.send_with_options(args=(2,), unique_key="nightly")
        conn.commit()
    finally:
        conn.close()
    # Then each gets the holder's job under its actor and queue, so its result is the holder's
    for duplicate in (alone, joined):
        assert (duplicate.message_id, duplicate.actor_name, duplicate.queue_name) == (
            holder.message_id, "tests.slow_noop", "slow",
        )
    tasks.broker.get_results_backend().store_result(holder, "ran once", 60_000)
    assert alone.get_result() == "ran once"


def test_unique_jobs_hold_across_processes_sending_at_once(db_url: str) -> None:
    # Given four processes, each about to send the same unique key five times, held at one barrier
    # (an advisory lock the test holds; each process waits for it in a shared mode)
    child = (
        "import os, sys, psycopg2\n"
        "from tests import actors\n"
        "gate = psycopg2.connect(os.environ['DATABASE_URL'])\n"
        "gate.cursor().execute('SELECT pg_advisory_lock_shared(4242)')\n"
        "ids = {actors.noop.send_with_options(args=(os.getpid(),), unique_key='tenant-1').message_id "
        "for _ in range(5)}\n"
        "print(' '.join(sorted(ids)))\n"
    )
    barrier = psycopg2.connect(db_url)
    barrier.autocommit = True
    barrier.cursor().execute("SELECT pg_advisory_lock(4242)")
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", child], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    try:
        wait_for(
            lambda: scalar(
                db_url,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242 AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            == 4,
            what="four processes at the barrier",
        )
        # When they are let go together
        barrier.cursor().execute("SELECT pg_advisory_unlock(4242)")
        outputs = [p.communicate(timeout=60)[0].split() for p in procs]
    finally:
        barrier.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
    # Then exactly one job exists, and every send of every process returned it
    assert [p.returncode for p in procs] == [0] * 4
    (only,) = [str(r["id"]) for r in query(db_url, "SELECT id FROM control_plane.jobs")]
    assert all(ids == [only] for ids in outputs)
    assert count(db_url, "messages") == 1
    # And once it has completed, the key can be sent again and makes a new job
    consumer, held = claim_in_process()
    settle_in_process(consumer, held, "ack")
    again = actors.noop.send_with_options(args=(0,), unique_key="tenant-1")
    assert again.message_id != only
    assert job(db_url, only)["status"] == "completed"
    assert job(db_url, again.message_id)["status"] == "pending"


@pytest.mark.parametrize("holder_commits", [True, False])
def test_a_send_waits_for_an_uncommitted_holder_of_its_key(db_url: str, holder_commits: bool) -> None:
    # Given a web request's transaction that has sent key "k" and not committed yet
    conn = psycopg2.connect(db_url)
    try:
        with tasks.enqueue_in(conn):
            holder = actors.noop.send_with_options(args=(1,), unique_key="k")
        # When another session sends "k" (it must wait: the unique index cannot tell yet)
        sent: list[Message[Any]] = []
        sender = threading.Thread(target=lambda: sent.append(actors.noop.send_with_options(args=(2,), unique_key="k")))
        sender.start()
        wait_for(
            lambda: scalar(
                db_url,
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            == 1,
            what="the second send to wait for the first transaction",
        )
        # And the first transaction ends
        if holder_commits:
            conn.commit()
        else:
            conn.rollback()
        sender.join(timeout=30)
    finally:
        conn.close()
    # Then the second send returned the holder if it committed, or made its own job if it rolled back
    assert len(sent) == 1
    if holder_commits:
        assert sent[0].message_id == holder.message_id
    else:
        assert sent[0].message_id != holder.message_id
    assert [str(r["id"]) for r in query(db_url, "SELECT id FROM control_plane.jobs")] == [sent[0].message_id]
    assert count(db_url, "messages") == 1


# -- cancel_job --------------------------------------------------------------------------


def test_cancel_job_cancels_a_pending_job_at_once(db_url: str) -> None:
    # Given a pending job holding a unique key
    message = actors.noop.send_with_options(args=(1,), unique_key="only-one")
    # When an operator cancels it from SQL
    outcome = scalar(db_url, "SELECT control_plane.cancel_job(%s)", message.message_id)
    # Then it is cancelled at once and has left the queue
    assert outcome == "cancelled"
    row = job(db_url, message.message_id)
    assert row["status"] == "cancelled"
    assert row["completed_at"] is not None
    assert row["last_error"] == "cancelled by operator"
    assert count(db_url, "messages") == 0
    assert disagreements(db_url) == []
    # And its unique key is free again
    assert actors.noop.send_with_options(args=(2,), unique_key="only-one").message_id != message.message_id


def test_a_job_cancelled_before_it_ran_tells_its_caller_at_once(db_url: str) -> None:
    # Given a job waiting for its delay, whose caller waits for its result
    message = actors.noop.send_with_options(args=(1,), delay=3_600_000)
    # When an operator cancels it
    assert scalar(db_url, "SELECT control_plane.cancel_job(%s)", message.message_id) == "cancelled"
    # Then its caller gets a Cancelled failure now, not a timeout, as from a job cancelled while it ran
    with pytest.raises(ResultFailure, match="Cancelled: cancelled by operator while it waited") as failure:
        message.get_result(block=True, timeout=10_000)
    assert failure.value.orig_exc_type == "Cancelled"
    # for a day, or the message's result_ttl
    ttl = scalar(db_url, "SELECT extract(epoch FROM max(expires_at) - now()) FROM control_plane.results")
    assert 86_000 < ttl <= 86_400
    short = actors.noop.send_with_options(args=(2,), delay=3_600_000, result_ttl=60_000)
    scalar(db_url, "SELECT control_plane.cancel_job(%s)", short.message_id)
    with pytest.raises(ResultFailure):
        short.get_result()
    assert scalar(db_url, "SELECT extract(epoch FROM min(expires_at) - now()) FROM control_plane.results") <= 60


def test_cancel_job_leaves_finished_and_unknown_jobs_alone(db_url: str) -> None:
    # Given a completed job
    message = actors.noop.send(1)
    consumer, held = claim_in_process()
    settle_in_process(consumer, held, "ack")
    # When an operator cancels it, and a job that does not exist
    # Then nothing happens (NULL) and the completed job stays completed
    assert scalar(db_url, "SELECT control_plane.cancel_job(%s)", message.message_id) is None
    assert scalar(db_url, "SELECT control_plane.cancel_job(%s)", str(uuid.uuid4())) is None
    assert job(db_url, message.message_id)["status"] == "completed"


def test_cancel_job_asks_the_worker_holding_a_running_job_to_interrupt_it(db_url: str) -> None:
    # Given a message claimed by a consumer in this process, and a listener on the wake-up channel
    message = actors.noop.send(1)
    consumer, held = claim_in_process()
    listener = listen(db_url)
    try:
        # When an operator cancels it
        outcome = scalar(db_url, "SELECT control_plane.cancel_job(%s)", message.message_id)
        # Then the job stays as it is until its worker reacts (claimed, no thread started it yet:
        # pending), marked and announced to the queue's workers
        assert outcome == "cancelling"
        assert job(db_url, message.message_id)["status"] == "pending"
        assert count(db_url, "messages", "cancel_requested_at IS NOT NULL") == 1
        assert wait_for(lambda: notifications(listener), what="a NOTIFY") == ["cancel:default"]
    finally:
        listener.close()
    # When the consumer heartbeats, it hands the message to the Cancellation middleware;
    # the message has not started (its worker's threads are all busy, say, with long jobs)
    consumer._next_heartbeat = 0.0
    consumer._housekeeping()
    assert held.cancel_requested
    # Then its job ends cancelled at once, not when a thread is free to refuse it: out of the
    # queue, not failed, not retried, no attempt charged, and its caller hears it
    row = job(db_url, message.message_id)
    assert (row["status"], row["last_error"], row["attempts"]) == ("cancelled", "cancelled by operator", 0)
    assert count(db_url, "messages") == 0
    with pytest.raises(ResultFailure, match="cancelled by operator"):
        message.get_result(backend=tasks.broker.get_results_backend())
    # And when a thread comes to it, it skips it (what Dramatiq's worker thread does with a
    # SkipMessage: the after hooks, then an ack), unseen by the middleware, and writes nothing more
    with pytest.raises(SkipMessage):
        tasks.broker.emit_before("process_message", held)
    tasks.broker.emit_after("skip_message", held)
    consumer.ack(held)
    consumer._flush()
    consumer.close()
    assert job(db_url, message.message_id) == row
    with pytest.raises(ResultFailure, match="cancelled by operator"):
        message.get_result(backend=tasks.broker.get_results_backend())
    assert disagreements(db_url) == []


def test_a_cancelled_job_still_in_its_consumers_buffer_ends_at_once_with_its_hooks(db_url: str) -> None:
    # Given two messages claimed in one statement, the second still in the consumer's buffer (not
    # handed to Dramatiq yet), with failure hooks
    first = actors.noop.send(1)
    sink = "tests.callback_sink"
    second = actors.noop.send_with_options(args=(2,), on_failure=sink, on_final_failure=sink)
    consumer = tasks.broker.consume("default", prefetch=2, timeout=300)
    try:
        assert next(consumer).message_id == first.message_id
        assert [p.message_id for p in consumer.state.buffer] == [second.message_id]
        # When an operator cancels the second, and the consumer heartbeats
        assert scalar(db_url, "SELECT control_plane.cancel_job(%s)", second.message_id) == "cancelling"
        consumer._next_heartbeat = 0.0
        consumer._housekeeping()
        # Then its job is cancelled, its hooks sent once, and the consumer hands it to no thread
        assert job(db_url, second.message_id)["status"] == "cancelled"
        hooks = "SELECT count(*) FROM control_plane.jobs WHERE type = 'tests.callback_sink'"
        assert scalar(db_url, hooks) == 2  # on_failure, on_final_failure
        handed = [next(consumer) for _ in range(3)]  # (what it claims now: the hooks' messages)
        assert second.message_id not in {p.message_id for p in handed if p is not None}
    finally:
        consumer.close()
    assert scalar(db_url, hooks) == 2
    assert disagreements(db_url) == []


@pytest.mark.parametrize("ending", ["worker died", "worker shut down", "attempt failed and would retry"])
def test_a_cancelled_running_job_is_never_put_back_in_the_queue(db_url: str, ending: str) -> None:
    # Given a running job whose cancellation was requested
    message = actors.always_fails.send("x")
    consumer, held = claim_in_process()
    assert scalar(db_url, "SELECT control_plane.cancel_job(%s)", message.message_id) == "cancelling"
    # When its attempt ends without the interrupt: lease lost, graceful shutdown, or a failure to retry
    if ending == "worker died":
        query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second'")
        # (the reaper is another worker process: its own broker)
        other = PostgresBroker(url=db_url, settings=tasks.settings)
        reaper = other.consume("default", prefetch=1, timeout=100)
        reaper._next_reap = 0.0
        reaper._housekeeping()
        reaper.close()
        other.close()
    elif ending == "worker shut down":
        held.started = True
        consumer.requeue([held])
    else:
        held.error_text = "RuntimeError: failed on purpose: x"
        tasks.broker.enqueue(held, delay=100)  # what Dramatiq's Retries does
        consumer.ack(held)
        consumer._flush()
    consumer.close()
    # Then the job is cancelled instead of waiting for another attempt
    row = job(db_url, message.message_id)
    assert row["status"] == "cancelled"
    assert row["last_error"] == "cancelled by operator"
    assert count(db_url, "messages") == 0
    assert disagreements(db_url) == []


# -- retry_job -------------------------------------------------------------------------


def test_retry_job_puts_a_failed_job_back_with_a_message_dramatiq_decodes(db_url: str) -> None:
    # Given a job that failed for good after one attempt
    message = actors.always_fails.send_with_options(args=("boom",), kwargs={}, priority=3)
    consumer, held = claim_in_process()
    held.options["retries"] = 2
    settle_in_process(consumer, held, "nack", error="RuntimeError: failed on purpose: boom")
    failed = job(db_url, message.message_id)
    assert failed["status"] == "failed"
    listener = listen(db_url)
    try:
        # When an operator retries it from SQL
        retried = scalar(db_url, "SELECT control_plane.retry_job(%s)", message.message_id)
        # Then it is pending again, its error history kept, and its queue's workers are woken
        assert retried is True
        assert wait_for(lambda: notifications(listener), what="a NOTIFY") == ["default"]
    finally:
        listener.close()
    row = job(db_url, message.message_id)
    assert row["status"] == "pending"
    assert row["completed_at"] is None
    assert row["errors"] == failed["errors"]
    assert row["last_error"] == "RuntimeError: failed on purpose: boom"
    assert disagreements(db_url) == []
    # And the queue holds a message Dramatiq decodes into the same call, its retries counted from zero
    body = query(db_url, "SELECT body, priority FROM control_plane.messages")[0]
    decoded = Message.decode(bytes(body["body"]))
    assert body["priority"] == 3
    assert (decoded.message_id, decoded.queue_name, decoded.actor_name) == (
        message.message_id,
        "default",
        "tests.always_fails",
    )
    assert (decoded.args, decoded.kwargs) == (("boom",), {})
    assert decoded.options["retries"] == 0
    assert decoded.options["priority"] == 3
    assert isinstance(decoded.message_timestamp, int)
    # And a worker claims it like any message
    consumer, held = claim_in_process()
    assert held.message_id == message.message_id and held.args == ("boom",)
    settle_in_process(consumer, held, "ack")
    assert job(db_url, message.message_id)["status"] == "completed"


def test_a_retried_job_forgets_the_failure_its_caller_would_have_read(db_url: str) -> None:
    # Given a job that failed for good, its failure stored for its caller
    message = actors.always_fails.send_with_options(args=("boom",), store_results=True)
    consumer, held = claim_in_process()
    held.options["retries"] = 2
    settle_in_process(consumer, held, "nack", error="RuntimeError: failed on purpose: boom")
    tasks.broker.get_results_backend().store_exception(message, RuntimeError("failed on purpose: boom"), 60_000)
    with pytest.raises(ResultFailure):
        message.get_result()
    # When an operator retries it
    assert scalar(db_url, "SELECT control_plane.retry_job(%s)", message.message_id) is True
    # Then its caller waits for the new attempt instead of reading the old failure
    with pytest.raises(ResultMissing):
        message.get_result()
    # And the new attempt's outcome is what it then reads
    consumer, held = claim_in_process()
    settle_in_process(consumer, held, "ack")
    tasks.broker.get_results_backend().store_result(message, "second time", 60_000)
    assert message.get_result() == "second time"


def test_retry_job_does_nothing_to_pending_completed_or_unknown_jobs(db_url: str) -> None:
    pending = actors.noop.send(1)
    done = actors.noop.send(2)
    consumer, held = claim_in_process()
    assert held.message_id == pending.message_id
    settle_in_process(consumer, held, "ack")
    for job_id in (done.message_id, pending.message_id, str(uuid.uuid4())):
        assert scalar(db_url, "SELECT control_plane.retry_job(%s)", job_id) is False
    assert count(db_url, "messages") == 1


def test_retry_job_refuses_while_another_job_holds_its_unique_key(db_url: str) -> None:
    # Given a cancelled job with key "k", and a newer pending one with the same key
    old = actors.noop.send_with_options(args=(1,), unique_key="k")
    assert scalar(db_url, "SELECT control_plane.cancel_job(%s)", old.message_id) == "cancelled"
    new = actors.noop.send_with_options(args=(2,), unique_key="k")
    # When the old one is retried, Then the database refuses, naming the job that holds the key
    with pytest.raises(psycopg2.errors.UniqueViolation, match=f"job {new.message_id} with the same unique key k"):
        query(db_url, "SELECT control_plane.retry_job(%s)", (old.message_id,))
    assert job(db_url, old.message_id)["status"] == "cancelled"


def test_a_refused_retry_finds_the_key_holder_through_its_index_not_a_scan_of_the_history(db_url: str) -> None:
    # Given a cancelled job with key "k", and a newer pending one with the same key
    old = actors.noop.send_with_options(args=(1,), unique_key="k")
    assert scalar(db_url, "SELECT control_plane.cancel_job(%s)", old.message_id) == "cancelled"
    new = actors.noop.send_with_options(args=(2,), unique_key="k")
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            # (sequential scans priced out: one shows only where no index can serve)
            cur.execute("SET enable_seqscan = off")
            scans = "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relid = 'control_plane.jobs'::regclass"
            cur.execute(scans)
            (before,) = cur.fetchone()
            # When the old one is retried and refused
            cur.execute("SAVEPOINT retry")
            with pytest.raises(psycopg2.errors.UniqueViolation, match=f"job {new.message_id} with the same"):
                cur.execute("SELECT control_plane.retry_job(%s)", (old.message_id,))
            cur.execute("ROLLBACK TO SAVEPOINT retry")
            cur.execute(scans)
            (after,) = cur.fetchone()
    finally:
        conn.rollback()
        conn.close()
    # Then the job holding the key was found without reading the jobs table from end to end
    assert after == before


def test_retry_job_refuses_a_job_whose_message_could_not_be_decoded(db_url: str) -> None:
    garbage = str(uuid.uuid4())
    query(
        db_url,
        "INSERT INTO control_plane.jobs (id, type, queue, status) VALUES (%s, '?', 'default', 'failed')",
        (garbage,),
    )
    with pytest.raises(psycopg2.errors.RaiseException, match="could not be decoded"):
        query(db_url, "SELECT control_plane.retry_job(%s)", (garbage,))


# -- prune_jobs ------------------------------------------------------------------------


def test_prune_jobs_deletes_old_finished_jobs_and_expired_results(db_url: str) -> None:
    # Given jobs finished at various ages, live jobs however old, and results expired or not
    ages = {
        "completed 8 days ago": ("completed", "8 days"),
        "completed 6 days ago": ("completed", "6 days"),
        "cancelled 8 days ago": ("cancelled", "8 days"),
        "failed 8 days ago": ("failed", "8 days"),
        "failed 31 days ago": ("failed", "31 days"),
        "pending for 60 days": ("pending", None),
        "running for 60 days": ("running", None),
    }
    for name, (status, age) in ages.items():
        query(
            db_url,
            "INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at) "
            "VALUES (gen_random_uuid(), %s, 'default', %s, now() - interval '60 days', now() - %s::interval)",
            (name, status, age),
        )
    query(
        db_url,
        "INSERT INTO control_plane.results (key, value, expires_at) VALUES "
        "('expired', 'x', now() - interval '1 second'), ('live', 'x', now() + interval '1 hour')",
    )
    # When they are pruned with 7 days for finished jobs and 30 for failed ones
    deleted = scalar(db_url, "SELECT control_plane.prune_jobs('7 days', '30 days')")
    # Then old completed, cancelled and failed jobs and the expired result are gone, and nothing else
    assert deleted == 4
    kept = {r["type"] for r in query(db_url, "SELECT type FROM control_plane.jobs")}
    assert kept == {"completed 6 days ago", "failed 8 days ago", "pending for 60 days", "running for 60 days"}
    assert [r["key"] for r in query(db_url, "SELECT key FROM control_plane.results")] == ["live"]
    # And pruning again finds nothing more
    assert scalar(db_url, "SELECT control_plane.prune_jobs('7 days', '30 days')") == 0


def test_a_send_by_name_takes_the_priority_and_attempts_its_workers_declare(db_url: str) -> None:
    import dramatiq

    from tasks.middleware.retries import default_attempts

    # Given an actor of priority 7 and 4 attempts, declared by the workers, one of which started
    # consuming its queue
    @dramatiq.actor(broker=tasks.broker, actor_name="tests.by_name", queue_name="by_name", priority=7,
                    max_attempts=4)  # fmt: skip
    def by_name() -> None: ...

    tasks.broker.consume("by_name", prefetch=1, timeout=100).close()
    # When a process that does not declare it sends it by name (a web app's Message,
    # `controlplane send ACTOR --queue`, a schedule naming it), with another actor nobody declares
    sender = PostgresBroker(url=db_url, settings=tasks.settings)
    try:
        known, unknown, urgent = sender.enqueue_batch([
            Message(queue_name="by_name", actor_name="tests.by_name", args=(), kwargs={}, options={}),
            Message(queue_name="by_name", actor_name="tests.nobody", args=(), kwargs={}, options={}),
            Message(queue_name="by_name", actor_name="tests.by_name", args=(), kwargs={}, options={"priority": 1}),
        ])  # fmt: skip
        alone = sender.enqueue(Message(queue_name="by_name", actor_name="tests.by_name", args=(), kwargs={},
                                       options={}))  # fmt: skip
        default = default_attempts(sender)
    finally:
        sender.close()
    # Then its jobs get the workers' priority and attempts (not 0, the highest, and the default),
    # a message's own option still wins, and an actor nobody declared gets 0 and the default
    rows = {r["id"]: (r["priority"], r["max_attempts"]) for r in query(
        db_url, "SELECT j.id::text, m.priority, j.max_attempts FROM control_plane.jobs AS j "
                "JOIN control_plane.messages AS m USING (id)")}  # fmt: skip
    assert rows == {
        known.message_id: (7, 4), alone.message_id: (7, 4), urgent.message_id: (1, 4),
        unknown.message_id: (0, default),
    }  # fmt: skip


def test_a_worker_on_a_database_without_actor_defaults_refuses_to_consume_and_says_to_migrate(db_url: str) -> None:
    from tasks.broker import SchemaMissing

    # Given a database whose actor_defaults table is not there (migrated before 0015, or
    # downgraded below it): there this release's pipeline and group hooks fail to send, and
    # the reaper fails (a helper's review lost 30 of 170 steps and callbacks, jobs completed)
    query(db_url, "DROP TABLE control_plane.actor_defaults")
    # When a consumer starts / Then it refuses, naming the revision and what to run (Dramatiq
    # starts it again a few seconds later: it consumes once the schema is migrated)
    with pytest.raises(SchemaMissing, match=r"older than revision 0015.*run `controlplane migrate`"):
        tasks.broker.consume("default", prefetch=1, timeout=100)


def test_an_actor_changed_after_it_was_declared_does_not_stop_its_queue(
    db_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    broker_module = importlib.import_module("tasks.broker")
    monkeypatch.setattr(broker_module, "_declare_refused", threading.Event())
    # Given an actor whose priority was changed, after its declaration was checked, to one
    # control_plane.actor_defaults cannot hold
    monkeypatch.setattr(actors.noop, "priority", 2**31)
    # When its queue's consumer starts, Then it consumes (it restarted forever, its queue stalled)
    with caplog.at_level("ERROR", logger="tasks.broker"):
        consumer = tasks.broker.consume(actors.noop.queue_name, prefetch=1, timeout=100)
        try:
            assert next(consumer) is None
        finally:
            consumer.close()
    # And the worker says once why its actors are not recorded
    said = [r.getMessage() for r in caplog.records if "actor_defaults" in r.getMessage()]
    assert len(said) == 1 and "changed after it was declared" in said[0], said


def test_keyed_sends_inside_enqueue_in_on_an_autocommit_connection_are_sent(db_url: str) -> None:
    # Given a caller's connection in autocommit mode (no transaction block for a savepoint)
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        # When keyed and keyless messages are sent inside enqueue_in
        with tasks.enqueue_in(conn):
            keyed = actors.noop.send_with_options(args=(1,), unique_key="auto:1")
            again = actors.noop.send_with_options(args=(2,), unique_key="auto:1")
            plain = actors.noop.send(3)
    finally:
        conn.close()
    # Then they are sent as anywhere else (they failed with "SAVEPOINT can only be used in transaction blocks")
    assert again.message_id == keyed.message_id
    assert {job(db_url, m.message_id)["status"] for m in (keyed, plain)} == {"pending"}


def test_a_re_send_racing_a_new_holder_in_a_repeatable_read_transaction_raises_and_leaves_it_usable(
    db_url: str,
) -> None:
    # Given a finished keyed job, and a caller's REPEATABLE READ transaction whose snapshot is taken
    old = actors.noop.message_with_options(args=(1,), unique_key="rr:1")
    tasks.broker.enqueue(old)
    assert scalar(db_url, "SELECT control_plane.cancel_job(%s)", old.message_id) == "cancelled"
    caller = psycopg2.connect(db_url)
    caller.set_session(isolation_level="REPEATABLE READ")
    try:
        with caller.cursor() as cur:
            cur.execute("SELECT 1")
        # When another transaction commits a new holder of the key, and the caller re-sends the old job
        new = actors.noop.send_with_options(args=(2,), unique_key="rr:1")
        # Then the caller hears the unique violation at once (its snapshot can never see the holder;
        # it looped, then said "try again" in a transaction that could not)
        with pytest.raises(psycopg2.errors.UniqueViolation), tasks.enqueue_in(caller):
            tasks.broker.enqueue(old)
        # And its transaction is still usable, to commit its other work or to retry
        with caller.cursor() as cur:
            cur.execute("SELECT 1")
        caller.commit()
    finally:
        caller.close()
    assert job(db_url, new.message_id)["status"] == "pending"
    assert job(db_url, old.message_id)["status"] == "cancelled"
