"""Claims the database lost under a worker: a crash undid them (claims commit without waiting for
the WAL flush).

A crash undoes the last moments of claims: the rows are back in the queue as the claims found
them, while the worker runs what it held. A crash cannot be had on the suite's shared server;
the tests put the rows in the state one leaves them in (``_undo_claims``).
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


def _claimed_by_another_worker(db_url: str, n: int) -> list[Any]:
    """What another worker process claims of the default queue now, and runs (acks)."""
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
            consumer.close()
    finally:
        other.close()


def _messages(db_url: str) -> list[dict[str, Any]]:
    return query(db_url, "SELECT id::text, claim_token::text FROM control_plane.messages")


def test_the_outcome_of_a_claim_a_crash_undid_is_not_written_and_the_job_runs_again_counted_again(
    db_url: str,
) -> None:
    # Given a job this worker ran, whose claim a server crash undid while it ran: back in the
    # queue, unclaimed, as the claim found it. Whatever the job committed without waiting for
    # the WAL flush went with it: a group child's pass (CHILD_PASS), which comes after the
    # claim, so a crash that undoes the claim undoes the pass too
    sent = actors.noop.send("undone")
    consumer, held = claim_in_process()
    held.started = True
    _undo_claims(db_url)
    # When its outcome is written
    settle_in_process(consumer, held, "ack")
    # Then it is refused (applied to the unclaimed row, a group child would end completed,
    # uncounted, and its group's callback never come: a diff review's crash repro), and the
    # job runs again on the next worker, its side effects with it (at least once)
    assert job(db_url, sent.message_id)["status"] == "pending"
    assert [p.message_id for p in _claimed_by_another_worker(db_url, 1)] == [sent.message_id]
    assert job(db_url, sent.message_id)["status"] == "completed"
    assert disagreements(db_url) == []


def test_a_message_claimed_here_again_before_its_first_claims_copy_started_runs_once(db_url: str) -> None:
    # Given a prefetched job whose claim a crash undid, claimed again by this worker's consumer
    # before any thread started the first copy
    sent = actors.noop.send("claimed twice")
    consumer, first = claim_in_process()
    _undo_claims(db_url)
    assert consumer._claim(1) == 1
    # Then only the second claim's copy is handed to a thread: the first is skipped
    second = next(consumer)
    assert second is not first and second.message_id == sent.message_id
    with pytest.raises(SkipMessage):
        tasks.broker.emit_before("process_message", first)
    settle_in_process(consumer, second, "ack")
    row = job(db_url, sent.message_id)
    assert (row["status"], row["attempts"]) == ("completed", 1)
    assert disagreements(db_url) == []
