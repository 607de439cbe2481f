"""Sending: the mirror row, JSONB payloads, transactional and batch enqueue, bad input."""

from __future__ import annotations

import decimal
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import dramatiq
import psycopg2
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

import tasks
from tasks.db import sqlalchemy_url
from tasks.errors import NotSerializable
from tasks.middleware import UNLIMITED_ATTEMPTS
from tests import actors
from tests.support import job, query


def count(url: str, table: str = "jobs") -> int:
    return int(query(url, f"SELECT count(*) AS n FROM control_plane.{table}")[0]["n"])  # noqa: S608


def test_send_records_a_pending_job_with_its_payload_as_jsonb(db_url: str) -> None:
    # Given a complex payload
    payload = {"project": {"id": "p1", "tags": ["a", "b"], "limits": {"cpu": 2.5, "on": True}}, "n": None}
    # When it is sent
    message = actors.noop.send(payload)
    # Then control_plane.jobs holds a pending job with the payload as JSONB, queryable with SQL
    row = job(db_url, message.message_id)
    assert row["status"] == "pending"
    assert row["type"] == "tests.noop"
    assert row["queue"] == "default"
    assert row["attempts"] == 0
    assert row["payload"] == {"args": [payload], "kwargs": {}}
    found = query(
        db_url,
        "SELECT id FROM control_plane.jobs WHERE payload #>> '{args,0,project,limits,cpu}' = '2.5'",
    )
    assert [str(r["id"]) for r in found] == [message.message_id]
    # And the broker's table holds the message, ready now
    assert query(db_url, "SELECT eta <= now() AS ready FROM control_plane.messages")[0]["ready"]


def test_jobs_can_be_queried_by_type(db_url: str) -> None:
    actors.noop.send(1)
    actors.noop.send(2)
    actors.always_fails.send("x")
    rows = query(db_url, "SELECT type, count(*) AS n FROM control_plane.jobs GROUP BY type ORDER BY type")
    assert [(r["type"], r["n"]) for r in rows] == [("tests.always_fails", 1), ("tests.noop", 2)]


def test_max_attempts_comes_from_the_actor_or_the_message(db_url: str) -> None:
    a = actors.always_fails.send("x")
    b = actors.always_fails.send_with_options(args=("y",), max_attempts=7)
    c = actors.noop.send_with_options(args=(1,), max_retries=0)
    forever = actors.always_fails.send_with_options(args=("z",), max_retries=None)  # Dramatiq's "retry forever"
    assert job(db_url, a.message_id)["max_attempts"] == 3
    assert job(db_url, b.message_id)["max_attempts"] == 7
    assert job(db_url, c.message_id)["max_attempts"] == 1
    assert job(db_url, forever.message_id)["max_attempts"] == UNLIMITED_ATTEMPTS


def test_a_batch_gives_each_message_its_own_priority_and_attempts(db_url: str) -> None:
    # Given one batch mixing two actors' plain messages with ones that set priority or attempts
    plain = actors.always_fails.message("a")
    urgent = actors.always_fails.message_with_options(args=("b",), priority=9)
    once = actors.always_fails.message_with_options(args=("c",), max_retries=0)
    other = actors.noop.message(1)
    again = actors.always_fails.message("d")
    # When it is sent in one call
    tasks.broker.enqueue_batch([plain, urgent, once, other, again])
    # Then each jobs row has what its own options and actor say
    rows = query(db_url, "SELECT payload #>> '{args,0}' AS arg, priority, max_attempts FROM control_plane.jobs "
                         "ORDER BY 1")  # fmt: skip
    assert [(r["arg"], r["priority"], r["max_attempts"]) for r in rows] == [
        ("1", 0, 20), ("a", 0, 3), ("b", 9, 3), ("c", 0, 1), ("d", 0, 3),
    ]  # fmt: skip


def test_a_delayed_send_is_scheduled_in_the_database(db_url: str) -> None:
    # When a message is sent with a one-hour delay
    message = actors.noop.send_with_options(args=(1,), delay=3_600_000)
    # Then its eta and scheduled_at are an hour ahead of the database's clock, not held in memory
    row = query(
        db_url,
        "SELECT extract(epoch FROM m.eta - now()) AS eta_in, extract(epoch FROM j.scheduled_at - now()) AS sched_in"
        " FROM control_plane.messages m JOIN control_plane.jobs j USING (id) WHERE id = %s",
        (message.message_id,),
    )[0]
    assert 3500 < row["eta_in"] <= 3600
    assert 3500 < row["sched_in"] <= 3600


