"""The broker's fast paths: prepared statements, keyless sends, middleware events that skip no-ops, the settler.

Each fast path must behave exactly like the slow one it replaces, and fall
back when the server takes its prepared statements away.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import dramatiq
import psycopg2
import pytest
from dramatiq.errors import ConnectionClosed
from dramatiq.results import Results

import tasks
from models import queries
from tasks.broker import SKIPPED_HEARTBEAT_RETRY_SECONDS, PostgresBroker, _claim_statement
from tasks.errors import Cancelled, ConfigurationError
from tasks.prepared import Statement
from tasks.settings import Settings
from tests import actors
from tests.support import ROOT, ReplyLosingProxy, claim_in_process, job, jobs_in, query, wait_for

#: The broker's module, for its constants and functions (``tasks.broker``, the attribute, is the broker).
BROKER_MODULE = sys.modules["tasks.broker"]


def _broker() -> PostgresBroker:
    assert isinstance(tasks.broker, PostgresBroker)
    return tasks.broker


def _prepared_names(conn: Any) -> set[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT name FROM pg_prepared_statements")
        return {row[0] for row in cur.fetchall()}


def test_a_statement_numbers_its_placeholders_once_each_and_keeps_their_casts() -> None:
    statement = Statement("s", "SELECT %(a)s::uuid[], %(b)s, %(a)s::uuid[] WHERE x LIKE 'a%%'")
    assert statement.params == ("a", "b")
    name = statement.name
    assert statement.prepare_sql == f"PREPARE {name} AS SELECT $1::uuid[], $2, $1::uuid[] WHERE x LIKE 'a%'"
    assert statement.execute_sql == f"EXECUTE {name} (%(a)s::uuid[], %(b)s)"


def test_a_statement_whose_text_changed_is_prepared_under_another_name() -> None:
    # Two releases sharing a pooler's server session must not run each other's text under one name
    one, same, other = Statement("s", "SELECT 1"), Statement("s", "SELECT 1"), Statement("s", "SELECT 2")
    assert one.name == same.name != other.name
    assert one.name.startswith("s_") and other.name.startswith("s_")


def test_sends_run_a_prepared_statement_on_the_pooled_connection(db_url: str) -> None:
    # When a keyless message, a keyed one and a batch are sent
    plain = actors.noop.send(1)
    keyed = actors.noop.send_with_options(args=(2,), unique_key="prepared-test")
    batch = _broker().enqueue_batch([actors.noop.message(3), actors.noop.message(4)])
    # Then all are stored, and the pooled connection holds the three prepared statements
    assert job(db_url, plain.message_id)["status"] == "pending"
    assert job(db_url, keyed.message_id)["unique_key"] == "prepared-test"
    assert [job(db_url, m.message_id)["payload"]["args"] for m in batch] == [[3], [4]]
    with _broker().connection() as conn:
        names = _prepared_names(conn)
    assert {"control_plane_enqueue", "control_plane_enqueue_plain", "control_plane_enqueue_one"} <= {
        name.rsplit("_", 1)[0] for name in names
    }


def test_a_connection_that_lost_its_prepared_statements_falls_back_to_plain_ones(db_url: str) -> None:
    # Given a pooled connection that prepared ENQUEUE, then lost it (what a pooler's DISCARD ALL does)
    actors.noop.send(1)
    with _broker().connection() as conn, conn.cursor() as cur:
        cur.execute("DEALLOCATE ALL")
    # When more messages are sent on it
    sent = [actors.noop.send(i) for i in range(3)]
    # Then every one is stored, and the connection no longer prepares anything
    assert all(job(db_url, m.message_id)["status"] == "pending" for m in sent)
    with _broker().connection() as conn:
        assert _prepared_names(conn) == set()


def test_prepared_statements_can_be_turned_off(db_url: str) -> None:
    broker = _broker()
    original = broker.settings
    broker.settings = dataclasses.replace(original, prepared_statements=False)
    try:
        with broker.connection() as conn, conn.cursor() as cur:
            cur.execute("DEALLOCATE ALL")
        message = actors.noop.send(1)
        assert job(db_url, message.message_id)["status"] == "pending"
        with broker.connection() as conn:
            assert _prepared_names(conn) == set()
    finally:
        broker.settings = original


def test_the_switch_reads_on_and_off_and_names_a_bad_value() -> None:
    assert Settings.from_env({"CONTROLPLANE_PREPARED_STATEMENTS": "off"}).prepared_statements is False
    assert Settings.from_env({"CONTROLPLANE_PREPARED_STATEMENTS": "ON"}).prepared_statements is True
    assert Settings.from_env({}).prepared_statements is True
    with pytest.raises(ConfigurationError, match="CONTROLPLANE_PREPARED_STATEMENTS"):
        Settings.from_env({"CONTROLPLANE_PREPARED_STATEMENTS": "maybe"})


def _listener(db_url: str) -> Any:
    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"LISTEN {queries.NOTIFY_CHANNEL}")
    return conn


def _notifications(listener: Any) -> list[str]:
    listener.poll()
    return [n.payload for n in listener.notifies]


def test_a_send_wakes_a_queue_only_while_a_consumer_of_it_waits(db_url: str) -> None:
    # PostgreSQL serializes the commits of notifying transactions: a NOTIFY nobody needs costs
    # concurrent senders (python -m bench.notify_cost)
    listener = _listener(db_url)
    consumer = None
    try:
        # Given no consumer: a send, then one in a caller's transaction (which always wakes)
        actors.noop.send(1)
        sender = psycopg2.connect(db_url)
        with tasks.enqueue_in(sender):
            actors.noop.send(2)
        sender.commit()
        sender.close()
        # Then only the second one woke the queue (notifications arrive in commit order)
        wait_for(lambda: _notifications(listener), what="the caller's send's NOTIFY")
        assert _notifications(listener) == ["default"]
        # Given a consumer that took both and now waits for work
        consumer = _broker().consume("default", prefetch=4, timeout=200)
        for _ in range(2):
            held = next(consumer)
            assert held is not None
            consumer.ack(held)
        assert next(consumer) is None
        listener.notifies.clear()
        # When a message is sent, the queue is woken, and the consumer gets it
        message = actors.noop.send(3)
        wait_for(lambda: _notifications(listener) == ["default"], what="the NOTIFY to the waiting consumer")
        held = wait_for(lambda: next(consumer), what="the consumer to take the message")
        assert held.message_id == message.message_id
    finally:
        listener.close()
        if consumer is not None:
            consumer.close()


def _unpolled_taker(monkeypatch: pytest.MonkeyPatch, timeout_ms: int) -> tuple[Any, list[Any], threading.Thread]:
    """A consumer of ``default`` that finds work only by claiming or by a NOTIFY (it never polls),
    and a thread, not started, that asks it for one message and appends what it got to the list."""
    consumer = _broker().consume("default", prefetch=1, timeout=timeout_ms)
    monkeypatch.setattr(consumer, "settings", dataclasses.replace(consumer.settings, poll_interval=3600))
    got: list[Any] = []
    return consumer, got, threading.Thread(target=lambda: got.append(next(consumer)))


def test_a_consumer_starting_to_wait_lets_a_send_in_flight_commit_then_takes_its_message(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a send in flight: its statement ran (it saw no consumer waiting, so it will not
    # NOTIFY) but has not committed
    message = actors.noop.message(1)
    sender = psycopg2.connect(db_url)
    with sender.cursor() as cur:
        cur.execute(queries.ENQUEUE_ONE, {
            "ids": message.message_id, "queues": "default", "actors": "tests.noop", "priorities": 0, "etas": None,
            "delays": None, "bodies": message.encode().decode(), "max_attempts": 3, "default_attempts": 20,
            "always_wake": False,
        })  # fmt: skip
    # and a consumer that only finds work by claiming or by a NOTIFY (no polling in this test)
    consumer, got, taker = _unpolled_taker(monkeypatch, timeout_ms=30000)
    try:
        # When the consumer finds nothing and starts waiting, while the send commits
        taker.start()
        waiting = (
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'controlplane-worker:default' AND wait_event = 'advisory'"
        )
        wait_for(lambda: query(db_url, waiting)[0]["n"] == 1, what="the consumer to wait for the send in flight")
        sender.commit()
        taker.join(timeout=60)
        # Then it got the message: it let the send commit before its last look
        assert [m.message_id for m in got] == [message.message_id]
    finally:
        sender.close()
        taker.join(timeout=60)
        consumer.close()


@pytest.mark.parametrize("cut_by", ["lock_timeout", "statement_timeout"])
def test_a_consumer_starting_to_wait_gives_up_on_a_slow_send_and_still_hears_of_later_ones(
    db_url: str, monkeypatch: pytest.MonkeyPatch, cut_by: str
) -> None:
    if cut_by == "statement_timeout":  # a DBA's, shorter than the wait (ARM_WAIT_TIMEOUT_MS)
        monkeypatch.setattr(queries, "ARM_WAIT", "SET LOCAL statement_timeout = 50;\n" + queries.ARM_WAIT)
    # Given a send that is slow to commit (its transaction holds the sending lock of the queue)
    slow = psycopg2.connect(db_url)
    with slow.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock_shared(%s, hashtext('default'))", (queries.SENDING_LOCK,))
    consumer, first, taker = _unpolled_taker(monkeypatch, timeout_ms=1000)
    try:
        # When the consumer finds nothing and starts waiting
        taker.start()
        taker.join(timeout=30)
        # Then it did not wait for that send to end, and counts as waiting: the next send wakes it
        assert first == [None]
        message = actors.noop.send(1)
        held = wait_for(lambda: next(consumer), what="the consumer to be woken by the next send")
        assert held.message_id == message.message_id
    finally:
        slow.close()
        taker.join(timeout=60)
        consumer.close()


def test_wake_only_waiting_can_be_turned_off(db_url: str) -> None:
    assert Settings.from_env({"CONTROLPLANE_WAKE_ONLY_WAITING": "off"}).wake_only_waiting is False
    assert Settings.from_env({}).wake_only_waiting is True
    broker = _broker()
    original = broker.settings
    broker.settings = dataclasses.replace(original, wake_only_waiting=False)
    listener = _listener(db_url)
    try:
        actors.noop.send(1)
        wait_for(lambda: _notifications(listener) == ["default"], what="a NOTIFY with no consumer waiting")
    finally:
        broker.settings = original
        listener.close()


def test_a_send_inside_the_callers_transaction_prepares_nothing_there(db_url: str) -> None:
    conn = psycopg2.connect(db_url)
    try:
        with tasks.enqueue_in(conn):
            message = actors.noop.send(1)
        assert _prepared_names(conn) == set()
        conn.rollback()
    finally:
        conn.close()
    assert query(db_url, "SELECT id FROM control_plane.jobs WHERE id = %s", (message.message_id,)) == []


@pytest.mark.parametrize("how", ["alone", "in-a-batch", "in-a-transaction"])
def test_sending_the_same_message_again_through_the_keyless_path_resets_its_job(db_url: str, how: str) -> None:
    # Given a job that ran and failed
    message = actors.noop.send(1)
    query(
        db_url,
        "UPDATE control_plane.jobs SET status = 'failed', completed_at = now() WHERE id = %s",
        (message.message_id,),
    )
    query(db_url, "DELETE FROM control_plane.messages WHERE id = %s", (message.message_id,))
    # When the same message is enqueued again (as a re-delivery does), alone, with another one,
    # or in a caller's transaction that goes on after it, into another queue and at another priority
    again = message.copy(queue_name="slow", options={**message.options, "priority": 7})
    if how == "in-a-batch":
        _broker().enqueue_batch([again, actors.noop.message(2)])
    elif how == "alone":
        _broker().enqueue(again)
    else:
        conn = psycopg2.connect(db_url)
        try:
            with tasks.enqueue_in(conn):
                _broker().enqueue(again)
            with conn.cursor() as cur:  # (a failed statement would have aborted the transaction here)
                cur.execute("CREATE TABLE after_the_send (id int)")
            conn.commit()
        finally:
            conn.close()
    # Then its one job is pending again, in the message's queue, and its message is back in that queue
    row = job(db_url, message.message_id)
    assert (row["status"], row["completed_at"], row["queue"], row["priority"]) == ("pending", None, "slow", 7)
    sent = query(db_url, "SELECT queue, priority FROM control_plane.messages WHERE id = %s", (message.message_id,))
    assert sent == [{"queue": "slow", "priority": 7}]


class _Counting(dramatiq.Middleware):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[Any], delay: int | None) -> None:
        self.seen.append(message.message_id)


def test_middleware_added_after_the_first_event_still_sees_the_next_ones(db_url: str) -> None:
    broker = _broker()
    actors.noop.send(0)  # the event tables are built here
    counting = _Counting()
    broker.add_middleware(counting)
    try:
        message = actors.noop.send(1)
        assert counting.seen == [message.message_id]
    finally:
        broker.middleware.remove(counting)
    actors.noop.send(2)
    assert len(counting.seen) == 1


def test_a_method_set_on_a_middleware_instance_is_called(db_url: str) -> None:
    # Given a middleware whose class has no after_enqueue, after the event table was built
    broker = _broker()
    actors.noop.send(0)
    results = next(m for m in broker.middleware if isinstance(m, Results))
    assert "after_enqueue" not in type(results).__dict__
    calls: list[str] = []
    # When a test double is set on the instance
    results.after_enqueue = lambda _broker, message, _delay: calls.append(message.message_id)  # type: ignore[method-assign]
    try:
        message = actors.noop.send(1)
    finally:
        del results.after_enqueue
    # Then it is called
    assert calls == [message.message_id]


@contextlib.contextmanager
def _counting_after_a_first_send() -> Iterator[_Counting]:
    """A ``_Counting`` middleware on the broker, after one send built the event tables; removed after."""
    counting = _Counting()
    _broker().add_middleware(counting)
    try:
        actors.noop.send(0)
        yield counting
    finally:
        _broker().middleware.remove(counting)


def test_a_test_double_for_a_hook_the_class_implements_is_called_instead_then_the_hook_again(db_url: str) -> None:
    # Given a middleware whose class implements before_enqueue, after the event table was built
    with _counting_after_a_first_send() as counting:
        # When a test double replaces its hook on the instance, and is then taken away
        doubled: list[str] = []
        counting.before_enqueue = lambda _broker, message, _delay: doubled.append(message.message_id)  # type: ignore[method-assign]
        try:
            during = actors.noop.send(1)
        finally:
            del counting.before_enqueue
        after = actors.noop.send(2)
    # Then the double saw the send made while it was there, and the class's hook every other one
    assert doubled == [during.message_id]
    assert during.message_id not in counting.seen
    assert counting.seen[-1] == after.message_id


def test_a_hook_patched_on_its_class_after_the_first_event_is_the_one_called(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a middleware class's hook, after the event table was built
    with _counting_after_a_first_send():
        # When the class's hook is patched
        patched: list[str] = []
        monkeypatch.setattr(
            _Counting, "before_enqueue", lambda self, _broker, message, _delay: patched.append(message.message_id)
        )
        message = actors.noop.send(1)
    # Then the patched hook ran for the next send
    assert patched == [message.message_id]


def test_a_computed_unique_key_stays_off_the_callers_message_and_the_copies_it_makes(db_url: str) -> None:
    # Given an actor whose jobs are keyed on their argument, and a message built for "a"
    @dramatiq.actor(actor_name="tests.keyed_by_argument", unique_key_from=lambda args, kwargs: f"keyed:{args[0]}")
    def keyed(value: str) -> None:
        del value

    first = keyed.message("a")
    # When it is sent in a batch, then a copy of it for "b"
    (sent,) = _broker().enqueue_batch([first])
    second = first.copy(args=("b",), message_id=str(uuid.uuid4()))
    (sent_second,) = _broker().enqueue_batch([second])
    # Then the caller's message carries no key computed for it, and the copy got its own job and key
    assert "unique_key" not in first.options
    assert sent_second.message_id == second.message_id != sent.message_id
    assert [job(db_url, m.message_id)["unique_key"] for m in (sent, sent_second)] == ["keyed:a", "keyed:b"]


def test_a_unique_key_is_a_string_or_an_integer_and_a_broken_key_function_fails_the_send(db_url: str) -> None:
    from tasks.errors import InvalidUniqueKey

    # Given actors keyed by an integer argument, by a function that raises, and by a float
    @dramatiq.actor(actor_name="tests.keyed_by_number", unique_key_from=lambda args, kwargs: args[0])
    def by_number(value: Any) -> None:
        del value

    @dramatiq.actor(actor_name="tests.keyed_by_missing", unique_key_from=lambda args, kwargs: kwargs["tenant"])
    def by_missing(value: Any) -> None:
        del value

    # When each is sent twice
    first, again = by_number.send(7), by_number.send(7)
    explicit = [actors.noop.send_with_options(args=(n,), unique_key=42) for n in range(2)]
    # Then integer keys hold as their strings do: the second send of each returns the first job
    assert again.message_id == first.message_id and explicit[1].message_id == explicit[0].message_id
    assert job(db_url, first.message_id)["unique_key"] == "7"
    # And a key function that raises, or a key that is neither, fails the send, naming it, and stores nothing
    before = len(query(db_url, "SELECT id FROM control_plane.jobs"))
    with pytest.raises(InvalidUniqueKey, match="unique_key_from raised KeyError"):
        by_missing.send(1)
    with pytest.raises(InvalidUniqueKey, match=r"not 1\.5"):
        by_number.send(1.5)
    with pytest.raises(InvalidUniqueKey, match="not ''"):
        actors.noop.send_with_options(args=(1,), unique_key="")
    # and so does a key longer than its index can hold (it failed with PostgreSQL's "index row
    # size" error, and took its batch with it), counted in bytes
    with pytest.raises(InvalidUniqueKey, match="unique key is 2,001 bytes long, past the 2,000"):
        actors.noop.send_with_options(args=(1,), unique_key="k" * 2001)
    with pytest.raises(InvalidUniqueKey, match="unique key is 2,001 bytes long"):
        actors.noop.send_with_options(args=(1,), unique_key=10**2000)
    with pytest.raises(InvalidUniqueKey, match="an integer of more than 2,000 digits"):
        actors.noop.send_with_options(args=(1,), unique_key=10**5000)
    with pytest.raises(InvalidUniqueKey, match="unique key is 2,001 bytes long"):
        tasks.broker.enqueue_batch([actors.noop.message(1), actors.noop.message_with_options(
            args=(2,), unique_key="é" * 1000 + "k")])  # fmt: skip
    assert len(query(db_url, "SELECT id FROM control_plane.jobs")) == before
    # And a key of 2,000 bytes holds as any other
    longest = [actors.noop.send_with_options(args=(n,), unique_key="k" * 2000).message_id for n in range(2)]
    assert longest[0] == longest[1]


def test_the_broker_does_not_call_the_mirror_hooks_its_own_statements_cover(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.middleware.jobs_mirror import JobsMirror

    # Given JobsMirror hooks that would record being called, on a broker that has built no event table
    called: list[str] = []
    for hook in ("before_process_message", "after_enqueue", "after_ack", "after_nack", "after_process_message"):
        monkeypatch.setattr(JobsMirror, hook, lambda self, *args, _hook=hook, **kwargs: called.append(_hook))
    broker = PostgresBroker(url=db_url, settings=tasks.settings, middleware=[JobsMirror()])
    try:
        proxy = dramatiq.MessageProxy(actors.noop.message(1))
        # When the events of a message's life are emitted
        broker.emit_after("enqueue", proxy, None)
        broker.emit_before("process_message", proxy)
        broker.emit_after("process_message", proxy, result=None)
        broker.emit_after("ack", proxy)
        broker.emit_after("nack", proxy)
    finally:
        broker.close()
    # Then only the hook that hands the broker something (the result) ran: ENQUEUE, the start
    # marks and SETTLE write the rest themselves
    assert called == ["after_process_message"]


def test_claims_run_from_a_cached_plan_after_a_few_runs(db_url: str) -> None:
    # Given ten messages and a consumer that takes one at a time
    sent = [actors.noop.send(i) for i in range(10)]
    consumer = _broker().consume("default", prefetch=1, timeout=2000)
    try:
        # When it claims and acks each of them
        received = []
        for _ in sent:
            message = next(consumer)
            assert message is not None
            received.append(message.message_id)
            consumer.ack(message)
        # Then PostgreSQL stopped planning the claim: it runs a generic (cached) plan
        with consumer.conn.cursor() as cur:
            cur.execute(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE name = %s",
                (_claim_statement(1).name,),
            )
            ((generic, custom),) = cur.fetchall()
    finally:
        consumer.close()
    assert sorted(received) == sorted(m.message_id for m in sent)
    assert generic >= 4 and custom <= 6
    assert all(job(db_url, m.message_id)["status"] == "completed" for m in sent)


def test_a_consumer_restarted_after_an_error_gives_back_nothing_its_worker_threads_hold(db_url: str) -> None:
    # Given a consumer that claimed two messages and handed one to a worker thread
    sent = [actors.noop.send(i).message_id for i in range(2)]
    consumer = _broker().consume("default", prefetch=2, timeout=1000)
    handed = next(consumer)
    assert handed is not None and _held(db_url) == 2
    _broker().emit_before("process_message", handed)  # the worker thread starts it

    # When its next call fails with an unexpected error, and Dramatiq closes it to start another
    def broken() -> None:
        raise RuntimeError("a bug in a heartbeat")

    consumer._next = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        next(consumer)
    consumer.close()
    # Then both messages are still claimed by this worker: neither went back to run twice elsewhere
    assert _held(db_url) == 2
    assert job(db_url, handed.message_id)["status"] in ("pending", "running")
    # And the new consumer yields the one not handed over yet, and settles both
    again = _broker().consume("default", prefetch=2, timeout=1000)
    try:
        other = next(again)
        assert other is not None and {handed.message_id, other.message_id} == set(sent)
        again.ack(handed)
        _run(again, other)
        wait_for(lambda: jobs_in(db_url, sent, "completed"), what="both jobs to be settled by the new consumer")
    finally:
        again.close()
    assert [job(db_url, m)["attempts"] for m in sent] == [1, 1]
    assert _held(db_url) == 0


def test_a_consumer_closed_without_an_error_gives_back_what_it_holds(db_url: str) -> None:
    # Given a consumer holding two claimed messages, one handed over and not started
    actors.noop.send(1), actors.noop.send(2)
    consumer = _broker().consume("default", prefetch=2, timeout=1000)
    assert next(consumer) is not None and _held(db_url) == 2
    # When it is closed (a worker's shutdown, or a caller's own consumer)
    consumer.close()
    # Then both went back to the queue at once, for any worker to take
    assert _held(db_url) == 0


def test_claim_sizes_are_exact_up_to_64_then_powers_of_two() -> None:
    from tasks.broker import _claim_size

    assert [_claim_size(n) for n in (1, 8, 16, 64)] == [1, 8, 16, 64]
    assert [_claim_size(n) for n in (65, 127, 128, 200, 1000)] == [64, 64, 128, 128, 512]


def test_outcomes_survive_the_settler_losing_its_connection(db_url: str, caplog: pytest.LogCaptureFixture) -> None:
    # Given a consumer that settled one message, so its settler holds a connection
    first, second = actors.noop.send(1), actors.noop.send(2)
    consumer = _broker().consume("default", prefetch=1, timeout=2000)
    try:
        message = next(consumer)
        assert message is not None
        consumer.ack(message)
        wait_for(lambda: job(db_url, message.message_id)["status"] == "completed", what="the first ack")
        # When that connection is cut, and the next message is acked
        cut = query(
            db_url,
            "SELECT pg_terminate_backend(pid) AS cut FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'controlplane-settle:default'",
        )
        assert [row["cut"] for row in cut] == [True]
        gone = (
            "SELECT count(*) AS n FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'controlplane-settle:default'"
        )
        wait_for(lambda: query(db_url, gone)[0]["n"] == 0, what="the settler's session to end")
        message = next(consumer)
        assert message is not None
        with caplog.at_level("WARNING", logger="tasks.broker"):
            consumer.ack(message)
            # Then the settler reconnects and writes it: the job completes, its message leaves the queue
            wait_for(lambda: job(db_url, message.message_id)["status"] == "completed", what="the ack after the cut")
        # And it saw the idle connection was gone before using it: no failed write, no warning
        assert not [r for r in caplog.records if "settling outcomes" in r.getMessage()]
    finally:
        consumer.close()
    assert {first.message_id, second.message_id} == {
        row["id"] for row in query(db_url, "SELECT id::text FROM control_plane.jobs WHERE status = 'completed'")
    }
    assert query(db_url, "SELECT id FROM control_plane.messages") == []


@pytest.mark.parametrize("batch", [1, 3, 0], ids=["send", "batch", "keyed"])
def test_a_send_whose_reply_is_lost_after_its_commit_does_not_requeue_the_claimed_job(
    db_url: str, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    from tasks.broker import _ENQUEUE, _ENQUEUE_ONE, _ENQUEUE_PLAIN

    statement = {1: _ENQUEUE_ONE, 3: _ENQUEUE_PLAIN, 0: _ENQUEUE}[batch]
    real = statement.execute
    calls = []

    def commits_then_loses_the_reply(cur: Any, params: dict[str, Any], *, prepare: bool = True) -> None:
        calls.append(params)
        real(cur, params, prepare=prepare)  # autocommit: committed
        if len(calls) == 1:
            # a worker claims the new jobs before the lost reply is noticed
            query(db_url, "UPDATE control_plane.messages SET claim_token = gen_random_uuid(), worker = 'w', "
                          "lease_expires_at = now() + interval '1 minute'")
            raise psycopg2.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(statement, "execute", commits_then_loses_the_reply)
    # When a send commits and its connection is lost before the reply
    if batch == 1:
        sent = [actors.noop.send(1)]
    elif batch == 0:  # with a unique key: the statement that reports duplicates
        sent = [actors.noop.send_with_options(args=(1,), unique_key="lost-reply")]
    else:
        sent = _broker().enqueue_batch([actors.noop.message(i) for i in range(batch)])
    # Then the send succeeds without sending again what it finds stored: the claims hold
    assert len(calls) == 1
    rows = query(db_url, "SELECT id::text, claim_token IS NOT NULL AS claimed FROM control_plane.messages")
    assert sorted(r["id"] for r in rows) == sorted(m.message_id for m in sent)
    assert all(r["claimed"] for r in rows)
    # And a second try that finds only some stored sends the others (a batch cut short)
    query(db_url, "DELETE FROM control_plane.jobs WHERE id = %s", (sent[0].message_id,))
    from tasks.broker import _not_stored

    with psycopg2.connect(db_url) as conn, conn.cursor() as cur:
        rows_in = {"ids": [m.message_id for m in sent], "bodies": [m.encode().decode() for m in sent]}
        assert _not_stored(cur, rows_in)["ids"] == [sent[0].message_id]
    conn.close()


def test_an_ack_after_its_consumer_failed_is_written_by_its_settler_or_when_the_broker_closes(db_url: str) -> None:
    # Given a consumer that lost its connection and was closed by Dramatiq (which starts the
    # next one only after a delay, and only once the database answers), while worker threads
    # still run the messages it handed over
    sent = [actors.noop.send(i) for i in range(2)]
    consumer = _broker().consume("default", prefetch=2, timeout=1000)
    first, second = next(consumer), next(consumer)
    assert first is not None and second is not None
    consumer._failed = True
    consumer.close()
    # When a thread finishes one
    consumer.ack(first)
    # Then the queue's settler, which outlived the consumer, writes it now: another worker,
    # back first after a crash, does not find it unwritten and run it again
    wait_for(lambda: job(db_url, first.message_id)["status"] == "completed", what="the ack, written by the settler")
    # And the next consumer takes that settler over
    successor = _broker().consume("default", prefetch=1, timeout=1000)
    assert successor._settler is consumer._settler and successor._settler.is_alive()
    successor._failed = True
    successor.close()
    # And when the thread finishes the other during the shutdown, with no settler left (say), and
    # the worker process closes the broker (as the dramatiq command does after stopping the worker)
    successor._settler.stop()
    consumer.ack(second)
    assert job(db_url, second.message_id)["status"] != "completed"
    _broker().close()
    # Then that ack is written then: every job completed, and nothing is left to run again
    assert {job(db_url, m.message_id)["status"] for m in sent} == {"completed"}
    assert query(db_url, "SELECT id FROM control_plane.messages") == []


def test_prefetched_messages_that_cannot_be_given_back_do_not_break_the_shutdown(db_url: str) -> None:
    # Given a consumer holding a prefetched message whose row another transaction has locked
    actors.noop.send(1)
    consumer = _broker().consume("default", prefetch=1, timeout=1000)
    other = psycopg2.connect(db_url)
    try:
        message = next(consumer)
        assert message is not None
        with other.cursor() as cur:
            cur.execute("SELECT 1 FROM control_plane.messages FOR UPDATE")
        with consumer.conn.cursor() as cur:
            cur.execute("SET lock_timeout = '100ms'")
        # When the worker gives it back at shutdown and the release times out
        consumer.requeue([message])  # Then that is no error for Dramatiq's Worker.stop to trip on
    finally:
        other.rollback()
        other.close()
        consumer.close()
    # and its lease, left to expire, is still the broker's to reap
    assert _held(db_url) == 1


def test_a_heartbeat_skips_a_message_another_statement_holds_instead_of_waiting_for_it(db_url: str) -> None:
    # Given a consumer holding two messages, one of them locked by another transaction (as its
    # settler's statement locks the messages it writes: waiting on it could deadlock)
    first, second = actors.noop.send(1), actors.noop.send(2)
    consumer = _broker().consume("default", prefetch=2, timeout=1000)
    other = psycopg2.connect(db_url)
    try:
        assert next(consumer) is not None and next(consumer) is not None
        leases = "SELECT id::text, lease_expires_at FROM control_plane.messages"
        before = {r["id"]: r["lease_expires_at"] for r in query(db_url, leases)}
        with other.cursor() as cur:
            cur.execute("SELECT 1 FROM control_plane.messages WHERE id = %s FOR UPDATE", (first.message_id,))
        # When the consumer heartbeats (a wait would end in an error here, not hang the test)
        with consumer.conn.cursor() as cur:
            cur.execute("SET lock_timeout = '10s'")
        consumer._next_heartbeat = 0.0
        consumer._housekeeping()
        # Then it extended the other lease at once and left the locked one for its next heartbeat,
        # which comes soon, not a whole interval later
        after = {r["id"]: r["lease_expires_at"] for r in query(db_url, leases)}
        assert after[second.message_id] > before[second.message_id]
        assert after[first.message_id] == before[first.message_id]
        assert consumer._next_heartbeat <= time.monotonic() + SKIPPED_HEARTBEAT_RETRY_SECONDS
        # When the lock is gone, that heartbeat extends it, and the next one is an interval away
        other.rollback()
        consumer._next_heartbeat = 0.0
        consumer._housekeeping()
        assert query(db_url, leases + " WHERE id = %s", (first.message_id,))[0]["lease_expires_at"] > before[
            first.message_id
        ]
        assert consumer._next_heartbeat > time.monotonic() + SKIPPED_HEARTBEAT_RETRY_SECONDS
    finally:
        other.close()
        consumer.close()


@pytest.mark.parametrize(
    ("sqlstate", "connection_gone", "transient"),
    [
        ("40P01", False, True),  # deadlock_detected
        ("40001", False, True),  # serialization_failure
        ("57014", False, False),  # query_canceled (statement_timeout)
        ("55P03", False, False),  # lock_not_available (lock_timeout)
        ("53100", False, False),  # disk_full
        ("57P01", True, False),  # admin_shutdown
        ("08006", True, False),  # connection_failure
    ],
)
def test_only_errors_that_end_the_session_are_taken_for_a_lost_connection(
    db_url: str, sqlstate: str, connection_gone: bool, transient: bool
) -> None:
    # psycopg2 files all of these under OperationalError; taking a deadlock for a lost connection
    # restarted the consumer, and the pool threw a good connection away
    from tasks import db

    conn = psycopg2.connect(db_url)
    conn.autocommit = True
    try:
        # Given the error as the server sends it
        with pytest.raises(psycopg2.Error) as raised, conn.cursor() as cur:
            cur.execute(f"DO $$ BEGIN RAISE EXCEPTION 'test' USING ERRCODE = '{sqlstate}'; END $$")
        assert raised.value.pgcode == sqlstate
        # Then it is sorted as what it means
        assert db.is_connection_error(raised.value) is connection_gone
        assert db.is_transient(raised.value) is transient
    finally:
        conn.close()


def test_a_refused_connection_is_a_lost_connection() -> None:
    from tasks import db

    with pytest.raises(psycopg2.OperationalError) as refused:
        psycopg2.connect("postgresql://root@127.0.0.1:1/nothing", connect_timeout=5)
    assert db.is_connection_error(refused.value)
    assert not db.is_transient(refused.value)


def test_a_statement_the_server_rolled_back_does_not_restart_the_consumer(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer whose next heartbeat the server rolls back to break a deadlock
    message = actors.noop.send(1)
    consumer = _broker().consume("default", prefetch=1, timeout=1000)
    try:
        real = consumer._housekeeping
        calls = []

        def deadlocked_once() -> None:
            calls.append(1)
            if len(calls) == 1:
                with consumer.conn.cursor() as cur:
                    cur.execute("DO $$ BEGIN RAISE EXCEPTION 'deadlock' USING ERRCODE = '40P01'; END $$")
            real()

        monkeypatch.setattr(consumer, "_housekeeping", deadlocked_once)
        conn = consumer.conn
        # When Dramatiq asks it for a message, twice
        first = next(consumer)
        second = next(consumer)
        assert consumer.conn is conn
        # Then the first call gave nothing (Dramatiq would otherwise restart the consumer and release
        # what it holds) and the second, on the same connection, the message
        assert first is None
        assert second is not None and second.message_id == message.message_id
    finally:
        consumer.close()


def _commit_while_the_settler_waits(db_url: str, other: Any, statement: str) -> None:
    """Once the default queue's settler waits on a lock ``other`` holds, commit ``other`` and
    wait for the settler's ``statement`` to finish."""
    settler = (
        "SELECT state, wait_event_type FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'controlplane-settle:default'"
    )
    wait_for(lambda: query(db_url, settler) == [{"state": "active", "wait_event_type": "Lock"}], what="the wait")
    other.commit()
    wait_for(lambda: query(db_url, settler)[0]["state"] == "idle", what=statement)


