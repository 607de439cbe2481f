"""Claims a worker counts on that the database lost: a crash undid them, or the reaper put them back.

Claims commit without waiting for the WAL flush, so a server crash undoes the last moments
of them: the rows are back in the queue as the claim found them, while the worker holds the
messages, runs some and has more prefetched. A crash cannot be had on the suite's shared
server; the tests put the rows in the state one leaves them in (``_undo_claims``).
"""

from __future__ import annotations

from typing import Any

import pytest
from dramatiq.middleware import SkipMessage

import tasks
from tasks.broker import PostgresBroker
from tests import actors
from tests.support import claim_in_process, disagreements, job, query, settle_in_process


def _undo_claims(db_url: str) -> None:
    """What a server crash leaves of claims it undoes: the messages unclaimed, as before."""
    query(db_url, "UPDATE control_plane.messages SET claim_token = NULL, worker = NULL, lease_expires_at = NULL")


def _heartbeat(consumer: Any) -> None:
    consumer._next_heartbeat = 0.0
    consumer._housekeeping()


def _claimed_by_another_worker(db_url: str, n: int) -> list[Any]:
    """What another worker process claims of the default queue now (then closed: its claims stay)."""
    other = PostgresBroker(url=db_url, settings=tasks.settings)
    try:
        consumer = other.consume("default", prefetch=n, timeout=100)
        try:
            got = [next(consumer) for _ in range(n)]
            claimed = [p for p in got if p is not None]
            for p in claimed:
                consumer.ack(p)
            consumer._flush()
            return claimed
        finally:
            consumer._failed = True  # (closed as after an error: what it holds is not given back)
            consumer.close()
    finally:
        other.close()


def _tokens(db_url: str) -> list[Any]:
    return [r["claim_token"] for r in query(db_url, "SELECT claim_token::text FROM control_plane.messages")]


@pytest.mark.parametrize("started", [False, True], ids=["prefetched", "running"])
def test_a_claim_a_crash_undid_is_taken_again_at_the_next_heartbeat_and_the_job_runs_once(
    db_url: str, started: bool
) -> None:
    # Given a job this worker claimed, prefetched or running, whose claim a server crash undid
    sent = actors.noop.send("undone")
    consumer, held = claim_in_process()
    held.started = started
    _undo_claims(db_url)
    # When the worker heartbeats (a new consumer's first step, reconnected after the crash)
    _heartbeat(consumer)
    # Then the message is claimed by it again, under the same token: no other worker gets it
    assert _tokens(db_url) == [held.claim_token]
    assert _claimed_by_another_worker(db_url, 1) == []
    # And its outcome is written: the job ran once, completed
    settle_in_process(consumer, held, "ack")
    row = job(db_url, sent.message_id)
    assert (row["status"], row["attempts"]) == ("completed", 1)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages")[0]["n"] == 0
    assert disagreements(db_url) == []


def test_an_outcome_waiting_to_be_written_when_its_claim_was_undone_is_written_once_the_claim_is_taken_again(
    db_url: str,
) -> None:
    # Given a job that finished here, its outcome handed to the settler but not written (the
    # server went down), and its claim undone by the crash
    sent = actors.noop.send("finished before the crash")
    consumer, held = claim_in_process()
    held.started = True
    consumer.ack(held)
    _undo_claims(db_url)
    # When the worker heartbeats, then its settler writes the outcome
    _heartbeat(consumer)
    consumer._flush()
    # Then the job is completed, out of the queue: it does not run again
    row = job(db_url, sent.message_id)
    assert (row["status"], row["attempts"]) == ("completed", 1)
    assert _claimed_by_another_worker(db_url, 1) == []
    consumer.close()
    assert disagreements(db_url) == []


