"""Cancelling a running job, and unique jobs, with real ``dramatiq`` worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
from dramatiq.results import ResultFailure

from tests import actors
from tests.support import disagreements, effects, job, query, running_worker, wait_for


def test_a_running_job_cancelled_with_cancel_job_is_interrupted_and_ends_cancelled(
    db_url: str, tmp_path: Path
) -> None:
    # Given a worker with a single thread, running a job that waits for a gate nobody opens
    # (the actor allows 3 attempts, so a failure would be retried)
    message = actors.wait_for_gate.send_with_options(args=("never opened",), store_results=True)
    with running_worker(db_url, tmp_path, threads=1) as worker:
        wait_for(lambda: effects(db_url, "started"), what="the job to start")
        # (its worker marks it running once it has run for RUNNING_MARK_DELAY_SECONDS)
        wait_for(lambda: job(db_url, message.message_id)["status"] == "running", what="the job to be marked running")
        # When an operator cancels it from SQL
        (row,) = query(db_url, "SELECT control_plane.cancel_job(%s) AS outcome", (message.message_id,))
        assert row["outcome"] == "cancelling"
        # Then the worker interrupts it and the job ends cancelled
        final = wait_for(
            lambda: job(db_url, message.message_id)["status"] != "running" and job(db_url, message.message_id),
            what="the job to stop running",
        )
        assert final["status"] == "cancelled"
        # And the worker's only thread survived the interrupt: the next job runs on it
        after = actors.noop.send("after the cancel")
        wait_for(lambda: job(db_url, after.message_id)["status"] == "completed", what="the next job")
        assert worker.proc.poll() is None
    # And the attempt was not retried: one attempt, one start, no finish, nothing left in the queue
    assert final["attempts"] == 1
    assert final["completed_at"] is not None
    assert final["last_error"] == "cancelled by operator"
    assert [e["error"] for e in final["errors"]] == ["Cancelled: an operator cancelled the job while it ran"]
    # And its caller is told why (the interrupt's exception says nothing: it was "Cancelled: ")
    with pytest.raises(ResultFailure) as failure:
        message.get_result()
    assert str(failure.value).endswith("Cancelled: an operator cancelled the job while it ran")
    assert len(effects(db_url, "started")) == 1
    assert effects(db_url, "finished") == []
    assert job(db_url, message.message_id)["status"] == "cancelled"
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages")[0]["n"] == 0
    assert disagreements(db_url) == []


def test_a_duplicate_send_of_a_running_unique_job_gets_its_result(db_url: str, tmp_path: Path) -> None:
    # Given a running job with unique key "gate:k" that stores its result
    first = actors.wait_for_gate.send_with_options(args=("k",), unique_key="gate:k", store_results=True)
    with running_worker(db_url, tmp_path):
        wait_for(lambda: job(db_url, first.message_id)["status"] == "running", what="the job to run")
        # When the same key is sent again while it runs
        duplicate = actors.wait_for_gate.send_with_options(args=("k",), unique_key="gate:k", store_results=True)
        # Then the send returned the running job, whose result it can wait for
        assert duplicate.message_id == first.message_id
        query(db_url, "INSERT INTO test_support.gates (name) VALUES ('k')")
        assert duplicate.get_result(block=True, timeout=30_000) == "k"
        # And once it has completed, the key makes a new job that runs too
        again = actors.wait_for_gate.send_with_options(args=("k",), unique_key="gate:k")
        assert again.message_id != first.message_id
        wait_for(lambda: job(db_url, again.message_id)["status"] == "completed", what="the new job")
    assert len(effects(db_url, "started")) == 2
    assert disagreements(db_url) == []


def _hooks_of(db_url: str, message_id: str) -> list[dict[str, object]]:
    return query(db_url, "SELECT created_at, payload -> 'args' AS args FROM control_plane.jobs "
                         "WHERE type = 'tests.callback_sink' AND payload -> 'args' -> 0 ->> 'message_id' = %s",
                 (message_id,))  # fmt: skip


def test_a_job_its_busy_worker_holds_unstarted_ends_cancelled_at_once_and_frees_its_key(
    db_url: str, tmp_path: Path
) -> None:
    # Given a worker with a single thread, busy with a job that waits for a gate, and holding
    # (prefetched into Dramatiq's work queue, no thread free to start it) a unique job behind it,
    # with failure hooks (one still in its consumer's buffer: the next test)
    long_job = actors.wait_for_gate.send("long")
    sink = "tests.callback_sink"
    with running_worker(db_url, tmp_path, threads=1):
        wait_for(lambda: job(db_url, long_job.message_id)["status"] == "running", what="the long job to run")
        queued = actors.noop.send_with_options(args=("fix me",), unique_key="sync:42", store_results=True,
                                               on_failure=sink, on_final_failure=sink)  # fmt: skip
        claimed = "SELECT claim_token IS NOT NULL AS claimed FROM control_plane.messages WHERE id = %s"
        wait_for(lambda: query(db_url, claimed, (queued.message_id,)) == [{"claimed": True}],
                 what="the worker to hold the unique job")  # fmt: skip
        # When an operator cancels it
        (row,) = query(db_url, "SELECT control_plane.cancel_job(%s) AS outcome", (queued.message_id,))
        assert row["outcome"] == "cancelling"
        # Then it ends cancelled while the long job still runs (not when a thread is free), no attempt
        # charged, its failure hooks sent with it, and its caller told
        wait_for(lambda: job(db_url, queued.message_id)["status"] == "cancelled", what="the cancel to take effect")
        assert job(db_url, long_job.message_id)["status"] == "running"
        assert job(db_url, queued.message_id)["attempts"] == 0
        assert len(_hooks_of(db_url, queued.message_id)) == 2  # on_failure, on_final_failure
        with pytest.raises(ResultFailure, match="cancelled by operator"):
            queued.get_result(block=True, timeout=10_000)
        # And its key is free: a corrected send makes a new job, which runs once the thread is free
        again = actors.noop.send_with_options(args=("fixed",), unique_key="sync:42")
        assert again.message_id != queued.message_id
        query(db_url, "INSERT INTO test_support.gates (name) VALUES ('long')")
        wait_for(lambda: job(db_url, again.message_id)["status"] == "completed", what="the corrected job")
    # And the cancelled one never ran; when the thread came to it, it skipped it unseen: no hook
    # sent again, its caller's answer not rewritten, its row as the cancel left it
    final = job(db_url, queued.message_id)
    assert (final["status"], final["attempts"], final["errors"]) == ("cancelled", 0, [])
    assert [str(e["message_id"]) for e in effects(db_url, "started")] == [long_job.message_id]
    assert len(_hooks_of(db_url, queued.message_id)) == 2
    with pytest.raises(ResultFailure, match="cancelled by operator"):
        queued.get_result()
    assert disagreements(db_url) == []
