"""Claims the database lost under a worker: a crash undid them (claims commit without waiting for
the WAL flush), and outcomes of claims whose messages changed since.

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
from tests.support import claim_in_process, disagreements, job, query, reap_from_another_worker, settle_in_process


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


def test_the_outcome_of_a_claim_a_crash_undid_is_not_written_and_the_job_runs_again(db_url: str) -> None:
    # Given a job this worker ran, whose claim a server crash undid while it ran: its row back
    # in the queue as the claim found it (a rule writing outcomes to such rows, by the row's
    # version, cost every job a tenth of the drain rate: withdrawn, docs/performance.md)
    sent = actors.noop.send("undone")
    consumer, held = claim_in_process()
    held.started = True
    _undo_claims(db_url)
    # When its outcome is written
    settle_in_process(consumer, held, "ack")
    # Then it is refused, and the job runs again on the next worker (at least once)
    assert job(db_url, sent.message_id)["status"] == "pending"
    assert [p.message_id for p in _claimed_by_another_worker(db_url, 1)] == [sent.message_id]
    assert job(db_url, sent.message_id)["status"] == "completed"
    assert disagreements(db_url) == []


@pytest.mark.parametrize("since", ["sent again", "taken and sent again", "put back by the reaper"])
def test_the_outcome_of_a_claim_whose_message_changed_since_is_not_written(db_url: str, since: str) -> None:
    # Given a job claimed here whose row changed since its claim: sent again under its id while
    # claimed (the send puts it back in the queue), or its claim undone by a crash, then taken by
    # another worker, run, and sent again, or its lease ended and the reaper put it back
    sent = actors.noop.send("changed")
    consumer, held = claim_in_process()
    held.started = True
    if since == "taken and sent again":
        _undo_claims(db_url)
        assert [p.message_id for p in _claimed_by_another_worker(db_url, 1)] == [sent.message_id]
    if since == "put back by the reaper":
        query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second'")
        reap_from_another_worker()
    else:
        tasks.broker.enqueue(held._message)
    # When this worker's outcome is written
    settle_in_process(consumer, held, "nack")
    # Then it changes nothing: the message waits in the queue, unclaimed, its job pending
    assert _messages(db_url) == [{"id": sent.message_id, "claim_token": None}]
    assert job(db_url, sent.message_id)["status"] == "pending"
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


def test_a_group_members_ack_whose_claim_and_pass_a_crash_undid_is_not_written(db_url: str) -> None:
    from dramatiq import group
    from dramatiq.middleware import GroupCallbacks

    # Given a group of two with a callback, whose first member ran here and passed the barrier,
    # then a crash undid both its claim and its pass (which came after the claim)
    members = group([actors.noop.message(i) for i in range(2)])
    members.add_completion_callback(actors.group_done.message("undone"))
    members.run()
    consumer, held = claim_in_process()
    held.started = True
    hook = next(m for m in tasks.broker.middleware if isinstance(m, GroupCallbacks))
    hook.after_process_message(tasks.broker, held, result=None)
    barrier = held.options["group_completion_uuid"]
    query(db_url, "DELETE FROM control_plane.rate_limits WHERE key LIKE '%%@done:%%'")
    query(db_url, "UPDATE control_plane.rate_limits SET value = 2 WHERE key = %s", (barrier,))
    _undo_claims(db_url)
    # When its ack is written
    settle_in_process(consumer, held, "ack")
    # Then it is refused: the member waits in the queue to run and be counted again (written, it
    # would end completed uncounted, and the group's callback never come)
    assert job(db_url, held.message_id)["status"] == "pending"
    assert {"id": held.message_id, "claim_token": None} in _messages(db_url)