def test_prefetched_messages_another_worker_claimed_after_a_crash_are_not_started_here(db_url: str) -> None:
    # Given two jobs this worker claimed, one handed to Dramatiq's work queue and one still in
    # the consumer's buffer, neither started, whose claims a crash undid, and which another
    # worker then claimed and ran
    first, second = actors.noop.send(1), actors.noop.send(2)
    consumer = tasks.broker.consume("default", prefetch=2, timeout=300)
    try:
        handed = next(consumer)
        assert handed.message_id == first.message_id
        assert [p.message_id for p in consumer.state.buffer] == [second.message_id]
        _undo_claims(db_url)
        assert {p.message_id for p in _claimed_by_another_worker(db_url, 2)} == {first.message_id, second.message_id}
        # When this worker heartbeats
        _heartbeat(consumer)
        # Then it starts neither: a thread coming to the handed one skips it, unseen by the
        # middleware, and the buffered one is handed to no thread
        with pytest.raises(SkipMessage):
            tasks.broker.emit_before("process_message", handed)
        tasks.broker.emit_after("skip_message", handed)
        consumer.ack(handed)
        assert next(consumer) is None
        assert consumer.state.inflight == {}
        consumer._flush()
    finally:
        consumer.close()
    # And each job ran once, by the other worker
    for sent in (first, second):
        row = job(db_url, sent.message_id)
        assert (row["status"], row["attempts"]) == ("completed", 1)
    assert disagreements(db_url) == []


def test_a_message_this_worker_sent_back_for_a_retry_is_not_taken_again(db_url: str) -> None:
    # Given a job whose attempt failed here and whose retry, due at once, is written (back in
    # the queue, unclaimed, as an undone claim would leave it), still counted as held by the
    # time a heartbeat reads what it holds
    sent = actors.always_fails.send("retried")
    consumer, held = claim_in_process()
    held.started = True
    held.error_text = "RuntimeError: failed on purpose"
    tasks.broker.enqueue(held, delay=0)  # (what Dramatiq's Retries does)
    consumer.ack(held)
    consumer._flush()
    consumer.state.inflight[held.message_id] = held
    # When the worker heartbeats
    _heartbeat(consumer)
    consumer.close()
    # Then the retry is left in the queue, for any worker: it is due after that claim ran
    assert _tokens(db_url) == [None]
    row = job(db_url, sent.message_id)
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert [p.message_id for p in _claimed_by_another_worker(db_url, 1)] == [sent.message_id]


def test_a_message_claimed_here_again_before_a_heartbeat_saw_its_first_claim_undone_runs_once(db_url: str) -> None:
    # Given a prefetched job whose claim a crash undid, claimed again by this worker's consumer
    # before any heartbeat
    sent = actors.noop.send("claimed twice")
    consumer, first = claim_in_process()
    _undo_claims(db_url)
    assert consumer._claim(1) == 1
    # Then only the second claim's message is handed to a thread: the first is skipped
    second = next(consumer)
    assert second is not first and second.message_id == sent.message_id
    with pytest.raises(SkipMessage):
        tasks.broker.emit_before("process_message", first)
    settle_in_process(consumer, second, "ack")
    row = job(db_url, sent.message_id)
    assert (row["status"], row["attempts"]) == ("completed", 1)
    assert disagreements(db_url) == []


def test_a_claim_taken_again_while_another_thread_gave_its_message_back_is_given_back_again(db_url: str) -> None:
    # Given a message a heartbeat took again (its claim undone) which a shutdown's requeue, in
    # another thread, gave back while the heartbeat ran: no longer held here
    sent = actors.noop.send("given back meanwhile")
    consumer, held = claim_in_process()
    consumer.state.inflight.pop(held.message_id)
    # When the heartbeat's look at what it took again runs
    consumer._claims_lost([held], [held.message_id], [])
    consumer.close()
    # Then the message is back in the queue for any worker, not claimed by nobody until its lease ends
    assert _tokens(db_url) == [None]
    assert [p.message_id for p in _claimed_by_another_worker(db_url, 1)] == [sent.message_id]
