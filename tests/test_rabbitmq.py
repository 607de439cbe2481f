"""BROKER_URL=amqp://...: Dramatiq's RabbitMQ broker carries the messages, control_plane.jobs still mirrors them.

Runs against the RabbitMQ server at 127.0.0.1:5672 (``TEST_RABBITMQ_URL`` to
change it) with real ``dramatiq`` worker processes and real ``controlplane
send`` processes; skipped when no RabbitMQ answers there. Each run uses a
queue of its own, deleted at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dramatiq.broker import MessageProxy

from tests.support import ROOT, WorkerProcess, job, open_gate, query, wait_for

pika = pytest.importorskip("pika", reason="pika is not installed (pip install 'dramatiq[rabbitmq]')")

RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


def _rabbitmq() -> Any:
    params = pika.URLParameters(RABBITMQ_URL)
    params.socket_timeout = 3
    params.connection_attempts = 1
    return pika.BlockingConnection(params)


@pytest.fixture(scope="module")
def rabbit_queue() -> Iterator[str]:
    """A queue name of this run; its queues (with delay and dead-letter ones) are deleted afterwards."""
    try:
        _rabbitmq().close()
    except Exception as exc:
        pytest.skip(f"no RabbitMQ answers at {RABBITMQ_URL.split('@')[-1]}: {type(exc).__name__} {exc}")
    name = f"cp_test_{uuid.uuid4().hex[:10]}"
    yield name
    conn = _rabbitmq()
    try:
        channel = conn.channel()
        for queue in (name, f"{name}.DQ", f"{name}.XQ"):
            channel.queue_delete(queue)
    finally:
        conn.close()


def rabbit_env(db_url: str, queue: str) -> dict[str, str]:
    return {"BROKER_URL": RABBITMQ_URL, "DATABASE_URL": db_url, "CONTROLPLANE_TEST_QUEUE": queue}


def send_all(db_url: str, queue: str, *sends: tuple[str, str]) -> list[str]:
    """Run ``controlplane send ACTOR --args ARGS`` with BROKER_URL set, one process per send, all at once;
    returns the job ids they printed."""
    env = {**os.environ, **rabbit_env(db_url, queue), "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tasks.cli", "send", actor, "--module", "tests.rabbit_actors", "--args", args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for actor, args in sends
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), outputs
    return [out.strip() for out, _ in outputs]


def rabbit_worker(db_url: str, queue: str, tmp_path: Path) -> WorkerProcess:
    # No wait_ready: RabbitMQ workers do not heartbeat in control_plane.worker_heartbeats.
    return WorkerProcess(
        db_url,
        module="tests.rabbit_actors",
        extra_env=rabbit_env(db_url, queue),
        log_path=tmp_path / f"rabbit-worker-{uuid.uuid4().hex[:6]}.log",
    )


def status_is(url: str, job_id: str, status: str) -> dict[str, Any] | None:
    row = job(url, job_id)
    return row if row["status"] == status else None


def test_lifecycle_retries_and_failure_are_mirrored(db_url: str, rabbit_queue: str, tmp_path: Path) -> None:
    # Given, sent through RabbitMQ before any worker runs: a job that runs until a gate opens,
    # one that fails until another gate opens, and one that always fails (2 attempts)
    gated, retried, failing = send_all(
        db_url,
        rabbit_queue,
        ("tests.rabbit.wait_for_gate", '["rabbit"]'),
        ("tests.rabbit.fails_until_gate", '["retry"]'),
        ("tests.rabbit.always_fails", '["hopeless"]'),
    )
    # Then the mirror has them pending, with payload, queue and max_attempts
    pending = job(db_url, gated)
    assert (pending["status"], pending["type"], pending["queue"]) == (
        "pending",
        "tests.rabbit.wait_for_gate",
        rabbit_queue,
    )
    assert (pending["payload"], pending["max_attempts"], pending["attempts"]) == (
        {"args": ["rabbit"], "kwargs": {}},
        3,
        0,
    )
    assert job(db_url, failing)["status"] == "pending"
    worker = rabbit_worker(db_url, rabbit_queue, tmp_path)
    try:
        # When a worker takes them
        # Then the first is running, with its first attempt, a start time and its worker
        running = wait_for(lambda: status_is(db_url, gated, "running"), what=f"the job to run: {worker.log()}")
        assert running["attempts"] == 1 and running["started_at"] is not None and running["worker"]
        # And the second waits for its retry: pending, its error recorded, scheduled after its attempt
        waiting = wait_for(
            lambda: (row := job(db_url, retried))["status"] == "pending" and row["attempts"] >= 1 and row,
            what="the first retry to be scheduled",
        )
        assert waiting["last_error"] == "ConnectionError: gate retry is closed"
        assert waiting["errors"][0]["error"] == "ConnectionError: gate retry is closed"
        assert waiting["errors"][0]["attempt"] == 1
        assert waiting["scheduled_at"] > waiting["started_at"]
        # And the third fails for good after its 2 attempts, each error kept
        failed = wait_for(lambda: status_is(db_url, failing, "failed"), what="the final failure")
        assert failed["attempts"] == 2 and failed["completed_at"] is not None
        assert [e["error"] for e in failed["errors"]] == ["RuntimeError: failed on purpose: hopeless"] * 2
        assert failed["last_error"] == "RuntimeError: failed on purpose: hopeless"
        # When the gates open
        open_gate(db_url, "rabbit")
        open_gate(db_url, "retry")
        # Then the first completes with its result, and the second on a later attempt
        done = wait_for(lambda: status_is(db_url, gated, "completed"), what="completion")
        through = wait_for(lambda: status_is(db_url, retried, "completed"), what="the retried job to complete")
    finally:
        worker.terminate()
    assert done["result"] == "rabbit" and done["completed_at"] >= done["started_at"]
    assert done["errors"] == [] and done["last_error"] is None
    assert through["result"] == "through" and through["attempts"] >= 2
    assert len(through["errors"]) == through["attempts"] - 1  # every failed attempt, none for the last
    attempts = query(db_url, "SELECT count(*) AS n FROM test_support.effects WHERE value = 'retry'")[0]["n"]
    assert attempts == through["attempts"]
    # And the Postgres broker's queue table was never used
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages")[0]["n"] == 0


def _ready_in(queue: str) -> int:
    """Messages waiting in RabbitMQ's ``queue`` (0 when it was never declared)."""
    conn = _rabbitmq()
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if conn.is_open:
            conn.close()