def test_a_start_mark_racing_the_reaper_leaves_the_job_pending_and_its_message_back_in_the_queue(
    db_url: str,
) -> None:
    # Given a claimed message whose lease expired, and a reaper that has taken it back but not committed
    message = actors.noop.send("late")
    consumer = _broker().consume("default", prefetch=1, timeout=1000)
    reaper = psycopg2.connect(db_url)
    try:
        held = next(consumer)
        assert held is not None
        query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 minute'")
        with reaper.cursor() as cur:
            cur.execute(queries.REAP, {"forget_after": 3600})
            assert cur.fetchone()[0] == 1
        # When the worker starts the job anyway, and its settler writes the start mark
        # while the reaper commits
        _broker().emit_before("process_message", held)
        _commit_while_the_settler_waits(db_url, reaper, "the start mark's statement")
        # Then the reaper's outcome stands: the job is pending again, its lost attempt counted,
        # and its message is in the queue for any worker
        row = job(db_url, message.message_id)
        assert (row["status"], row["attempts"]) == ("pending", 1)
        assert "lease expired" in row["last_error"]
        assert query(db_url, "SELECT claim_token FROM control_plane.messages") == [{"claim_token": None}]
    finally:
        reaper.close()
        consumer.close()


def test_a_malformed_message_whose_rejection_fails_does_not_orphan_the_rest_of_its_claim(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a good message behind a malformed one (a body that is not a message)
    query(db_url, "INSERT INTO control_plane.messages (id, queue, actor, body, eta) "
                  "VALUES (%s, 'default', '?', %s, now() - interval '1 minute')",
          (str(uuid.uuid4()), psycopg2.Binary(b"\xff not json")))
    good = actors.noop.send(1)
    consumer = _broker().consume("default", prefetch=2, timeout=1000)
    try:
        # When both are claimed at once and writing the rejection fails
        def fails(*args: Any) -> None:
            raise psycopg2.OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(consumer, "_reject_malformed", fails)
        with pytest.raises(psycopg2.OperationalError):
            consumer._claim(2)
        # Then the good one is held all the same: its lease is extended and it will be handed over
        assert list(consumer.state.inflight) == [good.message_id]
        assert [p.message_id for p in consumer.state.buffer] == [good.message_id]
    finally:
        consumer.close()


def test_an_outcome_whose_result_the_server_refuses_is_written_without_it(db_url: str) -> None:
    # Given a held message whose result slipped past the checks with a value jsonb refuses
    message = actors.noop.send(1)
    consumer = _broker().consume("default", prefetch=1, timeout=1000)
    try:
        held = next(consumer)
        assert held is not None
        held.result_json = '"name-\\udcff"'
        # When it is acked (the settle fails on the value)
        consumer.ack(held)
        # Then it is written again without its result: the job completes, nothing stays stuck
        wait_for(lambda: job(db_url, message.message_id)["status"] == "completed", what="the ack")
    finally:
        consumer.close()
    assert job(db_url, message.message_id)["result"] is None
    assert query(db_url, "SELECT id FROM control_plane.messages") == []


def test_a_cancel_committed_while_a_retry_is_being_written_keeps_the_job_out_of_the_queue(db_url: str) -> None:
    # Given a worker holding a message, and an operator's cancel_job not yet committed
    message = actors.noop.send("cancel me")
    consumer = _broker().consume("default", prefetch=1, timeout=1000)
    operator = psycopg2.connect(db_url)
    try:
        held = next(consumer)
        assert held is not None
        with operator.cursor() as cur:
            cur.execute("SELECT control_plane.cancel_job(%s)", (message.message_id,))
            assert cur.fetchone()[0] == "cancelling"
        # When the attempt fails and its retry is written while the cancel commits
        held.retry_delay_ms = 0
        consumer.ack(held)
        _commit_while_the_settler_waits(db_url, operator, "the retry's statement")
        # Then the message did not go back to the queue for another worker: the job ends cancelled
        final = wait_for(lambda: job(db_url, message.message_id)["status"] == "cancelled"
                         and job(db_url, message.message_id), what="the cancel")
        assert final["last_error"] == "cancelled by operator"
        assert query(db_url, "SELECT id FROM control_plane.messages") == []
    finally:
        operator.close()
        consumer.close()


def test_a_notify_heard_while_the_consumer_was_busy_wakes_it_at_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an idle consumer, and a send NOTIFYing its queue while the consumer is not waiting
    # (the process's notifier hears it, as when it arrives while a claim or a heartbeat runs)
    consumer = _broker().consume("default", prefetch=1, timeout=1000)
    try:
        assert next(consumer) is None  # nothing to do: it claimed nothing and waited
        actors.noop.send(1)
        wait_for(lambda: consumer.state.notified, what="the notifier hearing the NOTIFY")
        # When it waits
        woken: list[Any] = []
        real_select = BROKER_MODULE.select.select

        here = threading.get_ident()

        def recording_select(r: Any, w: Any, x: Any, timeout: float | None = None) -> Any:
            # (the module's select: the process's notifier thread may call it meanwhile, untimed)
            got = real_select(r, w, x, timeout)
            if threading.get_ident() == here:
                woken.append(got[0])
            return got

        monkeypatch.setattr(BROKER_MODULE.select, "select", recording_select)
        consumer._wait(30.0)
        # Then its pipe was readable already (it did not sleep), and it knows the queue has work
        assert woken == [[consumer.state.wake_r]]
        assert consumer._notified
    finally:
        consumer.close()


def test_one_connection_per_process_listens_for_every_queue_and_comes_back_when_cut(db_url: str) -> None:
    broker = _broker()
    # Given consumers of three queues in one process
    consumers = [broker.consume(queue, prefetch=1, timeout=200) for queue in ("default", "slow", "other")]
    try:
        for consumer in consumers:
            assert next(consumer) is None
        listening = "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%%'"
        # Then one connection listens, not one per queue (each listener costs every notifying send)
        (listener,) = wait_for(lambda: query(db_url, listening) or None, what="a listening connection")
        # And when the server ends that session
        query(db_url, "SELECT pg_terminate_backend(%s)", (listener["pid"],))
        # Then another connection listens, and a send to each queue wakes its consumer
        wait_for(lambda: [r for r in query(db_url, listening) if r["pid"] != listener["pid"]] or None,
                 what="listening again")  # fmt: skip
        for consumer in consumers:
            with consumer.state.lock:
                consumer.state.notified = False
        actors.noop.send(1)
        wait_for(lambda: consumers[0].state.notified, what="the wake-up of the default queue")
    finally:
        for consumer in consumers:
            consumer.close()


def test_the_listening_connection_outlives_a_dbas_idle_session_timeout_and_closes_its_pipe(db_url: str) -> None:
    # Given a DBA's idle_session_timeout of 1 s on the database (meant for the apps' idle sessions)
    name = query(db_url, "SELECT current_database() AS d")[0]["d"]
    query(db_url, f"ALTER DATABASE {name} SET idle_session_timeout = '1s'")
    broker = _broker()
    consumer = broker.consume("default", prefetch=1, timeout=100)
    notifier = broker._notifier
    assert notifier is not None
    pipe = {fd: os.fstat(fd).st_ino for fd in (notifier._stop_r, notifier._stop_w)}
    try:
        assert next(consumer) is None
        listening = ("SELECT pid FROM pg_stat_activity WHERE application_name = 'controlplane-worker:listen' "
                     "AND datname = current_database()")  # (another test's worker may listen elsewhere)
        (listener,) = wait_for(lambda: query(db_url, listening) or None, what="a listening connection")
        # When the consumer's own connection has sat idle long enough to be ended by it (the
        # listening one has been idle longer: it listened before the consumer's last statement)
        own = consumer.conn.get_backend_pid()
        wait_for(lambda: not query(db_url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (own,)) or None,
                 what="the consumer's idle connection ended by the timeout")  # fmt: skip
        # Then the listening connection is the same one: it is not cut and reopened over and over
        assert query(db_url, listening) == [listener]
    finally:
        consumer.close()
        broker.close()
    # And a stopped notifier leaves no file descriptor behind (a broker reconfigured per test leaked two):
    # each is closed, or is another file now
    for fd, inode in pipe.items():
        try:
            assert os.fstat(fd).st_ino != inode, fd
        except OSError:
            pass


def _held(db_url: str) -> int:
    return int(query(db_url, "SELECT count(*) AS n FROM control_plane.messages WHERE claim_token IS NOT NULL")[0]["n"])


def _run(consumer: Any, message: Any, seconds_ago: float = 0.0) -> None:
    """What a worker thread does with a message: start it (the broker's event), then ack it."""
    _broker().emit_before("process_message", message)
    message.started_mono -= seconds_ago
    consumer.ack(message)


def test_a_consumer_holds_more_messages_while_its_jobs_are_short_and_fewer_when_they_are_long(db_url: str) -> None:
    # Given 40 waiting messages and a consumer with Dramatiq's prefetch of 2
    for i in range(40):
        actors.noop.send(i)
    consumer = _broker().consume("default", prefetch=2, timeout=1000)
    claims: list[int] = []  # how many messages each claim took
    claim = consumer._claim

    def counted(limit: int) -> int:
        got = claim(limit)
        claims.append(got)
        return got

    consumer._claim = counted  # type: ignore[method-assign]
    try:
        # Before any job ran it holds 2
        first = next(consumer)
        assert _held(db_url) == 2 and claims == [2]
        # When short jobs run, it claims more at once, up to burst_prefetch (4) x 2 = 8
        # (counted at the claim: acks settled a few milliseconds later lower the count held)
        _run(consumer, first)
        for _ in range(6):
            _run(consumer, next(consumer))
        # (the first claim's 2, at most, are held when the second sizes itself for 8)
        assert 6 <= max(claims) <= 8, claims
        # When jobs turn long (a second each, on average), it goes back to 2
        while _held(db_url) > 2:
            _run(consumer, next(consumer), seconds_ago=5.0)
        for _ in range(4):
            _run(consumer, next(consumer), seconds_ago=5.0)
            wait_for(lambda: _held(db_url) <= 2, what="claims back to the prefetch")
    finally:
        consumer.close()


def test_burst_prefetch_can_be_turned_off() -> None:
    assert Settings.from_env({}).burst_prefetch == 4
    assert Settings.from_env({"CONTROLPLANE_BURST_PREFETCH": "1"}).burst_prefetch == 1
    with pytest.raises(ConfigurationError, match="CONTROLPLANE_BURST_PREFETCH"):
        Settings.from_env({"CONTROLPLANE_BURST_PREFETCH": "0"})


def test_queue_concurrency_limits_provisioning_by_default_and_reads_queue_equals_n() -> None:
    # Given no setting: provisioning is limited to 2 at once per worker process, nothing else
    assert Settings.from_env({}).queue_concurrency == {"provisioning": 2}
    # When queues are named: they are added, a named default is replaced, and "off" lifts limits
    read = Settings.from_env({"CONTROLPLANE_QUEUE_CONCURRENCY": " emails=4, provisioning=8 "})
    assert read.queue_concurrency == {"provisioning": 8, "emails": 4}
    assert Settings.from_env({"CONTROLPLANE_QUEUE_CONCURRENCY": "provisioning=off"}).queue_concurrency == {}
    assert Settings.from_env({"CONTROLPLANE_QUEUE_CONCURRENCY": "OFF"}).queue_concurrency == {}
    # Then bad input names the setting and what is wrong
    for bad, why in [("emails", "queue=N"), ("emails=0", "from 1"), ("emails=two", "from 1"), ("emails=²", "from 1"),
                     ("=3", "queue=N"), ("bad queue=1", "queue=N")]:
        with pytest.raises(ConfigurationError, match=f"CONTROLPLANE_QUEUE_CONCURRENCY.*{why}"):
            Settings.from_env({"CONTROLPLANE_QUEUE_CONCURRENCY": bad})


def _transitions(db_url: str) -> None:
    """Record every status change of a jobs row in test_support.transitions."""
    query(
        db_url,
        """
        CREATE TABLE test_support.transitions (n bigserial, id uuid, old text, new text);
        CREATE FUNCTION test_support.transition() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO test_support.transitions (id, old, new) VALUES (NEW.id, OLD.status, NEW.status);
            RETURN NEW;
        END $$;
        CREATE TRIGGER transition AFTER UPDATE ON control_plane.jobs
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION test_support.transition();
        """,
    )


def _changes(db_url: str, message_id: str) -> list[tuple[str, str]]:
    rows = query(db_url, "SELECT old, new FROM test_support.transitions WHERE id = %s ORDER BY n", (message_id,))
    return [(r["old"], r["new"]) for r in rows]


def test_a_claimed_job_stays_pending_until_a_thread_has_run_it_a_while_then_shows_running(db_url: str) -> None:
    # Given a message claimed by a consumer (prefetched: no thread has started it)
    _transitions(db_url)
    message = actors.noop.send("long")
    consumer = _broker().consume("default", prefetch=1, timeout=1000)
    try:
        held = next(consumer)
        row = job(db_url, message.message_id)
        assert (row["status"], row["attempts"], row["started_at"]) == ("pending", 0, None)
        # When a worker thread starts it and it keeps running
        _broker().emit_before("process_message", held)
        # Then the settler marks it running: one attempt, this worker, not completed
        running = wait_for(
            lambda: (r := job(db_url, message.message_id))["status"] == "running" and r, what="the start mark"
        )
        assert running["attempts"] == 1
        assert running["worker"] == _broker().worker_id
        assert running["completed_at"] is None
        # When it ends, the outcome keeps the start the mark wrote and counts no second attempt
        consumer.ack(held)
        done = wait_for(
            lambda: (r := job(db_url, message.message_id))["status"] == "completed" and r, what="the ack"
        )
        assert done["attempts"] == 1
        assert done["started_at"] == running["started_at"]
        assert _changes(db_url, message.message_id) == [("pending", "running"), ("running", "completed")]
    finally:
        consumer.close()


def test_a_job_that_ends_before_its_start_mark_writes_its_row_once_with_its_start(db_url: str) -> None:
    # Given two claimed messages
    _transitions(db_url)
    ok, bad = actors.noop.send("ok"), actors.noop.send("bad")
    consumer = _broker().consume("default", prefetch=2, timeout=1000)
    try:
        first, second = next(consumer), next(consumer)
        by_id = {first.message_id: first, second.message_id: second}
        # When each starts and ends at once, one acked and one failed for good
        _run(consumer, by_id[ok.message_id])
        _broker().emit_before("process_message", by_id[bad.message_id])
        by_id[bad.message_id].fail()
        consumer.nack(by_id[bad.message_id])
        wait_for(lambda: jobs_in(db_url, [ok.message_id, bad.message_id], "completed", "failed"), what="both outcomes")
    finally:
        consumer.close()
    # Then each jobs row changed once, straight from pending, and still says when it started and that
    # it was attempt 1
    assert _changes(db_url, ok.message_id) == [("pending", "completed")]
    assert _changes(db_url, bad.message_id) == [("pending", "failed")]
    done, failed = job(db_url, ok.message_id), job(db_url, bad.message_id)
    assert done["attempts"] == failed["attempts"] == 1
    assert done["started_at"] is not None and done["started_at"] <= done["completed_at"]
    assert done["worker"] == _broker().worker_id
    assert [e["attempt"] for e in failed["errors"]] == [1]


def test_outcomes_of_messages_with_ids_in_any_uuid_spelling_are_written(db_url: str) -> None:
    # Given two messages, one sent with its id in braces and capitals (a UUID, not its canonical spelling)
    plain = actors.noop.send(1)
    braced = "{" + str(uuid.uuid4()).upper() + "}"
    shouted = _broker().enqueue(actors.noop.message(2).copy(message_id=braced))
    consumer = _broker().consume("default", prefetch=2, timeout=1000)
    try:
        # When a consumer takes both and they succeed, and their outcomes are written together
        held = [next(consumer), next(consumer)]
        assert sorted(m.message_id for m in held) == sorted([plain.message_id, shouted.message_id])
        for message in held:
            _run(consumer, message)
        consumer._flush()
    finally:
        consumer.close()
    # Then both jobs completed and left the queue
    assert jobs_in(db_url, [plain.message_id, braced], "completed")
    assert query(db_url, "SELECT id FROM control_plane.messages") == []


def test_array_literals_carry_any_text_and_numbers_to_postgres_unchanged(db_url: str) -> None:
    from tasks.broker import _int_array, _text_array

    # Given texts that an array literal could misread: separators, braces, quotes, backslashes,
    # the word NULL, blanks, an empty string, other scripts; and a missing value
    texts = ["a,b", "{x}", 'q"uote', "back\\slash", '\\"', "NULL", "null", " sp ", "", "é 漢", "\t\n", None]
    numbers = [1, None, -3, 2**40]
    # When each list is sent as one literal
    (row,) = query(
        db_url,
        "SELECT %s::text[] AS texts, %s::bigint[] AS numbers, %s::text[] AS nothing",
        (_text_array(texts), _int_array(numbers), _text_array([None, None])),
    )
    # Then PostgreSQL reads back exactly the lists (and all-missing as NULL, which unnest pads)
    assert row["texts"] == texts
    assert row["numbers"] == numbers
    assert row["nothing"] is None


def test_a_worker_process_imports_the_broker_without_sqlalchemy() -> None:
    # Given a fresh interpreter, as a `dramatiq tasks ...` worker process or the CLI starts
    code = (
        "import sys, tasks, tasks.provision, tasks.cli; "
        "from models import queries, project_queries; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sqlalchemy'))"
    )
    # When it imports the broker, the provisioning actors, the CLI and the SQL modules
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    # Then SQLAlchemy (0.4 s of CPU to import) was not loaded: only the models need it
    assert out.stdout.strip() == "[]"


def test_provisioning_reaches_tenant_databases_and_reports_the_server_without_sqlalchemy(
    server_url: str, db_url: str
) -> None:
    # Given a fresh interpreter, as a worker process running the provisioning steps
    # (SQLAlchemy's import, 0.15 s of CPU, used to land in a worker's first project)
    code = (
        "import sys\n"
        "from tasks.settings import Settings\n"
        "from tasks.provision import payload as p, state, workflow\n"
        "from tasks.provision.target import session\n"
        "settings = Settings.from_env()\n"
        "with session(settings, 'postgres') as conn, conn.cursor() as cur:\n"
        "    cur.execute('SELECT current_database()')\n"
        "    print(cur.fetchone()[0])\n"
        "valid = p.validate({'project_id': 'no_sqlalchemy', 'tenant_id': 't', 'region': 'us-east-1'})\n"
        "project = state.ProjectState(payload=valid, status='provisioning', steps={}, secret_nonce=None, job_id=None)\n"
        "with state.control_transaction() as conn:\n"
        "    result = workflow._result(settings, conn, project)\n"
        "print(result['database']['host'], result['database']['port'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sqlalchemy'))\n"
    )
    env = {**os.environ, "DATABASE_URL": db_url, "PROVISION_DATABASE_URL": db_url}
    # When it opens a session on another database of the target server and builds a project's result
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    reached, server, modules = out.stdout.strip().splitlines()
    # Then the session is on the database asked for, the result names the server the tests connect to...
    with contextlib.closing(psycopg2.connect(server_url)) as conn:
        expected = f"{conn.info.host} {conn.info.port}"
    assert reached == "postgres"
    assert server == expected
    # ...and SQLAlchemy was never imported
    assert modules == "[]"


def test_the_models_load_on_first_use_with_every_table() -> None:
    code = "import models; print(len(models.metadata.tables), models.Job.__tablename__)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    count, name = out.stdout.split()
    assert int(count) >= 8 and name == "jobs"


def test_a_claim_skips_the_messages_another_claim_in_flight_holds_instead_of_waiting_or_taking_them(
    db_url: str,
) -> None:
    # Given four ready messages, and a worker's claim of two of them not committed yet
    ids = [m.message_id for m in tasks.broker.enqueue_batch([actors.noop.message(i) for i in range(4)])]

    def claim(conn: Any, limit: int) -> set[str]:
        params = {"queue": "default", "token": str(uuid.uuid4()), "worker": f"w{limit}", "lease": 30, "limit": limit}
        with conn.cursor() as cur:
            cur.execute(queries.CLAIM, params)
            return {row[0] for row in cur.fetchall()}

    first, second = psycopg2.connect(db_url), psycopg2.connect(db_url)
    got: list[set[str]] = []
    other = threading.Thread(target=lambda: (got.append(claim(second, 4)), second.commit()))
    try:
        held = claim(first, 2)
        # When another worker claims up to four meanwhile (in a thread: it must not wait, but might)
        other.start()
        blocked = "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'"
        wait_for(lambda: not other.is_alive() or query(db_url, blocked, (second.info.backend_pid,))[0]["n"],
                 what="the second claim to return or wait")  # fmt: skip
        waited = other.is_alive()
        first.commit()
        other.join()
    finally:
        first.close()
        second.close()
    # Then it did not wait for the first claim: it took the other two, and none of the first's
    assert not waited
    assert len(held) == 2
    assert got == [set(ids) - held]
    owners = query(db_url, "SELECT id::text, worker FROM control_plane.messages")
    assert {r["id"]: r["worker"] for r in owners} == {i: "w2" if i in held else "w4" for i in ids}


def test_one_flush_writes_every_outcome_though_their_results_pass_one_statements_budget(db_url: str) -> None:
    from tasks.broker import SETTLE_BYTES

    # Given three claimed jobs whose results, 600 kB each, pass what one SETTLE carries
    sent = [actors.noop.send(i) for i in range(3)]
    consumer = _broker().consume("default", prefetch=3, timeout=5000)
    held = [next(consumer) for _ in sent]
    value = b"x" * (SETTLE_BYTES * 6 // 10)
    consumer._settler.stop()  # (this test writes them: one flush, as a closing consumer's)
    for i, message in enumerate(held):
        message.stored_result = (f"key-{i}", value, 60_000)
        consumer.ack(message)
    # When the consumer writes its outcomes once
    consumer._flush()
    # Then all are written, each with its result (in as many statements as the budget takes)
    assert jobs_in(db_url, [m.message_id for m in sent], "completed")
    rows = query(db_url, "SELECT key, length(value) AS n FROM control_plane.results ORDER BY key")
    assert rows == [{"key": f"key-{i}", "n": len(value)} for i in range(3)]
    consumer.close()


def test_a_worker_refused_a_connection_for_want_of_slots_says_once_what_it_needs(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    BROKER_MODULE._slots_missing.clear()  # (said once per process: maybe already)
    # Given a worker role allowed one connection, and a worker process of that role reading two queues
    role = f"one_slot_{uuid.uuid4().hex[:8]}"
    owner = query(db_url, "SELECT current_user AS u")[0]["u"]
    query(db_url, f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1 IN ROLE {owner}")
    worker = PostgresBroker(url=psycopg2.extensions.make_dsn(db_url, user=role), settings=tasks.settings)
    try:
        with caplog.at_level(logging.ERROR, logger="tasks.broker"):
            # When its consumers start (each needs two connections, and the process one to listen)
            first = worker.consume("default", prefetch=1, timeout=100)
            with pytest.raises(ConnectionClosed):
                worker.consume("slow", prefetch=1, timeout=100)
            first.close()
        # Then it says, once, that the server has no slot for it, and what the process needs
        said = [r.getMessage() for r in caplog.records if "no connection slot left" in r.getMessage()]
        assert len(said) == 1, said
        assert f'too many connections for role "{role}"' in said[0]
        # (the queues it reads so far: its listening thread may be refused before the second consumer starts)
        needs = re.search(r"needs up to (\d+), two for each of the (\d+) queue\(s\) it reads so far, one to listen and "
                          r"(\d+) pooled", said[0])  # fmt: skip
        assert needs is not None, said[0]
        total, queues, pooled = map(int, needs.groups())
        assert queues in (1, 2) and pooled == tasks.settings.pool_size and total == 2 * queues + 1 + pooled
    finally:
        worker.close()
        query(db_url, f"DROP ROLE {role}")


def test_a_process_reading_many_queues_reaps_once_per_interval_not_once_per_queue(db_url: str) -> None:
    # Given a job whose worker's lease expired, and another worker process reading three queues,
    # each consumer's reap due
    sent = actors.noop.send("lost")
    consumer, _ = claim_in_process()
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second'")
    other = PostgresBroker(url=db_url, settings=tasks.settings)
    readers = [other.consume(queue, prefetch=1, timeout=100) for queue in ("default", "slow", "billing")]
    reaps: list[str] = []
    for reader in readers:
        real = reader._reap
        reader._reap = lambda real=real, queue=reader.queue_name: (reaps.append(queue), real())[1]
        reader._settler.stop()
        reader._next_reap = 0.0
    try:
        # When each of them does its housekeeping
        for reader in readers:
            reader._housekeeping()
        # Then one of them reaped, for all: the lost job is back in its queue
        assert reaps == ["default"]
        assert query(db_url, "SELECT claim_token FROM control_plane.messages WHERE id = %s",
                     (sent.message_id,)) == [{"claim_token": None}]  # fmt: skip
        # And once the interval has passed, the next consumer due reaps again
        other._reaped_at -= tasks.settings.reap_interval
        readers[1]._next_reap = 0.0
        readers[1]._housekeeping()
        assert reaps == ["default", "slow"]
        # And a reap that fails (a deadlock the server broke) is due again at once, not an interval later
        def deadlocked() -> None:
            reaps.append("failed")
            raise psycopg2.errors.DeadlockDetected

        working, readers[2]._reap = readers[2]._reap, deadlocked
        other._reaped_at -= tasks.settings.reap_interval
        readers[2]._next_reap = 0.0
        with pytest.raises(psycopg2.errors.DeadlockDetected):
            readers[2]._housekeeping()
        readers[2]._reap = working
        readers[0]._next_reap = 0.0
        readers[0]._housekeeping()
        assert reaps == ["default", "slow", "failed", "default"]
    finally:
        for reader in readers:
            reader.close()
        other.close()
        consumer.close()


def test_a_batch_past_what_one_statement_takes_is_refused_naming_its_size(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a bound on a batch's messages of 1,000 characters (256 MB in production: a batch of
    # 1.1 GB lost its connection after 32 s, saying nothing of why)
    monkeypatch.setattr(BROKER_MODULE, "MAX_BATCH_CHARS", 1000)
    # When a batch of two messages of 600 characters is sent
    with pytest.raises(ValueError, match=r"a batch of 2 messages of 1,\d{3} characters in all is past the 1,000 "):
        _broker().enqueue_batch([actors.noop.message("x" * 400), actors.noop.message("y" * 400)])
    # Then nothing is stored, and each alone goes
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs") == [{"n": 0}]
    _broker().enqueue_batch([actors.noop.message("x" * 400)])
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs") == [{"n": 1}]


def test_retries_of_large_messages_are_settled_in_statements_of_a_bounded_size(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given three claimed jobs of 600 kB arguments each, whose retries carry their bodies back
    # (eight of 64 MB in one SETTLE passed the 1 GB a statement may be, and the batch was sent
    # again for good)
    sent = [actors.noop.send("x" * (BROKER_MODULE.SETTLE_BYTES * 6 // 10)) for _ in range(3)]
    consumer = _broker().consume("default", prefetch=3, timeout=5000)
    held = [next(consumer) for _ in sent]
    consumer._settler.stop()  # (this test writes them: one flush, as a closing consumer's)
    carried: list[int] = []
    settle_rows = BROKER_MODULE._settle_rows

    def noting_sizes(broker: Any, conn: Any, outcomes: Any, *args: Any, **kwargs: Any) -> Any:
        carried.append(sum(len(o.body or b"") for o in outcomes))
        return settle_rows(broker, conn, outcomes, *args, **kwargs)

    monkeypatch.setattr(BROKER_MODULE, "_settle_rows", noting_sizes)
    for message in held:
        message.error_text = "RuntimeError: once more"
        _broker().enqueue(message, delay=60_000)  # what Dramatiq's Retries does with a failed attempt
        consumer.ack(message)
    # When the consumer writes its outcomes once
    consumer._flush()
    # Then every retry is written, each statement carrying one body: two would pass the bound
    rows = query(db_url, "SELECT status, attempts, last_error FROM control_plane.jobs")
    assert rows == [{"status": "pending", "attempts": 1, "last_error": "RuntimeError: once more"}] * 3
    assert len(carried) == 3 and max(carried) <= BROKER_MODULE.SETTLE_BYTES, carried
    consumer.close()


#: The sessions of this test's database waiting for a lock on control_plane.results.
_WAITING_FOR_RESULTS = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE '%%control_plane.results%%'")  # fmt: skip


def test_results_written_apart_are_written_again_after_a_lost_connection_and_counted_when_left(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from tasks.broker import _ResultWriter

    # Given the thread that writes results apart, waiting for a locked results table
    lock = psycopg2.connect(db_url)
    with contextlib.closing(lock), lock.cursor() as cur:
        cur.execute("LOCK TABLE control_plane.results IN SHARE MODE")
        writer = _ResultWriter(_broker())
        writer.put([("key-1", b'"one"', 60_000)])
        pid = wait_for(lambda: query(db_url, _WAITING_FOR_RESULTS), what="the write to wait for the lock")[0]["pid"]
        # When its connection is cut, and the table is then let go
        query(db_url, "SELECT pg_terminate_backend(%s)", (pid,))
        lock.rollback()
        # Then it wrote the result all the same
        wait_for(lambda: query(db_url, "SELECT key FROM control_plane.results") == [{"key": "key-1"}],
                 what="the result")
        # And given the table locked again, a result that cannot be written before the writer is closed
        cur.execute("LOCK TABLE control_plane.results IN SHARE MODE")
        writer.put([("key-2", b'"two"', 60_000)])
        wait_for(lambda: query(db_url, _WAITING_FOR_RESULTS), what="the second write to wait for the lock")
        with caplog.at_level(logging.ERROR, logger="tasks.broker"):
            writer.close(timeout=0.5)
        # Then closing says it was not written
        assert "1 of the results backend's results were not written" in caplog.text
        lock.rollback()


def test_a_result_the_server_refuses_costs_only_itself_and_a_huge_ttl_is_kept_as_a_century(db_url: str) -> None:
    from tasks.broker import _ResultWriter

    # Given results to write apart: good ones, one whose ttl is past a century, one past bigint
    writer = _ResultWriter(_broker())
    good = [(f"good-{i}", b'"ok"', 60_000) for i in range(4)]
    writer.put([*good[:2], ("huge-ttl", b'"ok"', 10**16), ("bad-ttl", b'"no"', 2**70), *good[2:]])
    # When the writer has written them
    writer.close(timeout=30)
    # Then every one but the refused one is stored, the huge ttl as a century
    rows = query(db_url, "SELECT key, expires_at > now() + interval '99 years' AS century "
                         "FROM control_plane.results ORDER BY key")  # fmt: skip
    assert rows == sorted([{"key": k, "century": False} for k, _, _ in good] + [{"key": "huge-ttl", "century": True}],
                          key=lambda r: str(r["key"]))


#: A settle statement as the proxy sees it: run prepared (its PREPARE left alone) or plain.
_SETTLE_SENT = (b"EXECUTE control_plane_settle", b"WITH t AS (")


def _end_as(consumer: Any, message: Any, kind: str) -> None:
    if kind == "ack":
        consumer.ack(message)
        return
    if kind == "cancel":
        message._exception = Cancelled("cancelled by operator")
    message.fail()
    consumer.nack(message)


@pytest.mark.parametrize(("kind", "status"), [("ack", "completed"), ("nack", "failed"), ("cancel", "cancelled")])
def test_a_result_written_apart_is_stored_though_the_reply_to_its_outcome_was_lost(
    db_url: str, kind: str, status: str
) -> None:
    from tasks import db

    # Given a claimed job whose result goes with its outcome, and the results table held by
    # another session, so the outcome is written without it and the result apart
    sent = actors.noop.send(1)
    consumer = _broker().consume("default", prefetch=1, timeout=5000)
    message = next(consumer)
    consumer._settler.stop()  # (this test writes the outcome)
    message.stored_result = ("key-lost-reply", b'"the outcome"', 60_000)
    _end_as(consumer, message, kind)
    proxy = ReplyLosingProxy(db_url)
    lock = psycopg2.connect(db_url)
    try:
        with lock.cursor() as cur:
            cur.execute("LOCK TABLE control_plane.results IN SHARE MODE")
        # When the server commits the outcome but its reply is lost on the way back
        proxy.lose_reply_to(*_SETTLE_SENT, unless=b"PREPARE ")
        with contextlib.closing(db.connect(proxy.url, autocommit=True)) as cut:
            with pytest.raises(psycopg2.OperationalError):
                consumer._flush(cut)
        assert proxy.lost.is_set()
        assert jobs_in(db_url, [sent.message_id], status)
        lock.rollback()
        # And the settle is tried again, as the settler does after a lost connection
        consumer._flush()
    finally:
        lock.close()
        proxy.close()
    # Then the job's result is stored all the same
    stored = "SELECT convert_from(value, 'UTF8') AS value FROM control_plane.results WHERE key = 'key-lost-reply'"
    assert wait_for(lambda: query(db_url, stored), what="the result") == [{"value": '"the outcome"'}]
    consumer.close()


def test_a_late_worker_whose_settle_lost_its_connection_stores_no_result_over_the_run_that_ended_the_job(
    db_url: str,
) -> None:
    from tasks import db

    # Given worker A's claim, whose lease expired, and worker B (another process) that
    # reclaimed the job and completed it with its own result
    message = actors.noop.send("twice")
    consumer_a = _broker().consume("default", prefetch=1, timeout=2000)
    held = next(consumer_a)
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second'")
    other = PostgresBroker(url=db_url, settings=tasks.settings)
    other.worker_id = "another-host:1"  # (another process's, as in production)
    consumer_b = other.consume("default", prefetch=1, timeout=2000)
    consumer_b._next_reap = 0
    reclaimed = next(consumer_b)
    consumer_a._settler.stop()
    consumer_b._settler.stop()
    reclaimed.stored_result = ("key-twice", b'"B"', 60_000)
    consumer_b.ack(reclaimed)
    consumer_b._flush()
    proxy = ReplyLosingProxy(db_url)
    try:
        # When A, late, completes it too, and the settle of its outcome loses its connection
        held.stored_result = ("key-twice", b'"A"', 60_000)
        consumer_a.ack(held)
        proxy.lose_reply_to(*_SETTLE_SENT, unless=b"PREPARE ")
        with contextlib.closing(db.connect(proxy.url, autocommit=True)) as cut:
            with pytest.raises(psycopg2.OperationalError):
                consumer_a._flush(cut)
        consumer_a._flush()  # (tried again: its claim is gone, its outcome unwritten)
        tasks.broker.results_writer.close(timeout=30)  # (whatever A left to write apart is written)
    finally:
        proxy.close()
    # Then the job's result is B's, the run its row records
    assert job(db_url, message.message_id)["worker"] == "another-host:1"
    stored = "SELECT convert_from(value, 'UTF8') AS value FROM control_plane.results"
    assert query(db_url, stored) == [{"value": '"B"'}]
    consumer_a.close()
    consumer_b.close()
    other.close()


def test_the_results_writer_keeps_an_outcomes_result_over_a_conditional_one_and_outlives_a_second_close(
    db_url: str,
) -> None:
    from tasks.broker import _ResultWriter

    # Given the thread that writes results apart, closed twice (a broker closed, used again, closed again)
    writer = _ResultWriter(_broker())
    writer.put([("first", b'"1"', 60_000)])
    writer.close(timeout=30)
    writer.close(timeout=30)
    # When one batch holds, for one key, a result whose outcome was written and then one on a
    # condition that does not hold (a job that does not exist)
    writer._put([(("key", b'"written"', 60_000), None),
                 (("key", b'"if ended"', 60_000), (str(uuid.uuid4()), "ack", "nobody"))])
    writer.close(timeout=30)
    # Then the first is stored, after both closes too, and the other did not displace it
    rows = query(db_url, "SELECT key, convert_from(value, 'UTF8') AS value FROM control_plane.results ORDER BY key")
    assert rows == [{"key": "first", "value": '"1"'}, {"key": "key", "value": '"written"'}]


def test_a_result_is_stored_on_the_condition_of_an_ending_outcome_only() -> None:
    from tasks.broker import store_results

    # A condition names the kind of outcome whose status the job's row must show; any other
    # kind (a status, a retry) would be read as 'pending' by RESULT_STORE, and is refused
    for kind in ("completed", "retry", None):
        with pytest.raises(ValueError, match="on an ack, nack or cancel"):
            store_results(None, [("key", b'"1"', 60_000)], [(str(uuid.uuid4()), kind, "w")])  # type: ignore[list-item]


def test_a_results_writer_being_closed_writes_what_is_put_meanwhile_and_then_ends(db_url: str) -> None:
    from tasks.broker import _ResultWriter

    # Given the thread that writes results apart, waiting for a locked results table
    lock = psycopg2.connect(db_url)
    writer = _ResultWriter(_broker())
    with contextlib.closing(lock), lock.cursor() as cur:
        cur.execute("LOCK TABLE control_plane.results IN SHARE MODE")
        writer.put([("before", b'"1"', 60_000)])
        wait_for(lambda: query(db_url, _WAITING_FOR_RESULTS), what="the write to wait for the lock")
        # When it is being closed, and another result is put before it has ended
        closer = threading.Thread(target=writer.close, kwargs={"timeout": 60})
        closer.start()
        wait_for(lambda: writer._closing, what="the close to begin")
        writer.put([("meanwhile", b'"2"', 60_000)])
        lock.rollback()
        closer.join()
    # Then both are written, and the thread ended of itself (not left waiting out the close's timeout)
    rows = query(db_url, "SELECT key FROM control_plane.results ORDER BY key")
    assert rows == [{"key": "before"}, {"key": "meanwhile"}]
    assert writer._thread is None


def test_a_results_table_found_locked_is_taken_as_busy_by_its_own_broker_only(db_url: str) -> None:
    from tasks import db
    from tasks.broker import _lock_results

    # Given two brokers in one process (two control planes, or a test's), and the first
    # finding control_plane.results held by another session
    first, second = _broker(), PostgresBroker(url=db_url, settings=tasks.settings)
    lock = psycopg2.connect(db_url)
    try:
        with lock.cursor() as cur:
            cur.execute("LOCK TABLE control_plane.results IN SHARE MODE")
        with contextlib.closing(db.connect(db_url, autocommit=True)) as conn:
            assert not _lock_results(first, conn)
        lock.rollback()
        # When the second, once the table is free, settles results in the first's busy second
        with contextlib.closing(db.connect(db_url, autocommit=True)) as conn, conn.cursor() as cur:
            took = _lock_results(second, conn)
            cur.execute("ROLLBACK")
            # Then it takes the table: its outcomes store their results, the first's busy second is not its own
            assert took
    finally:
        lock.close()
        second.close()


def test_an_attempt_interrupted_by_a_shutdown_is_counted_and_its_job_goes_back_to_the_queue(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a job a worker thread started, before its running mark was written (a job interrupted
    # within RUNNING_MARK_DELAY_SECONDS, or whose mark the settler had not flushed yet)
    message = actors.noop.send("interrupted")
    consumer, held = claim_in_process()
    held.started = True
    # When the worker shuts down and gives it back
    with caplog.at_level("WARNING", logger="tasks.broker"):
        consumer.requeue([held])
        consumer.close()
    # Then its log names the job it cut off
    assert f"1 job(s) still running as this worker stopped were interrupted ({message.message_id})" in caplog.text
    # Then the attempt counts (a job cut by every deploy does not run forever: see
    # test_a_job_a_shutdown_interrupts_on_every_attempt_fails_once_its_attempts_are_used_up),
    # says why, in last_error and in the history of attempts, and the message is back in the
    # queue, unclaimed
    row = job(db_url, message.message_id)
    assert row["status"] == "pending"
    assert row["attempts"] == 1
    assert row["last_error"] == "interrupted: the worker shut down before the job finished"
    assert [(e["attempt"], e["error"], e["worker"]) for e in row["errors"]] == [
        (1, "interrupted: the worker shut down before the job finished", tasks.broker.worker_id)
    ]
    assert query(db_url, "SELECT claim_token FROM control_plane.messages WHERE id = %s",
                 (message.message_id,)) == [{"claim_token": None}]


def test_a_prefetched_message_given_back_unstarted_costs_no_attempt(db_url: str) -> None:
    # Given a message claimed but not started / When given back / Then no attempt is charged
    message = actors.noop.send("prefetched")
    consumer, held = claim_in_process()
    consumer.requeue([held])
    consumer.close()
    row = job(db_url, message.message_id)
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)


def test_a_heartbeat_that_did_not_extend_a_claim_the_reaper_took_does_not_make_it_startable(db_url: str) -> None:
    # Given a worker holding a message unstarted, its lease about to run out (its heartbeats were
    # late: the process was stopped, its keeper keeping nothing), in the database and here alike
    message = actors.noop.send("renewed")
    consumer = tasks.broker.consume("default", prefetch=1, timeout=2000)
    held = next(consumer)
    assert held is not None and held.message_id == message.message_id
    consumer._settler.stop()
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() + interval '300 milliseconds'")
    held.lease_until = time.monotonic() + 0.2  # (no later than the database's, as _claim sets it)
    other = PostgresBroker(url=db_url, settings=tasks.settings)
    consumer_b = other.consume("default", prefetch=1, timeout=2000)
    consumer_b._settler.stop()
    reclaimed = []

    # When its consumer's heartbeat read its clock before that, and its statement ran after it (the
    # thread descheduled in between: the GIL, a stop of a second), once the reaper had put the
    # message back and another worker had claimed it
    def stalled(now: float, ids: list[str]) -> None:
        gone = "SELECT lease_expires_at < now() AS gone FROM control_plane.messages"
        wait_for(lambda: query(db_url, gone)[0]["gone"], what="the lease to run out")
        consumer_b._next_reap = 0
        other._reaped_at = float("-inf")
        got = next(consumer_b)
        assert got is not None and got.message_id == message.message_id
        reclaimed.append(got)

    consumer._say_if_late = stalled
    consumer._next_heartbeat = 0.0
    consumer._housekeeping()
    assert reclaimed
    # Then the thread that comes to it does not start it: its claim is the other worker's
    started = tasks.broker._started(held)
    row = query(db_url, "SELECT claim_token::text AS t FROM control_plane.messages")[0]
    consumer.close()
    consumer_b.requeue(reclaimed)
    consumer_b.close()
    other.close()
    assert row["t"] == reclaimed[0].claim_token != held.claim_token
    assert not started, "started here, while another worker holds its claim: it would run twice"