def test_send_inside_a_psycopg2_transaction_commits_with_it(db_url: str) -> None:
    conn = psycopg2.connect(db_url)
    try:
        # Given a web request's transaction that writes its own row and sends a job
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE orders (id int)")
            cur.execute("INSERT INTO orders VALUES (1)")
        with tasks.enqueue_in(conn):
            message = actors.noop.send(1)
        # Then nothing is visible to anyone else before the commit
        assert count(db_url) == 0
        assert count(db_url, "messages") == 0
        # When it commits
        conn.commit()
        # Then the job and the order appear together
        assert job(db_url, message.message_id)["status"] == "pending"
        assert count(db_url, "messages") == 1
    finally:
        conn.close()


def test_send_inside_a_rolled_back_transaction_leaves_no_job(db_url: str) -> None:
    conn = psycopg2.connect(db_url)
    try:
        with tasks.enqueue_in(conn):
            actors.noop.send(1)
            dramatiq.group([actors.noop.message(2), actors.noop.message(3)]).run()
            dramatiq.pipeline([actors.noop.message(4), actors.noop.message(5)]).run()
        conn.rollback()
    finally:
        conn.close()
    assert count(db_url) == 0
    assert count(db_url, "messages") == 0


def test_send_inside_a_sqlalchemy_session_joins_its_transaction(db_url: str) -> None:
    engine = create_engine(sqlalchemy_url(db_url), poolclass=NullPool)
    try:
        # Given a Session that rolls back
        with Session(engine) as session:
            with tasks.enqueue_in(session):
                actors.noop.send("rolled back")
            session.rollback()
        assert count(db_url) == 0
        # And one that commits, with a SQLAlchemy Connection too
        with Session(engine) as session:
            session.execute(text("SELECT 1"))
            with tasks.enqueue_in(session):
                kept = actors.noop.send("kept")
            assert count(db_url) == 0
            session.commit()
        with engine.begin() as connection, tasks.enqueue_in(connection):
            also = actors.noop.send("also kept")
    finally:
        engine.dispose()
    # Then only the committed sends exist
    ids = {str(r["id"]) for r in query(db_url, "SELECT id FROM control_plane.jobs")}
    assert ids == {kept.message_id, also.message_id}


def test_sqlalchemy_transactions_that_begin_or_end_inside_the_block_keep_their_sends(db_url: str) -> None:
    # Given a pooled engine, as a web app has
    engine = create_engine(sqlalchemy_url(db_url), pool_size=1, max_overflow=0)
    try:
        # When a fresh Connection (no statement yet) sends, then commits
        with engine.connect() as connection:
            with tasks.enqueue_in(connection):
                fresh = actors.noop.send("fresh connection")
            connection.commit()
        # And a Connection whose own transaction block is opened inside (SQLAlchemy's usual way)
        with engine.connect() as connection, tasks.enqueue_in(connection), connection.begin():
            begun = actors.noop.send("inside connection.begin()")
        # And a Session commits, then sends and commits again, all inside the block
        with Session(engine) as session, tasks.enqueue_in(session):
            session.execute(text("SELECT 1"))
            session.commit()
            second = actors.noop.send("after the first commit")
            session.commit()
        # And a Session rolls back, then sends, and is closed without committing
        with Session(engine) as session, tasks.enqueue_in(session):
            session.execute(text("SELECT 1"))
            session.rollback()
            actors.noop.send("never committed")
        # and another request on the pool commits something of its own
        with Session(engine) as other:
            other.execute(text("SELECT 1"))
            other.commit()
    finally:
        engine.dispose()
    # Then exactly the sends whose transactions committed exist
    ids = {str(r["id"]) for r in query(db_url, "SELECT id FROM control_plane.jobs")}
    assert ids == {fresh.message_id, begun.message_id, second.message_id}
    assert count(db_url, "messages") == 3