def _jobs(url: str) -> int:
    return int(query(url, "SELECT count(*) AS n FROM control_plane.jobs")[0]["n"])


def test_a_send_the_mirror_could_not_record_is_refused_before_rabbitmq_has_it(db_url: str, rabbit_queue: str) -> None:
    env = {**os.environ, **rabbit_env(db_url, rabbit_queue), "PYTHONPATH": str(ROOT)}

    def send(args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "tasks.cli", "send", "tests.rabbit.wait_for_gate"]
        command += ["--module", "tests.rabbit_actors", "--args", args]
        return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)

    before, jobs_before = _ready_in(rabbit_queue), _jobs(db_url)
    # Given arguments control_plane.jobs (jsonb) cannot hold: an infinity, a NaN deep inside, a NUL character
    refused = {
        "[1e999]": "args[0] (inf, which JSON cannot hold)",
        '[{"k": [1, NaN]}]': "args[0]['k'][1] (nan, which JSON cannot hold)",
        '["a\\u0000b"]': "a string contains a NUL character",
    }
    for args, problem in refused.items():
        # When each is sent through RabbitMQ
        result = send(args)
        # Then the send fails and says which value and why, as the Postgres broker's sends do
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert f"cannot send to actor 'tests.rabbit.wait_for_gate': {problem}" in result.stderr
        assert "Unexpected failure" not in result.stderr and not result.stdout
    # And none of them reached RabbitMQ or the mirror: no job runs that control_plane.jobs does not show
    assert _ready_in(rabbit_queue) == before
    assert _jobs(db_url) == jobs_before
    # While a send of plain arguments goes through, to RabbitMQ and to the mirror
    sent = send('["fine"]')
    assert sent.returncode == 0, sent.stderr
    job_id = sent.stdout.strip()
    assert job(db_url, job_id)["payload"] == {"args": ["fine"], "kwargs": {}}
    assert _ready_in(rabbit_queue) == before + 1
    conn = _rabbitmq()
    try:
        conn.channel().queue_purge(rabbit_queue)  # no worker of another test takes it
    finally:
        conn.close()


