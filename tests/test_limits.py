"""Limits and scale: a settler with no connection slot, a reap backlog, a retry whose arguments JSON cannot hold."""

from __future__ import annotations

import uuid

import psycopg2
import psycopg2.extensions

import tasks
from tasks.broker import PostgresBroker
from tests import actors
from tests.support import job, query, wait_for


def test_a_queue_whose_settler_finds_no_connection_slot_still_writes_its_outcomes(db_url: str) -> None:
    # Given a worker role with slots for a consumer and the process's listener, none for a settler
    # (a process reading many queues whose consumers took the slots first: each settler connects
    # only at its queue's first settle)
    role = f"cp_t_lim_{uuid.uuid4().hex[:8]}"
    owner = query(db_url, "SELECT current_user AS u")[0]["u"]
    query(db_url, f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 2 IN ROLE {owner}")
    worker = PostgresBroker(url=psycopg2.extensions.make_dsn(db_url, user=role), settings=tasks.settings)
    try:
        sent = actors.noop.send("x")
        consumer = worker.consume("default", prefetch=1, timeout=100)
        wait_for(lambda: worker._notifier is not None and worker._notifier.listening.is_set(),
                 what="the listener")  # fmt: skip
        held = wait_for(lambda: next(consumer), what="the claim")
        # When its job ran and its outcome is handed over, and its consumer goes on
        consumer.ack(held)
        for _ in range(20):
            next(consumer)  # (timeout 100 ms each)
            if job(db_url, sent.message_id)["status"] == "completed":
                break
        # Then the outcome was written (on the consumer's own connection, if no other): the job
        # is not held, run and unrecorded, under leases its worker keeps extending
        assert job(db_url, sent.message_id)["status"] == "completed"
        assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages")[0]["n"] == 0
        consumer.close()
    finally:
        worker.close()
        query(db_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        wait_for(lambda: not query(db_url, "SELECT 1 FROM pg_stat_activity WHERE usename = %s", (role,)),
                 what="its sessions to end")  # fmt: skip
        query(db_url, f"DROP ROLE {role}")


def test_a_reap_that_found_a_full_batch_of_expired_leases_reaps_again_at_once(db_url: str) -> None:
    from tests.support import reap_at_once

    # Given a dead worker's claims, more than one reap takes (a process of many queues or threads:
    # 40 queues x 512 claims), their leases expired
    n = 2 * 1000 + 7  # (REAP takes 1,000 a statement)
    tasks.broker.enqueue_batch([actors.noop.message(i) for i in range(n)])
    query(db_url, "UPDATE control_plane.messages SET claim_token = gen_random_uuid(), worker = 'dead', "
                  "lease_expires_at = now() - interval '1 minute'")  # fmt: skip
    # And a live worker's consumer (of another queue), its reap due
    live = tasks.broker.consume("slow", prefetch=1, timeout=100)
    live._settler.stop()
    try:
        reap_at_once(live)
        # When it does its housekeeping three times in a row (its loop, with nothing else to do)
        for _ in range(3):
            live._housekeeping()
        # Then every lost claim is back in the queue: not a thousand per reap interval (5 s), the
        # last ones after lease + n / 1000 intervals (100 s more for 20,000 claims with one live process)
        left = query(db_url, "SELECT count(*) AS n FROM control_plane.messages WHERE claim_token IS NOT NULL")
        assert left == [{"n": 0}]
    finally:
        live.close()


def test_a_failed_job_that_changed_its_arguments_into_what_json_cannot_hold_is_not_held_for_good(
    db_url: str,
) -> None:
    import datetime

    import dramatiq

    # Given an actor that stamps the dict it was given (the message's own object) and then fails
    @dramatiq.actor(actor_name="tests.stamps_then_fails", queue_name="stamps", max_retries=1,
                    min_backoff=10, max_backoff=10)  # fmt: skip
    def stamps_then_fails(event: dict) -> None:
        event["seen_at"] = datetime.datetime.now(datetime.UTC)
        raise RuntimeError("the service is down")

    sent = stamps_then_fails.send({"order": 7})
    worker = dramatiq.Worker(tasks.broker, worker_threads=1, worker_timeout=50, queues={"stamps"})
    worker.start()
    try:
        # When a worker runs it: its retry's message must be written back to the queue
        # Then the job is retried (with the arguments it was sent with) and ends, failed: it is not
        # held, claimed and "running", under leases its worker extends for as long as it lives
        row = wait_for(lambda: (r := job(db_url, sent.message_id))["status"] in ("failed", "completed") and r,
                       timeout=20, what="the job to end")  # fmt: skip
    finally:
        worker.stop()
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert row["payload"]["args"] == [{"order": 7}]