def test_a_delay_inside_a_long_transaction_counts_from_the_send(db_url: str) -> None:
    # Given a transaction that has been open a while (a request doing other work first: here,
    # one statement, whose clock_timestamp() is already past the transaction's start)
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT clock_timestamp()")
            (before_send,) = cur.fetchone()
        # When a job is sent in it with a 10 s delay, and the transaction commits
        with tasks.enqueue_in(conn):
            message = actors.noop.send_with_options(args=(1,), delay=10_000)
        conn.commit()
    finally:
        conn.close()
    # Then it becomes due 10 s after the send, not 10 s after the transaction began, and its age
    # (max_age's, counted by the claim) starts at the send too
    (row,) = query(db_url, "SELECT eta, enqueued_at FROM control_plane.messages WHERE id = %s",
                   (message.message_id,))  # fmt: skip
    assert row["eta"] >= before_send + timedelta(seconds=10)
    assert row["enqueued_at"] >= before_send


def test_enqueue_in_rejects_what_is_not_a_connection() -> None:
    with pytest.raises(TypeError, match="psycopg2 connection or a SQLAlchemy"), tasks.enqueue_in("nope"):
        pass


def test_batch_enqueue_writes_many_messages_in_one_statement(db_url: str) -> None:
    # When 500 messages are enqueued as one batch
    messages = [actors.noop.message(i) for i in range(500)]
    sent = tasks.broker.enqueue_batch(messages)
    # Then all 500 are queued and mirrored, with their payloads
    assert len(sent) == 500
    assert count(db_url) == 500
    assert count(db_url, "messages") == 500
    rows = query(db_url, "SELECT (payload #>> '{args,0}')::int AS i FROM control_plane.jobs ORDER BY 1")
    assert [r["i"] for r in rows] == list(range(500))


def _circular() -> list[object]:
    """A list that holds itself."""
    loop: list[object] = ["start"]
    loop.append(loop)
    return loop


@pytest.mark.parametrize(
    ("args", "kwargs", "where"),
    [
        ((decimal.Decimal("1.5"),), {}, "args[0] (Decimal)"),
        ((), {"when": object()}, "kwargs['when'] (object)"),
        (({"nested": [1, {2, 3}]},), {}, "args[0]['nested'][1] (set)"),
        ((float("nan"),), {}, "args[0] (nan, which JSON cannot hold)"),
        ((), {"limit": float("inf")}, "kwargs['limit'] (inf, which JSON cannot hold)"),
        (({1: "one", 2: object()},), {}, "args[0][2] (object)"),
        ((_circular(),), {}, "args[0][1] (a circular reference)"),
    ],
)
def test_arguments_that_are_not_json_are_refused_and_nothing_is_enqueued(
    db_url: str, args: tuple[object, ...], kwargs: dict[str, object], where: str
) -> None:
    with pytest.raises(NotSerializable, match=rf"tests\.noop.*{__import__('re').escape(where)} is not JSON"):
        actors.noop.send(*args, **kwargs)
    assert count(db_url) == 0
    assert count(db_url, "messages") == 0


def test_integer_keys_are_sent_as_json_writes_them(db_url: str) -> None:
    # When a dictionary with integer keys is sent, Then JSON's string keys are what the job holds
    message = actors.noop.send({1: "one", 2: [3]})
    assert job(db_url, message.message_id)["payload"] == {"args": [{"1": "one", "2": [3]}], "kwargs": {}}


def test_a_nul_character_is_refused_with_a_clear_error(db_url: str) -> None:
    with pytest.raises(NotSerializable, match="NUL character"):
        actors.noop.send("a\x00b")
    assert count(db_url) == 0


def test_a_name_that_is_not_utf8_is_refused_with_a_clear_error(db_url: str) -> None:
    with pytest.raises(NotSerializable, match=r"unpaired surrogate .*file name"):
        actors.noop.send({"path": actors.NOT_UTF8_NAME})
    assert count(db_url) == 0
    # while characters outside the BMP (a surrogate pair in JSON) are fine
    assert actors.noop.send("report 📈").message_id


class _SortedJSON(dramatiq.JSONEncoder):
    """A user's own encoder: JSON with its keys sorted."""

    def encode(self, data: dict[str, object]) -> bytes:
        return json.dumps(data, sort_keys=True).encode("utf-8")