def test_dramatiqs_own_resends_of_a_message_the_mirror_cannot_record_still_run(
    db_url: str, rabbit_queue: str, tmp_path: Path
) -> None:
    # Given a job sent by a producer without the mirror's check (another service, or a send
    # made before it existed): a NaN argument, delayed, so that a worker's consumer thread
    # sends it on when it comes due, to an actor that fails and is retried once
    (control,) = send_all(db_url, rabbit_queue, ("tests.rabbit.always_fails", '["control"]'))  # declares the queues
    now = int(time.time() * 1000)
    message_id = str(uuid.uuid4())
    body = {
        "queue_name": f"{rabbit_queue}.DQ",
        "actor_name": "tests.rabbit.always_fails",
        "args": [float("nan")],
        "kwargs": {},
        "options": {"eta": now},
        "message_id": message_id,
        "message_timestamp": now,
    }
    conn = _rabbitmq()
    try:
        conn.channel().basic_publish(
            exchange="",
            routing_key=f"{rabbit_queue}.DQ",
            body=json.dumps(body).encode(),
            properties=pika.BasicProperties(delivery_mode=2),
        )
    finally:
        conn.close()
    worker = rabbit_worker(db_url, rabbit_queue, tmp_path)
    try:
        # When a worker takes it
        # Then it runs both its attempts, like the control job: neither the consumer thread's
        # send when it came due nor the retry's was refused
        def attempts(of: str) -> int:
            sql = "SELECT count(*) AS n FROM test_support.effects WHERE message_id = %s AND kind = 'attempt'"
            return int(query(db_url, sql, (of,))[0]["n"])

        wait_for(lambda: attempts(message_id) == 2, what="both attempts of the NaN job")
        wait_for(lambda: status_is(db_url, control, "failed"), what="the control job's final failure")
        assert attempts(control) == 2
    finally:
        worker.terminate()
    log = worker.log_path.read_text() if worker.log_path else ""
    assert "Unexpected failure" not in log and "Restarting consumer" not in log, log
    # And the mirror, which cannot hold that job, said why in one line, without the statement
    mirror = f"message {message_id}: the jobs mirror could not record a start: "
    assert mirror + "ValueError: Out of range float values are not JSON compliant" in log, log


def test_a_message_for_an_unknown_actor_is_recorded_as_such(db_url: str, rabbit_queue: str, tmp_path: Path) -> None:
    # Given, through RabbitMQ, a message for an actor no worker declares
    env = {**os.environ, **rabbit_env(db_url, rabbit_queue), "PYTHONPATH": str(ROOT)}
    sent = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "send", "tests.rabbit.no_such_actor", "--queue", rabbit_queue],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert sent.returncode == 0, sent.stderr
    job_id = sent.stdout.strip()
    # When a worker of that queue takes it
    worker = rabbit_worker(db_url, rabbit_queue, tmp_path)
    try:
        failed = wait_for(lambda: status_is(db_url, job_id, "failed"), what=f"the rejection: {worker.log()}")
    finally:
        worker.terminate()
    # Then the mirror says why, as with the Postgres broker
    assert failed["last_error"].startswith("ActorNotFound: unknown actor 'tests.rabbit.no_such_actor'")


