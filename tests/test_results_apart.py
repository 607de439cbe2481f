"""Results written apart from their outcomes (``control_plane.results`` locked, a big value): a
failure is not stored once an operator retried its job (the caller of the new run waits for that
run), and a worker thread does not wait on an operator's lock on the table."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import psycopg2
import pytest
from dramatiq.results import ResultMissing

import tasks
from tasks.broker import PostgresBroker, _ResultWriter
from tasks.results import MAX_SETTLED_RESULT_BYTES
from tests import actors
from tests.support import claim_in_process, job, query, wait_for


def test_a_failure_written_apart_after_its_job_was_retried_is_not_stored(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job that failed for good, its failure stored with its outcome as the worker's Results
    # middleware stores it, and the thread that writes results apart slow to come to it
    message = actors.noop.send(1)
    consumer, held = claim_in_process()
    held.error_text = "RuntimeError: boom"
    held.fail()
    tasks.broker.get_results_backend().store_exception(held, RuntimeError("boom"), 60_000)
    gate = threading.Event()
    write = _ResultWriter._write

    def slow_write(self: Any, results: Any) -> None:
        gate.wait(30)
        write(self, results)

    monkeypatch.setattr(_ResultWriter, "_write", slow_write)
    # When its outcome is settled while another session holds control_plane.results (its
    # failure then goes to the writer)
    lock = psycopg2.connect(db_url)
    with contextlib.closing(lock), lock.cursor() as cur:
        cur.execute("LOCK TABLE control_plane.results IN SHARE MODE")
        consumer.nack(held)
        consumer._flush()
        lock.rollback()
    consumer.close()
    assert job(db_url, message.message_id)["status"] == "failed"
    # and an operator retries the job before the writer wrote it
    assert query(db_url, "SELECT control_plane.retry_job(%s) AS r", (message.message_id,))[0]["r"] is True
    gate.set()
    broker = tasks.broker
    assert isinstance(broker, PostgresBroker)
    wait_for(lambda: broker.results_writer._waiting == 0, what="the writer to be done")
    # Then the caller of the retried job is not told the old failure: it waits for the new run
    assert job(db_url, message.message_id)["status"] == "pending"
    with pytest.raises(ResultMissing):
        message.get_result()


def test_a_big_result_does_not_hold_its_worker_thread_while_the_results_table_is_locked(db_url: str) -> None:
    # Given a job that returned a result too big to go with its outcome, and control_plane.results
    # held by another session (an operator's LOCK TABLE, a VACUUM FULL)
    message = actors.noop.send(1)
    consumer, held = claim_in_process()
    big = "x" * (MAX_SETTLED_RESULT_BYTES + 1)
    lock = psycopg2.connect(db_url)
    with contextlib.closing(lock), lock.cursor() as cur:
        cur.execute("LOCK TABLE control_plane.results IN SHARE MODE")
        # When the worker thread stores it (the Results middleware's after_process_message)
        storing = threading.Thread(target=tasks.broker.get_results_backend().store_result, args=(held, big, 60_000),
                                   daemon=True)  # fmt: skip
        storing.start()
        storing.join(10)
        waited = storing.is_alive()
        lock.rollback()
    storing.join(30)
    # Then the thread went on (it waited as long as the lock was held), the result written once the table is free
    assert not waited, "the worker thread waited for the lock on control_plane.results"
    consumer.ack(held)
    consumer._flush()
    consumer.close()
    assert message.get_result(block=True, timeout=10_000) == big