def test_a_json_encoder_of_the_users_own_writes_the_body(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given an encoder of the user's own, set as Dramatiq's global encoder
    monkeypatch.setattr(dramatiq.message, "global_encoder", _SortedJSON())
    # When a message is sent
    message = actors.noop.send({"b": 1, "a": 2})
    # Then the stored body is that encoder's output, and the mirror reads it
    (row,) = query(db_url, "SELECT body FROM control_plane.messages WHERE id = %s", (message.message_id,))
    assert bytes(row["body"]) == _SortedJSON().encode(message.asdict())
    assert job(db_url, message.message_id)["payload"] == {"args": [{"a": 2, "b": 1}], "kwargs": {}}


def test_an_encode_method_replaced_on_the_encoder_is_the_one_used(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given Dramatiq's own encoder object with its encode method replaced (a user's redaction, say)
    encoder = dramatiq.message.global_encoder
    monkeypatch.setattr(encoder, "encode", lambda data: _SortedJSON().encode({**data, "options": {"tag": "mine"}}))
    # When a message is sent, Then the stored body is what that method wrote
    message = actors.noop.send(1)
    (row,) = query(db_url, "SELECT body FROM control_plane.messages WHERE id = %s", (message.message_id,))
    assert json.loads(bytes(row["body"]))["options"] == {"tag": "mine"}


class _Urgent(dramatiq.Middleware):
    """Gives the messages of one argument a priority and one attempt, in before_enqueue."""

    def before_enqueue(self, broker: dramatiq.Broker, message: dramatiq.Message[object], delay: int) -> None:
        if message.args == ("urgent",):
            message.options.update(priority=5, max_retries=0)


def test_priority_and_attempts_set_by_a_before_enqueue_hook_count(db_url: str) -> None:
    # Given a middleware that makes some messages urgent as they are sent
    urgent = _Urgent()
    tasks.broker.add_middleware(urgent)
    try:
        # When one batch holds plain and urgent messages of one actor
        tasks.broker.enqueue_batch([actors.always_fails.message(v) for v in ("plain", "urgent", "again")])
    finally:
        tasks.broker.middleware.remove(urgent)
    # Then only the urgent one has the hook's priority and attempts
    rows = query(db_url, "SELECT payload #>> '{args,0}' AS arg, priority, max_attempts FROM control_plane.jobs "
                         "ORDER BY 1")  # fmt: skip
    assert [(r["arg"], r["priority"], r["max_attempts"]) for r in rows] == [
        ("again", 0, 3), ("plain", 0, 3), ("urgent", 5, 1),
    ]  # fmt: skip


def test_an_encoder_that_does_not_write_utf8_json_is_refused(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given Dramatiq's pickle encoder, whose bytes the jobs mirror cannot read
    monkeypatch.setattr(dramatiq.message, "global_encoder", dramatiq.PickleEncoder())
    # When a message is sent, Then it is refused by name and nothing is stored
    with pytest.raises(NotSerializable, match=r"tests\.noop.*not UTF-8 JSON"):
        actors.noop.send(1)
    assert count(db_url) == 0
    assert count(db_url, "messages") == 0


def test_hostile_strings_round_trip_unchanged(db_url: str) -> None:
    hostile = [
        'x"; DROP DATABASE postgres; --',
        "'; DELETE FROM control_plane.jobs; --",
        "ünïcødé ✓ 🚀",
        "back\\slash",
        "C:\\u0000 only looks like a NUL",
        "x" * 10_000,
    ]
    message = actors.noop.send(hostile)
    assert job(db_url, message.message_id)["payload"]["args"] == [hostile]


def test_a_delay_past_what_postgresql_can_store_is_refused_on_a_send_and_cut_on_a_retry(db_url: str) -> None:
    from tasks.broker import MAX_DELAY_MS
    from tests.support import claim_in_process, settle_in_process

    # Given a delay in nanoseconds where milliseconds were meant (317,000 years)
    far = 10**16
    # When it is given to a send, Then the send is refused, saying why, and nothing is stored
    with pytest.raises(ValueError, match="100 years"):
        actors.noop.send_with_options(args=(1,), delay=far)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs") == [{"n": 0}]
    # And when a failed attempt's retry asks for it (Retry(delay=...)), the retry waits 100 years,
    # and the worker's outcome is written (its settle used to fail, and every later one of its queue)
    sent = actors.always_fails.send("x")
    consumer, held = claim_in_process()
    held.error_text = "RuntimeError: once"
    tasks.broker.enqueue(held, delay=far)
    settle_in_process(consumer, held, "ack")
    row = query(db_url, "SELECT status, round(extract(epoch FROM scheduled_at - now()) * 1000 / %s) AS r "
                        "FROM control_plane.jobs WHERE id = %s", (MAX_DELAY_MS, sent.message_id))  # fmt: skip
    assert [(r["status"], r["r"]) for r in row] == [("pending", 1)]


def test_a_prefetched_batch_runs_in_the_order_of_each_messages_own_priority() -> None:
    from queue import PriorityQueue

    from dramatiq.worker import ConsumerThread

    # Given messages a worker process prefetched in one claim: an actor of priority 0 sent with
    # priority=9, another actor's message of priority 5, and a plain one of the first actor
    later = actors.noop.message_with_options(args=("priority 9",), priority=9)
    sooner = actors.slow_noop.message_with_options(args=(0.0,), priority=5)
    plain = actors.noop.message("actor's 0")
    work_queue: PriorityQueue[Any] = PriorityQueue()
    consumer = ConsumerThread(broker=tasks.broker, queue_name="default", prefetch=3, work_queue=work_queue,
                              worker_timeout=1000)  # fmt: skip
    # When Dramatiq's consumer thread queues them for its worker threads
    for message in (later, sooner, plain):
        consumer.handle_message(dramatiq.MessageProxy(message))
    # Then they come out by each message's priority, as the claim ordered them
    order = [work_queue.get_nowait().message.message_id for _ in range(3)]
    assert order == [plain.message_id, sooner.message_id, later.message_id]


def test_the_lowest_and_highest_priorities_postgresql_holds_are_sent_one_per_call_and_in_a_batch(db_url: str) -> None:
    # Given the ends of PostgreSQL's int (a -2147483648 written into a statement as a literal was
    # read as -(2147483648::int), out of range)
    lowest, highest = -(2**31), 2**31 - 1
    # When messages are sent with them, one per call and in a batch
    sent = [actors.noop.send_with_options(args=(p,), priority=p) for p in (lowest, highest)]
    batch = [actors.noop.message_with_options(args=(p,), priority=p) for p in (lowest, highest)]
    sent += tasks.broker.enqueue_batch(batch)
    # Then each is stored with its priority
    rows = query(db_url, "SELECT id::text, priority FROM control_plane.messages")
    assert {r["id"]: r["priority"] for r in rows} == {m.message_id: m.options["priority"] for m in sent}


@pytest.mark.parametrize(
    ("declared", "named"),
    [
        # a worker thread died on it, the failed job recorded completed, the thread's other jobs held forever
        ({"throws": "ValueError"}, "throws"),
        # a failure recorded completed (the backoff raised inside Retries' hook)
        ({"min_backoff": "1000"}, "min_backoff"),
        ({"max_backoff": -1}, "max_backoff"),
        # ignored with a log line, the job ran without a limit
        ({"time_limit": "100"}, "time_limit"),
        ({"max_age": -1}, "max_age"),
        # an integer past what math.isfinite takes (an OverflowError, which Dramatiq's hooks swallow)
        ({"max_backoff": 10**400}, "max_backoff"),
        # the worker's record of its actors failed at every consumer start: its whole queue stalled
        ({"priority": 2**31}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"actor_name": "a" * 1001}, "actor name"),
        # past what the reaper can double in an int
        ({"max_attempts": 2_000_000_000}, "max_attempts"),
        ({"max_attempts": -1}, "max_attempts"),
        # stored under 'billing' (Dramatiq's delay-queue suffix), consumed as 'billing.DQ': pending forever
        ({"queue_name": "billing.DQ"}, "queue name"),
    ],
)
def test_an_actor_its_workers_could_not_run_is_refused_when_declared_naming_why(
    declared: dict[str, Any], named: str
) -> None:
    from tasks.errors import InvalidOption

    options = {"actor_name": "tests.badly_declared", **declared}
    # When an actor is declared with an option its workers could not use
    with pytest.raises(InvalidOption, match=named):
        dramatiq.actor(**options)(lambda: None)
    # Then it is not declared at all
    assert options["actor_name"] not in tasks.broker.actors


def test_actor_options_that_are_fine_are_declared() -> None:
    # Exception classes for throws, an infinite time limit (none), a zero backoff, the most attempts
    @dramatiq.actor(actor_name="tests.well_declared", throws=(ValueError, KeyError), time_limit=float("inf"),
                    min_backoff=0, max_age=10.5, max_attempts=UNLIMITED_ATTEMPTS)  # fmt: skip
    def well_declared() -> None:
        pass

    assert tasks.broker.actors["tests.well_declared"] is well_declared


@pytest.mark.parametrize(
    "options",
    # a priority or attempts the jobs row cannot hold (ignored, or PostgreSQL's "integer out of range")
    [{"priority": "3"}, {"priority": 1.5}, {"priority": 2**31}, {"max_attempts": "4"}, {"max_retries": -1},
     {"throws": "ValueError"}, {"min_backoff": "1"}, {"time_limit": float("nan")}, {"max_age": -5},
     {"max_retries": 2_000_000_000}, {"time_limit": 10**400}],
)  # fmt: skip
def test_message_options_a_worker_could_not_use_are_refused_when_sent(db_url: str, options: dict[str, Any]) -> None:
    from tasks.errors import InvalidOption

    # When a message is sent with such an option, alone or in a batch
    (name,) = options
    with pytest.raises(InvalidOption, match=f"the {name} option"):
        actors.noop.send_with_options(args=(1,), **options)
    with pytest.raises(InvalidOption, match=f"the {name} option"):
        tasks.broker.enqueue_batch([actors.noop.message(2), actors.noop.message_with_options(args=(3,), **options)])
    # Then nothing was stored
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs") == [{"n": 0}]


@pytest.mark.parametrize(
    "eta",
    # (fixed values: a parameter computed at collection names a test differently in each xdist worker)
    [datetime(2030, 1, 1, tzinfo=UTC), "2030-01-01T00:00:00Z", True, float("nan"), 1_900_000_000.5,
     1_900_000_000_000_000],
    ids=["datetime", "string", "bool", "nan", "seconds", "microseconds"],
)
def test_an_eta_that_is_no_number_of_milliseconds_is_refused_not_dropped(db_url: str, eta: Any) -> None:
    from tasks.errors import InvalidOption

    # When a message is sent with Celery's habit, an eta that is a datetime (or a string, or seconds)
    with pytest.raises(InvalidOption, match="the eta option must be a number of milliseconds"):
        actors.noop.send_with_options(args=(1,), eta=eta)
    # Then nothing was stored (the eta was dropped and the job ran at once)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs") == [{"n": 0}]
    # (one in milliseconds is the message's eta)
    actors.noop.send_with_options(args=(2,), eta=int((time.time() + 3600) * 1000))
    (row,) = query(db_url, "SELECT extract(epoch FROM eta - now()) AS eta_in FROM control_plane.messages")
    assert 3500 < row["eta_in"] <= 3600


def test_another_brokers_sends_are_checked_but_not_dramatiqs_own_re_sends() -> None:
    from tasks.errors import InvalidOption
    from tasks.middleware import SendOptionChecks

    checks = SendOptionChecks()
    bad = {"time_limit": "100"}
    # A send (under RabbitMQ or the StubBroker) with an option a worker could not use is refused
    with pytest.raises(InvalidOption, match="the time_limit option"):
        checks.before_enqueue(tasks.broker, actors.noop.message_with_options(args=(1,), **bad), None)
    # but not Dramatiq's re-send of one already sent (a retry, a delayed message coming due), which
    # has no caller to tell: refusing it would lose a message an older release sent, or redeliver it forever
    for resent in ({"retries": 1}, {"eta": 1_700_000_000_000}):
        checks.before_enqueue(tasks.broker, actors.noop.message_with_options(args=(1,), **bad, **resent), None)


@pytest.mark.parametrize("queue", ["", "bad queue!", "x" * 1001])
def test_a_message_for_a_queue_no_worker_could_consume_is_refused(db_url: str, queue: str) -> None:
    from tasks.errors import InvalidOption

    # When a message of an actor nobody here declares is sent by name to such a queue
    message = dramatiq.Message(queue_name=queue, actor_name="elsewhere.job", args=(), kwargs={}, options={})
    # Then it is refused, naming the queue, and nothing is stored (it waited forever, or failed on an index)
    with pytest.raises(InvalidOption, match="queue name"):
        tasks.broker.enqueue(message)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs") == [{"n": 0}]


def test_arguments_nested_too_deep_for_json_are_not_serializable(db_url: str) -> None:
    nested: list[Any] = []
    for _ in range(10_000):
        nested = [nested]
    # When a message's arguments nest deeper than the encoder can go
    # Then the send fails as any other unencodable argument does (it raised a bare RecursionError)
    with pytest.raises(NotSerializable, match="nest too deep"):
        actors.noop.send(nested)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs") == [{"n": 0}]