def test_a_retry_recorded_late_leaves_the_retrys_own_outcome_alone(db_url: str) -> None:
    import dramatiq
    from dramatiq.broker import MessageProxy

    import tasks
    from tasks.middleware.jobs_mirror import StandaloneMirror

    # Given two worker processes' mirrors (no RabbitMQ needed: the mirror's writes in
    # the order Dramatiq's events can reach PostgreSQL), and a job sent
    first, second = StandaloneMirror(tasks.connection), StandaloneMirror(tasks.connection)
    message = dramatiq.Message(queue_name="default", actor_name="tests.noop", args=(1,), kwargs={}, options={})
    first.enqueued(tasks.broker, message, None)
    # whose first attempt fails in the first process (each delivery is a MessageProxy), which
    # publishes the retry
    delivery = MessageProxy(message)
    first.started(tasks.broker, delivery)
    first.processed(tasks.broker, delivery, exception=ValueError("first attempt fails"))
    # When the second process runs the retry to completion before the first one's
    # record of the retry reaches the database (its connection was slow)
    retry = message.copy(options={"retries": 1})  # (Dramatiq's Retries counts it in the message)
    redelivery = MessageProxy(retry)
    second.started(tasks.broker, redelivery)
    second.processed(tasks.broker, redelivery, result="ok")
    first.enqueued(tasks.broker, retry, 150)
    # Then the job stays completed, with its result, and the first attempt's error is
    # recorded against that attempt
    row = job(db_url, message.message_id)
    assert row["status"] == "completed"
    assert row["result"] == "ok"
    assert row["attempts"] == 2
    assert [(e["attempt"], e["error"]) for e in row["errors"]] == [(1, "ValueError: first attempt fails")]


def test_a_failed_attempt_whose_retry_could_not_be_sent_is_recorded_failed_not_left_running(db_url: str) -> None:
    import dramatiq
    from dramatiq.broker import MessageProxy

    import tasks
    from tasks.middleware.jobs_mirror import StandaloneMirror

    # Given a job whose attempt fails in a worker process
    mirror = StandaloneMirror(tasks.connection)
    message = dramatiq.Message(queue_name="default", actor_name="tests.noop", args=(1,), kwargs={}, options={})
    mirror.enqueued(tasks.broker, message, None)
    delivery = MessageProxy(message)
    mirror.started(tasks.broker, delivery)
    mirror.processed(tasks.broker, delivery, exception=ValueError("the attempt fails"))
    # When Dramatiq acks it without a retry (Retries could not publish one: RabbitMQ was down)
    mirror.acked(delivery)
    # Then the job is recorded failed, saying why, not running forever
    row = job(db_url, message.message_id)
    assert row["status"] == "failed"
    assert row["last_error"] == "ValueError: the attempt fails (its retry could not be sent: see the worker's log)"
    assert [e["attempt"] for e in row["errors"]] == [1]


def test_a_late_ack_of_a_failed_attempt_does_not_take_its_retrys_error(db_url: str) -> None:
    import threading

    import dramatiq
    from dramatiq.broker import MessageProxy

    import tasks
    from tasks.middleware.jobs_mirror import StandaloneMirror

    # Given a job of two attempts whose first fails in a worker process, which publishes its retry
    mirror = StandaloneMirror(tasks.connection)
    message = dramatiq.Message(queue_name="default", actor_name="tests.noop", args=(1,), kwargs={}, options={})
    mirror.enqueued(tasks.broker, message, None)
    first = MessageProxy(message)
    mirror.started(tasks.broker, first)
    mirror.processed(tasks.broker, first, exception=ValueError("attempt 1 fails"))
    retry = message.copy(options={"retries": 1})
    mirror.enqueued(tasks.broker, retry, 10)
    # When the retry runs and fails for good on another thread of the same process before the
    # consumer thread acks the first delivery (a loaded worker), then both are acked and nacked

    def second_attempt() -> None:
        mirror.started(tasks.broker, again)
        mirror.processed(tasks.broker, again, exception=ValueError("attempt 2 fails"))

    again = MessageProxy(retry)
    thread = threading.Thread(target=second_attempt)
    thread.start()
    thread.join()
    mirror.acked(first)
    mirror.nacked(again, tasks.broker)
    # Then each attempt's error is its own: the late ack recorded nothing
    row = job(db_url, message.message_id)
    assert (row["status"], row["last_error"]) == ("failed", "ValueError: attempt 2 fails")
    assert [(e["attempt"], e["error"]) for e in row["errors"]] == [
        (1, "ValueError: attempt 1 fails"), (2, "ValueError: attempt 2 fails")
    ]


def test_enqueue_in_says_once_per_process_that_it_cannot_join_rabbitmqs_sends(db_url: str) -> None:
    # Given a process that sends through RabbitMQ, inside transactions of its own
    code = (
        "import logging, psycopg2, tasks\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "conn = psycopg2.connect(tasks.database_url())\n"
        "for _ in range(3):\n"
        "    with tasks.enqueue_in(conn):\n"
        "        pass\n"
    )
    env = {**os.environ, **rabbit_env(db_url, "unused"), "PYTHONPATH": str(ROOT)}
    # When it runs
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    # Then it is told, once, that those blocks change nothing
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("tasks.enqueue_in has no effect with RabbitmqBroker") == 1, done.stderr


def test_a_delivery_again_after_a_lost_worker_records_the_lost_attempt(db_url: str) -> None:
    import dramatiq
    from dramatiq.broker import MessageProxy

    import tasks
    from tasks.middleware.jobs_mirror import StandaloneMirror

    # Given a job whose first attempt started in a worker process that was then killed
    # (nothing more was recorded: no outcome, no ack), and a retry's late record aside
    lost, survivor = StandaloneMirror(tasks.connection), StandaloneMirror(tasks.connection)
    message = dramatiq.Message(queue_name="default", actor_name="tests.noop", args=(1,), kwargs={}, options={})
    lost.enqueued(tasks.broker, message, None)
    lost.started(tasks.broker, MessageProxy(message))
    # When RabbitMQ delivers it again to another worker, which completes it
    again = MessageProxy(message)
    survivor.started(tasks.broker, again)
    survivor.processed(tasks.broker, again, result="ok")
    # Then the lost attempt is in the history, as the Postgres broker's reaper records one
    row = job(db_url, message.message_id)
    assert (row["status"], row["attempts"]) == ("completed", 2)
    assert [e["attempt"] for e in row["errors"]] == [1]
    assert "did not finish the attempt" in row["errors"][0]["error"]
    # While a retry that starts before its own record lands is not taken for a lost attempt
    retried = dramatiq.Message(queue_name="default", actor_name="tests.noop", args=(2,), kwargs={}, options={})
    lost.enqueued(tasks.broker, retried, None)
    first_delivery = MessageProxy(retried)
    lost.started(tasks.broker, first_delivery)
    lost.processed(tasks.broker, first_delivery, exception=ValueError("first attempt fails"))
    survivor.started(tasks.broker, MessageProxy(retried.copy(options={"retries": 1})))
    assert job(db_url, retried.message_id)["errors"] == []


def test_a_delivery_again_after_a_worker_lost_on_the_last_attempt_fails_the_job_without_running_it(
    db_url: str,
) -> None:
    import dramatiq

    import tasks
    from tasks.errors import WorkerLost
    from tasks.middleware.jobs_mirror import StandaloneMirror
    from tests import actors  # noqa: F401 (declares the hook's actor, as the job's workers do)

    # Given a job of two attempts whose workers were both killed while running it (as one
    # that kills its own process is: an OOM kill, a crash in a C extension)
    mirror = StandaloneMirror(tasks.connection)
    message = dramatiq.Message(queue_name="default", actor_name="tests.noop", args=(1,), kwargs={},
                               options={"max_attempts": 2, "on_final_failure": "tests.callback_sink"})  # fmt: skip
    mirror.enqueued(tasks.broker, message, None)
    mirror.started(tasks.broker, Redelivery(message, redelivered=False))
    mirror.started(tasks.broker, Redelivery(message, redelivered=True))
    # When RabbitMQ delivers it a third time (its redeliveries never count as retries)
    again = Redelivery(message, redelivered=True)
    with pytest.raises(WorkerLost):
        mirror.started(tasks.broker, again)
    # Then it is failed, not run (Dramatiq nacks a failed message its middleware skipped), and
    # the job says why, as the Postgres broker's reaper ends one
    assert again.failed
    mirror.skipped(again)
    mirror.nacked(again, tasks.broker)
    row = job(db_url, message.message_id)
    assert (row["status"], row["attempts"]) == ("failed", 2)
    assert row["last_error"].startswith("WorkerLost: delivered again after its worker did not finish its last")
    assert [e["attempt"] for e in row["errors"]] == [1, 2]
    # And its on_final_failure is sent, as the reaper sends it: no attempt ran to send it
    hooks = query(db_url, "SELECT body FROM control_plane.messages WHERE actor = 'tests.callback_sink'")
    assert [dramatiq.Message.decode(bytes(h["body"])).args[1]["type"] for h in hooks] == ["WorkerLost"]


class Redelivery(MessageProxy):  # type: ignore[misc]
    """A delivery as Dramatiq's RabbitMQ consumer makes one: it says whether RabbitMQ delivered it before."""

    def __init__(self, message: Any, *, redelivered: bool) -> None:
        super().__init__(message)
        self.redelivered = redelivered


def test_a_copy_sent_again_while_the_job_runs_is_not_taken_for_its_lost_attempt(db_url: str) -> None:
    import dramatiq

    import tasks
    from tasks.middleware.jobs_mirror import StandaloneMirror

    # Given a job of one attempt, running
    mirror = StandaloneMirror(tasks.connection)
    message = dramatiq.Message(queue_name="default", actor_name="tests.noop", args=(1,), kwargs={},
                               options={"max_attempts": 1})  # fmt: skip
    mirror.enqueued(tasks.broker, message, None)
    mirror.started(tasks.broker, Redelivery(message, redelivered=False))
    # When a copy sent again by hand (a sender that lost RabbitMQ's confirm) starts beside it
    copy = Redelivery(message, redelivered=False)
    mirror.started(tasks.broker, copy)
    # Then it runs: no lost attempt recorded, the job not failed
    assert not copy.failed
    row = job(db_url, message.message_id)
    assert (row["status"], row["attempts"], row["errors"]) == ("running", 2, [])
    # And once it ends, the job sent again later starts its attempts afresh
    mirror.processed(tasks.broker, copy, result=None)
    mirror.started(tasks.broker, Redelivery(message, redelivered=False))
    assert query(db_url, "SELECT attempts, attempts_before_retry FROM control_plane.jobs WHERE id = %s",
                 (message.message_id,)) == [{"attempts": 3, "attempts_before_retry": 2}]  # fmt: skip


def test_a_send_rabbitmq_refuses_or_cannot_reach_says_rabbitmq_not_the_database(db_url: str, rabbit_queue: str) -> None:
    # Given BROKER_URLs with a wrong password, a port nothing listens on, and TLS to a plain port
    wrong = RABBITMQ_URL.replace("guest:guest@", "guest:Wr0ngPw@")
    unreachable = "amqp://guest:guest@127.0.0.1:1/%2F"
    plain_port_tls = RABBITMQ_URL.replace("amqp://", "amqps://")
    for url, says in ((wrong, "ACCESS_REFUSED"), (unreachable, "AMQPConnectionError"), (plain_port_tls, "over TLS")):
        # When a job is sent
        env = {**os.environ, **rabbit_env(db_url, rabbit_queue), "BROKER_URL": url, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "tasks.cli", "send", "tests.rabbit.always_fails", "--args", '["x"]',
                   "--module", "tests.rabbit_actors"]  # fmt: skip
        sent = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        # Then it fails in one line naming RabbitMQ and why, with no password and no traceback
        assert sent.returncode == 1, sent.stderr
        assert sent.stderr.startswith("controlplane: error: cannot connect to RabbitMQ (BROKER_URL)"), sent.stderr
        assert says in sent.stderr and "Wr0ngPw" not in sent.stderr and "Traceback" not in sent.stderr


def test_sends_through_rabbitmq_wait_for_its_confirmation(db_url: str) -> None:
    # Given the broker a process configures with BROKER_URL set
    env = {**os.environ, **rabbit_env(db_url, "unused"), "PYTHONPATH": str(ROOT)}
    code = "import tasks; print(type(tasks.broker).__name__, tasks.broker.confirm_delivery)"
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    # Then its publishes wait for RabbitMQ's confirmation: one lost as the connection drops
    # raises to the sender instead of leaving a pending jobs row that no worker will run
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["RabbitmqBroker", "True"]


def test_a_retry_through_rabbitmq_is_counted_once_and_its_delayed_message_not_for_good(
    db_url: str, rabbit_queue: str, tmp_path: Path
) -> None:
    from tests.test_metrics import free_port, try_scrape

    # Given workers serving Dramatiq's metrics (two processes), RabbitMQ carrying the messages,
    # and a job of two attempts that fails both: one retry, held in a .DQ queue for its backoff
    port = free_port()
    (tmp_path / "prometheus").mkdir()
    env = {**rabbit_env(db_url, rabbit_queue), "CONTROLPLANE_METRICS_PORT": str(port),
           "CONTROLPLANE_METRICS_HOST": "127.0.0.1", "dramatiq_prom_db": str(tmp_path / "prometheus")}
    (failing,) = send_all(db_url, rabbit_queue, ("tests.rabbit.always_fails", '["counted"]'))
    worker = WorkerProcess(db_url, module="tests.rabbit_actors", processes=2, threads=2, extra_env=env,
                           log_path=tmp_path / "rabbit-metrics-worker.log")
    labels = (("actor_name", "tests.rabbit.always_fails"), ("queue_name", rabbit_queue))

    def family(samples: dict[Any, float], name: str) -> dict[Any, float]:
        return {key[1]: value for key, value in samples.items() if key[0] == name}

    seen: list[Any] = [None]

    def settled() -> dict[Any, float] | None:
        seen[0] = samples = try_scrape(f"http://127.0.0.1:{port}/metrics")
        if not samples or samples.get(("dramatiq_messages_total", labels)) != 2:
            return None
        return samples if family(samples, "dramatiq_delayed_messages_inprogress") == {labels: 0} else None

    try:
        wait_for(lambda: status_is(db_url, failing, "failed"), what="the final failure")
        # When its worker's metrics are scraped once both attempts ran (the retry handed on to its queue)
        try:
            samples = wait_for(settled, timeout=15, what="no delayed message left counted once the retry ran")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the last scrape: {seen[0]}") from None
    finally:
        worker.terminate()
    # Then the one retry is counted once, on the job's queue, and no delayed message is left counted
    assert family(samples, "dramatiq_message_retries_total") == {labels: 1}


def test_a_rabbitmq_broker_url_without_its_client_library_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    # Given a deployment whose BROKER_URL names RabbitMQ, installed without the [rabbitmq] extra
    # (pika, as if not installed: a module of that name that cannot be imported comes first)
    (tmp_path / "pika.py").write_text("raise ModuleNotFoundError(\"No module named 'pika'\", name='pika')\n")
    env = {**os.environ, "BROKER_URL": RABBITMQ_URL, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    # When an operator runs a command
    done = subprocess.run([str(Path(sys.executable).parent / "controlplane"), "jobs", "list"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    # Then it fails in one line that says what to install, not with a traceback
    assert done.returncode == 1, done
    assert done.stderr.strip().splitlines() == [
        "controlplane: error: BROKER_URL names RabbitMQ, but its client library is not installed "
        "(No module named 'pika'): pip install 'controlplane-tasks[rabbitmq]'"
    ], done.stderr
