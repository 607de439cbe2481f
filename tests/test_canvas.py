"""Pipelines and group callbacks when a message is delivered twice (at least once), and in transactions.

The middleware's after-hooks run here in-process, once per delivery, as a worker's
thread runs them after the job: a second call with the same message is the delivery
of a message whose worker died after the job's work but before its outcome was written.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from dramatiq import MessageProxy, group, pipeline
from dramatiq.message import Message
from dramatiq.middleware import GroupCallbacks, Pipelines
from dramatiq.results import ResultFailure, ResultMissing, Results

import tasks
from tasks.errors import Conflict
from tasks.middleware import canvas as canvas_module
from tasks.middleware.canvas import _CHILD_PASS, pipeline_end
from tests import actors
from tests.support import (
    at_once,
    claim_in_process,
    job,
    jobs_in,
    query,
    reap_from_another_worker,
    running_worker,
    settle_in_process,
    wait_for,
)


def middleware(kind: type) -> Any:
    """The broker's middleware of Dramatiq's ``kind`` (the control plane's subclass of it)."""
    return next(m for m in tasks.broker.middleware if isinstance(m, kind))


def queued(url: str, actor: str) -> list[Message[Any]]:
    rows = query(url, "SELECT body FROM control_plane.messages WHERE actor = %s ORDER BY id", (actor,))
    return [Message.decode(bytes(r["body"])) for r in rows]


def sent_group(url: str, label: str, size: int = 3) -> list[Message[Any]]:
    """Send a group of ``size`` noop jobs with a completion callback; its children as queued (visible ones)."""
    members = group([actors.noop.message(i) for i in range(size)])
    members.add_completion_callback(actors.group_done.message(label))
    members.run()
    return queued(url, "tests.noop")


def test_a_child_delivered_twice_is_counted_once_and_the_callback_is_sent_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a group of three with a completion callback, and every send of the callback counted
    children = sent_group(db_url, "all three")
    sends: list[str] = []
    enqueue = tasks.broker.enqueue

    def counting(message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        if message.actor_name == "tests.group_done":
            sends.append(message.message_id)
        return enqueue(message, delay=delay)

    monkeypatch.setattr(tasks.broker, "enqueue", counting)
    callbacks = middleware(GroupCallbacks)
    # When the first child is delivered twice, then the second once
    for child in (children[0], children[0], children[1]):
        callbacks.after_process_message(tasks.broker, child, result=None)
    # Then the callback is not sent yet: the group has a child left
    assert sends == []
    # And when the last child completes, and is delivered again, it is sent once
    for child in (children[2], children[2], children[0]):
        callbacks.after_process_message(tasks.broker, child, result=None)
    assert len(sends) == 1
    assert len(queued(db_url, "tests.group_done")) == 1


def test_children_pass_from_a_cached_plan_and_the_callback_is_sent_once(db_url: str) -> None:
    # Given a group of twelve with a completion callback
    children = sent_group(db_url, "twelve", size=12)
    hook = middleware(GroupCallbacks)
    # When its children pass one after another (a worker's threads, taking turns on pooled connections)
    for child in children:
        hook.after_process_message(tasks.broker, child, result=None)
    # Then the callback is sent once, and PostgreSQL stopped planning the pass (planning it took
    # four times as long as running it): the pooled connection runs it from a generic plan
    assert len(queued(db_url, "tests.group_done")) == 1
    with tasks.broker.connection() as conn, conn.cursor() as cur:
        cur.execute("SELECT generic_plans FROM pg_prepared_statements WHERE name = %s", (_CHILD_PASS.name,))
        ((generic,),) = cur.fetchall()
    assert generic >= 4


@pytest.mark.parametrize("kind", ["group", "pipeline"])
def test_a_hook_rides_out_a_database_out_of_reach_and_sends_on_when_it_is_back(
    db_url: str, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # Given the last child of a group with a callback (or a pipeline's first step), run
    if kind == "group":
        children = sent_group(db_url, "after the outage", size=1)
        held, hook = children[0], middleware(GroupCallbacks)
    else:
        chain = pipeline([actors.noop.message("a"), actors.noop.message()])
        chain.run()
        held, hook = MessageProxy(queued(db_url, "tests.noop")[0]), middleware(Pipelines)
    sent_on = "tests.group_done" if kind == "group" else "tests.noop"
    before = len(queued(db_url, sent_on))
    # And a database that cannot be reached (connections refused: a restart, a crash's recovery)
    pool = tasks.broker._pool
    pool.close()
    real, refusals = pool._url_factory, []
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()

    def unreachable() -> str:
        refusals.append(1)
        return f"postgresql://root@127.0.0.1:{port}/postgres?connect_timeout=2"

    monkeypatch.setattr(pool, "_url_factory", unreachable)
    # When its hook runs while it is out of reach, past the three tries it was given before
    hooked = threading.Thread(target=hook.after_process_message, args=(tasks.broker, held), kwargs={"result": "a"})
    hooked.start()
    wait_for(lambda: len(refusals) >= 5, what="five refused tries")
    # And the database comes back
    monkeypatch.setattr(pool, "_url_factory", real)
    hooked.join(timeout=60)
    # Then the hook went on: the group's callback is sent, the pipeline's next step too
    assert not hooked.is_alive()
    assert len(queued(db_url, sent_on)) == before + 1


def test_children_passing_at_once_from_many_threads_some_twice_send_the_callback_once_after_the_last(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a group of 40 with a completion callback, and the children counted on its barrier
    # (committed) noted at each send of the callback
    children = sent_group(db_url, "forty", size=40)
    counted_at_send: list[int] = []
    commits_at_send: list[str] = []
    enqueue = tasks.broker.enqueue
    markers = "SELECT count(*) AS n FROM control_plane.rate_limits WHERE key LIKE '%@done:%'"

    def noting(message: Message[Any], *, delay: int | None = None) -> Message[Any]:
        if message.actor_name == "tests.group_done":
            counted_at_send.append(query(db_url, markers)[0]["n"])
            with sys.modules["tasks.broker"].joined_connection().cursor() as cur:  # the last pass's transaction
                cur.execute("SHOW synchronous_commit")
                commits_at_send.append(cur.fetchone()[0])
        return enqueue(message, delay=delay)

    monkeypatch.setattr(tasks.broker, "enqueue", noting)
    hook = middleware(GroupCallbacks)
    # When 8 threads pass them at once, every fourth child delivered twice (the two at once)
    deliveries = [child for i, child in enumerate(children) for _ in range(2 if i % 4 == 0 else 1)]
    def pass_all_left() -> int:
        passed = 0
        while True:
            try:
                child = deliveries.pop()
            except IndexError:
                return passed
            hook.after_process_message(tasks.broker, child, result=None)
            passed += 1

    passes = at_once(pass_all_left, 8)
    # Then every delivery passed without an error, and the callback was sent once, by the last
    # child: the 39 others were counted before it
    assert sum(p for p in passes if isinstance(p, int)) == 50, passes
    assert counted_at_send == [39]
    # (the last pass, which sends the callback, commits waiting for the WAL flush, as sends do:
    # undone by a crash after the callback ran, it would send it again)
    assert commits_at_send == ["on"]
    assert len(queued(db_url, "tests.group_done")) == 1
    # And the barrier holds its last party, each child counted once
    assert query(db_url, markers)[0]["n"] == 40
    barrier = query(db_url, "SELECT value FROM control_plane.rate_limits WHERE key NOT LIKE '%@done:%'")
    assert [r["value"] for r in barrier] == [1]


def test_the_last_two_children_passing_at_the_same_instant_send_the_callback_once(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a group of three whose first child passed, and the barrier's row held by another
    # session so that the other two children come to it at the same instant
    children = sent_group(db_url, "two at once")
    hook = middleware(GroupCallbacks)
    hook.after_process_message(tasks.broker, children[0], result=None)
    holder = psycopg2.connect(db_url)
    with holder.cursor() as cur:
        cur.execute("SELECT 1 FROM control_plane.rate_limits WHERE key NOT LIKE '%@done:%' FOR UPDATE")
    passing = [threading.Thread(target=hook.after_process_message, args=(tasks.broker, child), kwargs={"result": None})
               for child in children[1:]]  # fmt: skip
    for thread in passing:
        thread.start()
    waiting = ("SELECT count(*) AS n FROM pg_stat_activity "
               "WHERE datname = current_database() AND wait_event_type = 'Lock'")
    wait_for(lambda: query(db_url, waiting)[0]["n"] == 2, what="both children to wait for the barrier")
    # When the holder lets go
    holder.rollback()
    holder.close()
    for thread in passing:
        thread.join(30)
    # Then one of them was the last party, and the callback was sent once
    assert len(queued(db_url, "tests.group_done")) == 1


def test_a_pipeline_step_delivered_again_does_not_send_its_finished_next_step_again(db_url: str) -> None:
    # Given a pipeline whose first step ran and sent the second, which then completed
    chain = pipeline([actors.noop.message("a"), actors.noop.message()])
    chain.run()
    pipes = middleware(Pipelines)
    consumer, first = claim_in_process()
    pipes.after_process_message(tasks.broker, first, result="a")
    settle_in_process(consumer, first, "ack")
    consumer, second = claim_in_process()
    assert second.args == ("a",)
    settle_in_process(consumer, second, "ack")
    # When the first step is delivered again (its worker died before its outcome was written)
    pipes.after_process_message(tasks.broker, first, result="a")
    # Then the second step stays completed, once, and nothing is queued again
    rows = query(db_url, "SELECT status, attempts FROM control_plane.jobs WHERE id = %s", (second.message_id,))
    assert [(r["status"], r["attempts"]) for r in rows] == [("completed", 1)]
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages")[0]["n"] == 0


def test_a_pipeline_run_again_runs_every_step_again_and_a_redelivery_still_sends_once(db_url: str) -> None:
    # Given a pipeline of two that ran to the end
    chain = pipeline([actors.noop.message("a"), actors.noop.message()])
    pipes = middleware(Pipelines)

    def run_step(result: str) -> Any:
        consumer, held = claim_in_process()
        if result:
            pipes.after_process_message(tasks.broker, held, result=result)
        settle_in_process(consumer, held, "ack")
        return held

    chain.run()
    run_step("a")
    second = run_step("")
    # When the same pipeline object is run again (Dramatiq runs every step again)
    chain.run()
    first = run_step("b")
    # Then its second step is sent again, with the new result, and runs again
    again = run_step("")
    assert (again.message_id, again.args) == (second.message_id, ("b",))
    rows = query(db_url, "SELECT status, attempts FROM control_plane.jobs WHERE id = %s", (second.message_id,))
    assert [(r["status"], r["attempts"]) for r in rows] == [("completed", 2)]
    # And a redelivery of that run's first step does not send it a third time
    pipes.after_process_message(tasks.broker, first, result="b")
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages")[0]["n"] == 0


def test_a_pipeline_run_again_gives_its_caller_the_new_runs_result_not_the_last_ones(
    db_url: str, tmp_path: Path
) -> None:
    # Given a pipeline of two that ran to the end, its caller told "a"
    chain = pipeline([actors.noop.message("a"), actors.noop.message()])
    with running_worker(db_url, tmp_path):
        chain.run()
        assert chain.get_result(block=True, timeout=120_000) == "a"
    # And when it is run again in a transaction that rolls back, nothing is forgotten
    conn = psycopg2.connect(db_url)
    try:
        with tasks.enqueue_in(conn):
            chain.run()
        conn.rollback()
    finally:
        conn.close()
    assert chain.get_result() == "a"
    # When the same pipeline is run again, no worker running it yet
    chain.run()
    # Then its caller has no result yet: the first run's was for the first run
    with pytest.raises(ResultMissing, match="no result is kept for it"):
        chain.get_result()
    assert query(db_url, "SELECT status FROM control_plane.jobs WHERE id = %s", (chain.messages[0].message_id,)) == [
        {"status": "pending"}
    ]


@pytest.mark.parametrize("results_table", ["free", "locked"])
def test_a_pipeline_sent_in_a_transaction_leaves_the_transaction_as_it_was(db_url: str, results_table: str) -> None:
    # Given a caller's transaction (and, maybe, an operator's holding control_plane.results)
    holder, conn = psycopg2.connect(db_url), psycopg2.connect(db_url)
    try:
        if results_table == "locked":
            with holder.cursor() as cur:
                cur.execute("LOCK TABLE control_plane.results IN SHARE MODE")
        # When the caller sends a pipeline in its transaction (forgetting a last run's result,
        # which gives up on a lock after 250 ms), then commits
        chain = pipeline([actors.noop.message("a"), actors.noop.message()])
        with tasks.enqueue_in(conn):
            chain.run()
            with conn.cursor() as cur:
                cur.execute("SHOW lock_timeout")
                (lock_timeout,) = cur.fetchone()
        conn.commit()
    finally:
        holder.close()
        conn.close()
    # Then the transaction went on (it was not aborted), its lock timeout its own, and the job is sent
    assert lock_timeout == "0"
    assert job(db_url, chain.messages[0].message_id)["status"] == "pending"


def _run_until_the_pipeline_stops(db_url: str, tmp_path: Path, chain: pipeline) -> tuple[ResultFailure, dict[str, Any]]:
    """Run ``chain`` on a worker until its caller hears it stopped (a ``FollowUpNotSent``) and its
    first step has its outcome: that failure, and the first step's jobs row (failed)."""
    first = chain.messages[0].message_id
    with running_worker(db_url, tmp_path):
        chain.run()
        with pytest.raises(ResultFailure) as failure:
            chain.get_result(block=True, timeout=60_000)
        wait_for(lambda: job(db_url, first)["status"] != "running", what="the first step's outcome")
    assert failure.value.orig_exc_type == "FollowUpNotSent"
    step = job(db_url, first)
    assert step["status"] == "failed", step
    return failure.value, step


def test_a_step_whose_result_the_next_step_cannot_take_fails_and_its_pipelines_caller_hears_it_at_once(
    db_url: str, tmp_path: Path
) -> None:
    # Given a pipeline of three whose first step returns a string with a NUL (PostgreSQL cannot hold it)
    # (and an on_final_failure hook)
    chain = pipeline([
        actors.returns_awkward.message_with_options(args=("nul",), on_final_failure="tests.callback_sink"),
        actors.noop.message(),
        actors.noop.message(),
    ])  # fmt: skip
    first, second = chain.messages[0].message_id, chain.messages[1].message_id
    # When a worker runs it
    # Then the caller of the pipeline's result hears why at once, instead of waiting out its timeout
    failure, step = _run_until_the_pipeline_stops(db_url, tmp_path, chain)
    assert f"the pipeline stopped at tests.returns_awkward (job {first}): the job ran, but its pipeline's next " \
           f"step (tests.noop, job {second}) could not be sent: NotSerializable:" in str(failure)  # fmt: skip
    # And the step is failed, not completed, saying why (Dramatiq's hook logged it and acked the job)
    assert step["last_error"].startswith(
        f"FollowUpNotSent: the job ran, but its pipeline's next step (tests.noop, job {second}) could not be sent: "
        "NotSerializable:"
    ), step["last_error"]
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'tests.noop'") == [{"n": 0}]
    # And its on_final_failure hook was sent, as for a job whose retries are spent
    (hook,) = query(db_url, "SELECT payload FROM control_plane.jobs WHERE type = 'tests.callback_sink'")
    assert hook["payload"]["args"][0]["message_id"] == first
    assert hook["payload"]["args"][1]["type"] == "FollowUpNotSent", hook


def test_a_step_whose_next_step_is_a_duplicate_of_a_live_keyed_job_fails_and_its_pipelines_caller_hears_it(
    db_url: str, tmp_path: Path
) -> None:
    # Given a live job (delayed) holding the unique key of tests.keyed_sink's actor
    holder = actors.keyed_sink.send_with_options(args=("m", "i"), delay=600_000)
    # And a pipeline whose second step is a message of that actor
    chain = pipeline([actors.noop.message("a"), actors.keyed_sink.message("m"), actors.noop.message()])
    second = chain.messages[1].message_id
    # When a worker runs it
    # Then the caller hears at once that the pipeline stopped, and why (it waited out its
    # timeout: the second step became the holder, which is no step of the pipeline)
    failure, step = _run_until_the_pipeline_stops(db_url, tmp_path, chain)
    assert f"its pipeline's next step (tests.keyed_sink, job {second}) could not be sent: Conflict: job " \
           f"{holder.message_id} holds its unique key 'tests.keyed_sink'" in str(failure)  # fmt: skip
    # And the first step is failed, not completed, so that an operator sees where the pipeline stopped
    assert step["last_error"].startswith("FollowUpNotSent: the job ran, but its pipeline's next step"), step
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'tests.keyed_sink'") == [{"n": 1}]


@pytest.mark.parametrize(
    ("later", "named"),
    [
        ({"time_limit": "100"}, r"its pipeline's step 2 \('tests\.noop'\): the time_limit option"),
        ({"delay": 10**13}, r"its pipeline's step 2 \('tests\.noop'\): the delay option"),
        ({"throws": "ValueError"}, r"its pipeline's step 2 \('tests\.noop'\): a message cannot carry the throws"),
    ],
)
def test_a_pipeline_whose_later_step_a_worker_could_not_send_is_refused_when_sent(
    db_url: str, later: dict[str, Any], named: str
) -> None:
    from tasks.errors import InvalidOption

    # When a pipeline is sent whose second step has an option its worker could not send it with
    chain = pipeline([actors.noop.message(1), actors.noop.message_with_options(**later), actors.noop.message()])
    # Then its caller hears which step and which option, at the send, and nothing was stored
    with pytest.raises(InvalidOption, match=f"cannot send to actor 'tests.noop': {named}"):
        chain.run()
    # (its third step, and a group's callback, the same: every step a worker would send)
    third = pipeline([actors.noop.message(1), actors.noop.message(), actors.noop.message_with_options(max_age=-1)])
    with pytest.raises(InvalidOption, match=r"its pipeline's step 3 \('tests\.noop'\): the max_age option"):
        third.run()
    members = group([actors.noop.message(i) for i in range(2)])
    members.add_completion_callback(actors.group_done.message_with_options(args=("x",), max_retries="two"))
    callback = r"its group's completion callback \('tests\.group_done'\): the max_retries option"
    with pytest.raises(InvalidOption, match=callback):
        members.run()
    # (Dramatiq's group.run writes its barrier before its first send: that row alone stays, until its TTL)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs") == [{"n": 0}]


def test_a_pipeline_or_group_whose_later_delays_a_worker_sends_with_is_not_refused(db_url: str, tmp_path: Path) -> None:
    # Given a pipeline whose second step's delay was computed from a deadline already past (negative:
    # the worker's send clamps it to 0, as a message's own delay is), and a group whose callback
    # carries a delay (the worker's send of a callback never reads it: Dramatiq's neither)
    chain = pipeline([actors.noop.message(1), actors.noop.message_with_options(delay=-250), actors.noop.message()])
    members = group([actors.noop.message(i) for i in range(2)])
    members.add_completion_callback(actors.group_done.message_with_options(args=("late",), delay=-1))
    # When they are sent, then run
    chain.run()
    members.run()
    with running_worker(db_url, tmp_path):
        # Then both go through, as they did before their later steps were checked at the send
        assert chain.get_result(block=True, timeout=60_000) == 1
        wait_for(lambda: query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'tests.group_done'"
                                       " AND status = 'completed'") == [{"n": 1}], what="the group's callback")


def test_a_group_member_that_cannot_send_its_groups_callback_fails_saying_so_and_the_others_complete(
    db_url: str, tmp_path: Path
) -> None:
    # Given a group of two whose completion callback has an option no worker can send it with
    # (in bodies a release before the send's check stored)
    members = group([actors.noop.message(i) for i in range(2)])
    members.add_completion_callback(actors.group_done.message("never"))
    with tasks.enqueue_in(conn := psycopg2.connect(db_url)):
        members.run()
        with conn.cursor() as cur:
            cur.execute("""UPDATE control_plane.messages SET body = convert_to(jsonb_set(
                               convert_from(body, 'UTF8')::jsonb,
                               '{options,group_completion_callbacks,0,options,time_limit}', '"100"')::text, 'UTF8')""")
    conn.commit()
    conn.close()
    ids = [m.message_id for m in members.children]  # type: ignore[union-attr]
    group_id = queued(db_url, "tests.noop")[0].options["group_completion_uuid"]
    # When a worker runs them
    with running_worker(db_url, tmp_path):
        wait_for(lambda: jobs_in(db_url, ids, "completed", "failed"), what="both members' outcomes")
    # Then the member that was to send the callback is failed, naming its group and why, not completed
    rows = {r["status"]: r for r in query(db_url, "SELECT status, last_error FROM control_plane.jobs "
                                                  "WHERE id = ANY(%s::uuid[])", (ids,))}  # fmt: skip
    assert sorted(rows) == ["completed", "failed"], rows
    assert rows["failed"]["last_error"].startswith(
        f"FollowUpNotSent: the job ran, but it could not be counted in its group {group_id}, whose "
        "completion callbacks wait for it: InvalidOption: cannot send to actor 'tests.group_done': the time_limit"
    ), rows["failed"]["last_error"]
    # And no callback ran, and no job is left running
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE status NOT IN ('completed', 'failed')"
                         " OR type = 'tests.group_done'") == [{"n": 0}]  # fmt: skip


def test_a_step_that_fails_for_good_fails_the_pipelines_result_at_once_naming_the_step(
    db_url: str, tmp_path: Path
) -> None:
    # Given a pipeline whose middle step fails at each of its two attempts, quoting a password
    chain = pipeline([
        actors.noop.message("a"),
        actors.fails_quoting_a_password.message_with_options(pipe_ignore=True),
        actors.noop.message(),
    ])  # fmt: skip
    middle = chain.messages[1].message_id
    # When a worker runs it
    with running_worker(db_url, tmp_path):
        chain.run()
        # Then its caller hears the step's failure, redacted, as soon as the step has failed for
        # good, not at the end of its timeout (a ResultTimeout)
        with pytest.raises(ResultFailure) as failure:
            chain.get_result(block=True, timeout=120_000)
    assert failure.value.orig_exc_type == "RuntimeError"
    assert str(failure.value).startswith(
        f"actor raised RuntimeError: the pipeline stopped at tests.fails_quoting_a_password (job {middle}): "
        "could not connect to postgresql://"
    ), str(failure.value)
    assert "hunter2" not in str(failure.value)
    assert job(db_url, middle)["status"] == "failed"
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'tests.noop'")[0]["n"] == 1


def _fails_for_good(message: Any, error: str) -> None:
    """``message`` fails for good: its last attempt's ``before_nack``, with ``error`` its outcome's."""
    message.fail()
    message.error_text = error
    middleware(Pipelines).before_nack(tasks.broker, message)


def _first_step_claimed() -> tuple[Any, Any]:
    """A pipeline of two, sent, and its first step as a worker claimed it (its consumer closed)."""
    chain = pipeline([actors.noop.message("b"), actors.noop.message()])
    chain.run()
    consumer, head = claim_in_process()
    consumer.close()
    assert head.message_id == chain.messages[0].message_id
    return chain, head


def _first_step_sent_on(db_url: str) -> tuple[Any, Any, Any, Any]:
    """A pipeline of two whose first step (claimed here, its consumer returned) ran and sent its next step."""
    first = actors.noop.message_with_options(args=("a",), max_attempts=3)
    chain = pipeline([first, actors.noop.message()])
    chain.run()
    consumer, held = claim_in_process()
    middleware(Results).after_process_message(tasks.broker, held, result="a")
    middleware(Pipelines).after_process_message(tasks.broker, held, result="a")
    return chain, consumer, held, first


def test_a_step_that_went_on_and_then_fails_on_a_delivery_again_does_not_stop_its_pipeline(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a pipeline whose first step returned and sent its next step, and whose next step completed
    chain, consumer, first, _ = _first_step_sent_on(db_url)
    consumer.close()
    second = chain.messages[1]
    query(db_url, "UPDATE control_plane.jobs SET status = 'completed' WHERE id = %s", (second.message_id,))
    # When a delivery of the first step again (its worker cut off past its lease) fails for good
    # (the same message, as its delivery again carries it)
    with caplog.at_level("WARNING", logger="tasks.middleware.canvas"):
        _fails_for_good(first, "RuntimeError: flaky on the second run")
    # Then the pipeline's caller is not told it stopped (its next step ran), and the log says why
    with pytest.raises(ResultMissing):
        chain.get_result()
    assert "the pipeline went on, its caller is not told it stopped" in caplog.text
    # But a step that fails before it sent its next step still stops it, as before
    query(db_url, "DELETE FROM control_plane.messages")
    other, head = _first_step_claimed()
    _fails_for_good(head, "RuntimeError: broken")
    with pytest.raises(ResultFailure, match=r"the pipeline stopped at tests\.noop"):
        other.get_result(block=True, timeout=5_000)


def test_a_group_sent_in_a_transaction_that_rolls_back_leaves_no_barrier(db_url: str) -> None:
    # Given a group with a completion callback sent inside a caller's transaction
    conn = psycopg2.connect(db_url)
    try:
        with tasks.enqueue_in(conn):
            sent_group(db_url, "never")
        # When the caller rolls back
        conn.rollback()
    finally:
        conn.close()
    # Then neither its jobs nor its barrier are left
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs")[0]["n"] == 0
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.rate_limits")[0]["n"] == 0


def test_a_group_whose_barrier_expired_sends_no_callback_and_says_so(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a group of three whose barrier expired while a child kept retrying (past barrier_ttl)
    children = sent_group(db_url, "too late")
    query(db_url, "UPDATE control_plane.rate_limits SET expires_at = now() - interval '1 second'")
    # When two of its children finish
    with caplog.at_level("WARNING", logger="tasks.middleware.canvas"):
        for child in children[:2]:
            middleware(GroupCallbacks).after_process_message(tasks.broker, child, result=None)
    # Then no callback was sent (Dramatiq's fired it at once, before the group was done), and the log says why
    assert queued(db_url, "tests.group_done") == []
    assert "its barrier expired before all its children finished" in caplog.text


def test_with_another_broker_a_groups_barrier_is_written_at_once_as_its_messages_are_published(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import contextlib
    from collections.abc import Iterator

    from dramatiq.brokers.stub import StubBroker

    from tasks.rate_limits import PostgresRateLimiterBackend

    # Given RabbitMQ (here a stub) carrying the messages: they are published at once, outside any transaction
    monkeypatch.setattr(tasks, "broker", StubBroker())

    @contextlib.contextmanager
    def pooled() -> Iterator[Any]:  # the control plane's pool, as under RabbitMQ
        own = psycopg2.connect(db_url)
        own.autocommit = True
        try:
            yield own
        finally:
            own.close()

    backend = PostgresRateLimiterBackend(pooled)
    conn = psycopg2.connect(db_url)
    try:
        # When a barrier is made inside enqueue_in, and the caller rolls back
        with tasks.enqueue_in(conn):
            assert backend.add("group-under-rabbitmq", 3, 60_000)
        conn.rollback()
    finally:
        conn.close()
    # Then the barrier is there, as the published children need it
    assert query(db_url, "SELECT value FROM control_plane.rate_limits WHERE key = 'group-under-rabbitmq'") == [
        {"value": 3}
    ]


@pytest.mark.parametrize("case", ["its last attempt", "attempts left", "cancelled"])
@pytest.mark.parametrize("kind", ["pipeline", "group"])
def test_a_step_whose_worker_died_after_its_pipeline_or_group_went_on_ends_completed_not_failed(
    db_url: str, kind: str, case: str
) -> None:
    # Given a job (on its only attempt, or with attempts left, or cancelled by an operator since),
    # with an on_failure hook, that returned and whose pipeline hook sent the next step (or whose
    # group hook counted it), and whose worker then died before writing its own outcome
    max_attempts = 1 if case == "its last attempt" else 3
    first = actors.noop.message_with_options(args=("a",), max_attempts=max_attempts,
                                             on_failure="tests.callback_sink")  # fmt: skip
    if kind == "pipeline":
        pipeline([first, actors.noop.message()]).run()
    else:
        members = group([first, actors.noop.message("b")])
        members.add_completion_callback(actors.group_done.message("done"))
        members.run()
    consumer, held = claim_in_process()
    if held.message_id != first.message_id:  # the group's other child came first: give it back
        consumer.close()
        query(db_url, "UPDATE control_plane.messages SET eta = now() + interval '1 hour' WHERE id = %s",
              (held.message_id,))  # fmt: skip
        consumer, held = claim_in_process()
    query(db_url, "UPDATE control_plane.jobs SET status = 'running', attempts = 1 WHERE id = %s", (first.message_id,))
    # (the worker's hooks after the job, in Dramatiq's order: its result kept for its outcome, then the canvas)
    middleware(Results).after_process_message(tasks.broker, held, result="a")
    hook = middleware(Pipelines if kind == "pipeline" else GroupCallbacks)
    hook.after_process_message(tasks.broker, held, result="a")
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second', "
                  "cancel_requested_at = CASE WHEN %s THEN now() END WHERE id = %s",
          (case == "cancelled", first.message_id))  # fmt: skip
    # When another worker's reaper finds its lease expired
    reap_from_another_worker()
    consumer.close()
    # Then the job is completed, as its pipeline or group took it to be, and not put back to run
    # again (a run that fails would tell the pipeline's caller it stopped, though it went on): no
    # failure, no on_failure hook (which would undo work the next step builds on), no WorkerLost
    # or Cancelled for its caller, whose result was stored by the hook that sent on (its outcome,
    # which carried it, was never written)
    row = job(db_url, first.message_id)
    assert (row["status"], row["last_error"]) == ("completed", None)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages WHERE id = %s",
                 (first.message_id,)) == [{"n": 0}]  # fmt: skip
    assert "its pipeline or group went on" in row["errors"][-1]["error"]
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'tests.callback_sink'") == [
        {"n": 0}
    ]
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.results") == [{"n": 1}]
    assert first.get_result() == "a"


def test_a_step_cancelled_while_it_waited_fails_the_pipelines_result_and_a_retry_of_it_forgets_that(
    db_url: str, tmp_path: Path
) -> None:
    # Given a pipeline of four, sent, its first step waiting (its last is three steps on)
    chain = pipeline([actors.noop.message("a"), actors.noop.message(), actors.noop.message(), actors.noop.message()])
    chain.run()
    assert pipeline_end(chain.messages[0]).message_id == chain.messages[3].message_id  # (and the Python walk)
    first = chain.messages[0].message_id
    # When an operator cancels that step
    assert query(db_url, "SELECT control_plane.cancel_job(%s) AS r", (first,)) == [{"r": "cancelled"}]
    # Then the pipeline's caller hears it at once, the step named
    with pytest.raises(ResultFailure) as failure:
        chain.get_result(block=True, timeout=120_000)
    assert failure.value.orig_exc_type == "Cancelled"
    assert f"the pipeline stopped at tests.noop (job {first}): cancelled by operator while it waited" in str(
        failure.value
    )
    # And when the step is retried, that failure is forgotten: the caller waits for the new run
    assert query(db_url, "SELECT control_plane.retry_job(%s) AS r", (first,)) == [{"r": True}]
    with pytest.raises(ResultMissing):
        chain.get_result()
    with running_worker(db_url, tmp_path):
        assert chain.get_result(block=True, timeout=120_000) == "a"
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE status = 'completed'") == [{"n": 4}]


@pytest.mark.parametrize("fate", ["lost", "cancelled"])
def test_a_step_the_reaper_ends_fails_the_pipelines_result_naming_the_step(db_url: str, fate: str) -> None:
    # Given a pipeline whose first step, on its only attempt, was running when its worker died
    # (or was cancelled while its worker was gone)
    first = actors.noop.message_with_options(args=("a",), max_attempts=1)
    chain = pipeline([first, actors.noop.message(), actors.noop.message()])
    chain.run()
    consumer, held = claim_in_process()
    assert held.message_id == first.message_id
    query(db_url, "UPDATE control_plane.jobs SET status = 'running', attempts = 1 WHERE id = %s", (first.message_id,))
    # (each result's writing transaction noted, its top-level one)
    query(db_url, """
        CREATE TABLE results_writers (xid xid8);
        CREATE FUNCTION note_results_writer() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN INSERT INTO results_writers VALUES (pg_current_xact_id()); RETURN NULL; END $$;
        CREATE TRIGGER note AFTER INSERT ON control_plane.results
            FOR EACH ROW EXECUTE FUNCTION note_results_writer()""")
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second', "
                  "cancel_requested_at = CASE WHEN %s THEN now() END WHERE id = %s",
          (fate == "cancelled", first.message_id))  # fmt: skip
    # When another worker's reaper finds its lease expired
    reap_from_another_worker()
    consumer.close()
    # Then the step ended, and the caller of the pipeline hears it at once, the step named
    assert job(db_url, first.message_id)["status"] == ("failed" if fate == "lost" else "cancelled")
    with pytest.raises(ResultFailure) as failure:
        chain.get_result(block=True, timeout=120_000)
    assert failure.value.orig_exc_type == ("WorkerLost" if fate == "lost" else "Cancelled")
    assert f"the pipeline stopped at tests.noop (job {first.message_id}): " in str(failure.value)
    assert job(db_url, first.message_id)["last_error"] in str(failure.value)
    # And both results were written by the transaction that ended the job: an operator's retry of
    # it, which forgets them, cannot come between (it would leave the caller a stale failure)
    ended_by = query(db_url, "SELECT xmin::text AS x FROM control_plane.jobs WHERE id = %s", (first.message_id,))
    written_by = query(db_url, "SELECT DISTINCT (xid::text::bigint % 4294967296)::text AS x FROM results_writers")
    assert written_by == ended_by


def test_a_step_the_reaper_ends_while_the_results_table_is_locked_still_ends_and_the_reaper_says_so(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a pipeline's first step, on its only attempt, running when its worker died, and an
    # operator's transaction holding control_plane.results
    first = actors.noop.message_with_options(args=("a",), max_attempts=1)
    pipeline([first, actors.noop.message()]).run()
    consumer, held = claim_in_process()
    assert held.message_id == first.message_id
    query(db_url, "UPDATE control_plane.jobs SET status = 'running', attempts = 1 WHERE id = %s", (first.message_id,))
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
          (first.message_id,))  # fmt: skip
    lock = psycopg2.connect(db_url)
    try:
        with lock.cursor() as cur:
            cur.execute("LOCK TABLE control_plane.results IN SHARE MODE")
        # When another worker's reaper finds its lease expired
        with caplog.at_level("WARNING", logger="tasks.broker"):
            reap_from_another_worker()
        consumer.close()
    finally:
        lock.close()
    # Then the step ended all the same (the results' failed insert did not take the reap's
    # transaction with it), and the reaper says its callers wait out their timeouts
    assert job(db_url, first.message_id)["status"] == "failed"
    assert "could not store the results of the jobs the reaper ended" in caplog.text


def test_a_lost_job_whose_body_was_written_by_hand_keeps_no_caller_of_the_others_waiting(db_url: str) -> None:
    # Given two lost jobs on their last attempt, one's body rewritten by hand into no message
    plain = actors.noop.send_with_options(args=(2,), max_attempts=1)
    odd = actors.noop.send_with_options(args=(1,), max_attempts=1)
    consumer = tasks.broker.consume("default", prefetch=2, timeout=5000)
    assert {next(consumer).message_id for _ in range(2)} == {odd.message_id, plain.message_id}
    query(db_url, "UPDATE control_plane.jobs SET status = 'running', attempts = 1")
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second'")
    query(db_url, "UPDATE control_plane.messages SET body = convert_to('{\"x\": 1}', 'UTF8') WHERE id = %s",
          (odd.message_id,))  # fmt: skip
    # When another worker's reaper finds them
    reap_from_another_worker()
    consumer.close()
    # Then the other job ended, and its caller hears it
    assert job(db_url, plain.message_id)["status"] == "failed"
    with pytest.raises(ResultFailure, match="WorkerLost"):
        plain.get_result()


def test_a_lost_message_whose_body_is_not_utf8_json_does_not_stop_the_reaper(db_url: str) -> None:
    # Given two lost claims with attempts left: one a row written by hand whose body names a
    # pipeline and a group but is not UTF-8 JSON, one an ordinary job's
    plain = actors.noop.send_with_options(args=(2,), max_attempts=3)
    query(db_url, """INSERT INTO control_plane.messages (id, queue, actor, body)
                     VALUES (gen_random_uuid(), 'default', 'tests.noop', %s)""",
          (b'{"options": {"pipe_target": 1, "group_completion_uuid": "g"}, "args": ["caf\xe9"]}',))  # fmt: skip
    query(db_url, "UPDATE control_plane.messages SET claim_token = gen_random_uuid(), worker = 'gone', "
                  "lease_expires_at = now() - interval '1 second'")  # fmt: skip
    # When another worker's reaper finds them
    reap_from_another_worker()
    # Then both are put back (one bad body made every reap fail, on every queue)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages WHERE claim_token IS NULL") == [{"n": 2}]
    assert job(db_url, plain.message_id)["status"] == "pending"


def test_a_pipe_target_id_that_is_not_a_uuid_does_not_stop_the_reaper(db_url: str) -> None:
    # Given two lost jobs on their last attempt, one whose options name a next step by an id of
    # uuid-like characters that is no uuid (written by hand: a send refuses a next step that is no message)
    bad = actors.noop.send_with_options(args=(1,), max_attempts=1)
    plain = actors.noop.send_with_options(args=(2,), max_attempts=1)
    query(db_url, """UPDATE control_plane.jobs SET options = options || '{"pipe_target": {"message_id":
                         "0123456789abcdef0123456789abcdef----"}}' WHERE id = %s""", (bad.message_id,))  # fmt: skip
    consumer = tasks.broker.consume("default", prefetch=2, timeout=5000)
    assert {next(consumer).message_id for _ in range(2)} == {bad.message_id, plain.message_id}
    query(db_url, "UPDATE control_plane.jobs SET status = 'running', attempts = 1")
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second'")
    # When another worker's reaper finds them
    reap_from_another_worker()
    consumer.close()
    # Then both ended, as lost jobs out of attempts do (one bad row made every reap fail)
    assert {job(db_url, m.message_id)["status"] for m in (bad, plain)} == {"failed"}


# -- pinned by a mutation review (thirty-third session) --------------------------------


class FakeClock:
    """``time`` for ``canvas_module._in_one_transaction``: its sleeps only move its monotonic clock."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def _tried(monkeypatch: pytest.MonkeyPatch, fail: Any, limit: int = 400) -> tuple[int, FakeClock, BaseException | None]:
    """How many times ``_in_one_transaction`` ran work that calls ``fail(conn, n)``, its clock, and what it raised."""
    clock, calls = FakeClock(), []
    monkeypatch.setattr(canvas_module, "time", clock)

    def work(conn: Any) -> str:
        calls.append(1)
        if len(calls) > limit:
            raise RuntimeError("tried for ever")
        fail(conn, len(calls))
        return "ok"

    try:
        canvas_module._in_one_transaction(tasks.broker, work, one_statement=True)
        return len(calls), clock, None
    except Exception as exc:
        return len(calls), clock, exc


def _deadlock(conn: Any, n: int) -> None:
    with conn.cursor() as cur:
        cur.execute("DO $$ BEGIN RAISE EXCEPTION 'deadlock' USING ERRCODE = '40P01'; END $$")


def test_a_hooks_deadlock_is_tried_three_times_once_is_tried_again_and_another_error_not(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A deadlock every time: TRIES tries, then raised
    calls, _, exc = _tried(monkeypatch, _deadlock)
    assert isinstance(exc, psycopg2.errors.DeadlockDetected) and calls == canvas_module.TRIES

    # A deadlock once: done at the second try
    calls, _, exc = _tried(monkeypatch, lambda conn, n: _deadlock(conn, n) if n == 1 else None)
    assert exc is None and calls == 2

    # Neither a conflict nor a lost connection (a bug, a value refused): raised at once
    def bad(conn: Any, n: int) -> None:
        with conn.cursor() as cur:
            cur.execute("SELECT 1/0")

    calls, _, exc = _tried(monkeypatch, bad)
    assert isinstance(exc, psycopg2.errors.DivisionByZero) and calls == 1


@pytest.mark.parametrize("sqlstate", ["55P03", "57014"])  # lock_timeout, statement_timeout
def test_a_hook_that_gave_up_waiting_for_a_lock_is_tried_again_as_a_deadlock_is(
    db_url: str, monkeypatch: pytest.MonkeyPatch, sqlstate: str
) -> None:
    # (a role's lock_timeout behind a barrier's row lock held a second failed every member that waited)
    def timed_out(conn: Any, n: int) -> None:
        if n == 1:
            with conn.cursor() as cur:
                cur.execute(f"DO $$ BEGIN RAISE EXCEPTION 'gave up' USING ERRCODE = '{sqlstate}'; END $$")

    calls, _, exc = _tried(monkeypatch, timed_out)
    assert exc is None and calls == 2


def test_a_hook_waits_out_an_outage_at_most_five_seconds_at_a_time_and_gives_up_at_its_deadline(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a database that never comes back
    def gone(conn: Any, n: int) -> None:
        raise psycopg2.OperationalError("server closed the connection unexpectedly")

    _, clock, exc = _tried(monkeypatch, gone)
    # Then the hook tried again, waiting at most 5 s between tries, until OUTAGE_SECONDS had passed
    assert isinstance(exc, psycopg2.OperationalError)
    assert max(clock.sleeps) == 5.0
    assert canvas_module.OUTAGE_SECONDS <= clock.now <= canvas_module.OUTAGE_SECONDS + 5.0


def test_group_children_pass_unprepared_when_prepared_statements_are_off(db_url: str) -> None:
    # Given prepared statements turned off (CONTROLPLANE_PREPARED_STATEMENTS=off), and a group of three
    broker = tasks.broker
    original = broker.settings
    broker.settings = dataclasses.replace(original, prepared_statements=False)
    try:
        with broker.connection() as conn, conn.cursor() as cur:
            cur.execute("DEALLOCATE ALL")
        members = group([actors.noop.message(i) for i in range(3)])
        members.add_completion_callback(actors.group_done.message("x"))
        members.run()
        hook = middleware(GroupCallbacks)
        rows = query(db_url, "SELECT body FROM control_plane.messages WHERE actor = 'tests.noop'")
        assert len(rows) == 3
        for r in rows:
            hook.after_process_message(broker, Message.decode(bytes(r["body"])), result=None)
        assert len(queued(db_url, "tests.group_done")) == 1
        with broker.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT name FROM pg_prepared_statements")
            assert cur.fetchall() == []
    finally:
        broker.settings = original


def test_a_later_run_of_a_step_whose_earlier_run_sent_on_is_put_back_when_its_worker_dies(db_url: str) -> None:
    # Given a step whose run 0 sent its next step, now on run 1 (an operator's retry), whose worker died
    _, consumer, _, first = _first_step_sent_on(db_url)
    query(db_url, "UPDATE control_plane.jobs SET status = 'running', attempts = 2, attempts_before_retry = 1 "
                  "WHERE id = %s", (first.message_id,))
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
          (first.message_id,))
    reap_from_another_worker()
    consumer.close()
    # Then this run did not send on: it is put back to run, not ended completed
    assert job(db_url, first.message_id)["status"] == "pending"


@pytest.mark.parametrize("sent_by", ["an earlier run", "a release before the marker"])
def test_a_step_that_fails_for_good_stops_its_pipeline_unless_this_run_sent_on(db_url: str, sent_by: str) -> None:
    # Given a step whose next step was sent by an earlier run of it (it is on run 1 now: an
    # operator's retry), or by a release before the run marker existed (no pipe_sent_by)
    chain, consumer, held, first = _first_step_sent_on(db_url)
    consumer.close()
    if sent_by == "an earlier run":
        query(db_url, "UPDATE control_plane.jobs SET attempts_before_retry = 1 WHERE id = %s", (first.message_id,))
    else:
        query(db_url, "UPDATE control_plane.jobs SET options = options - 'pipe_sent_by' WHERE id = %s",
              (chain.messages[1].message_id,))  # fmt: skip
    # When the step fails for good
    _fails_for_good(held, "RuntimeError: this run failed")
    # Then its caller hears it after an earlier run's send; a send before the marker is taken for
    # this run's (as _send_once takes it), and the caller is not told the pipeline stopped
    if sent_by == "an earlier run":
        with pytest.raises(ResultFailure, match="the pipeline stopped"):
            chain.get_result(block=True, timeout=5_000)
    else:
        with pytest.raises(ResultMissing):
            chain.get_result()


def test_a_failed_steps_caller_is_told_even_when_its_went_on_look_fails(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a step that fails for good before sending on, and a look at its next step that fails
    chain, head = _first_step_claimed()
    monkeypatch.setattr(canvas_module.queries, "PIPE_SENT", "SELECT 1/0")
    _fails_for_good(head, "RuntimeError: broken")
    # Then its caller is told all the same
    with pytest.raises(ResultFailure, match="the pipeline stopped"):
        chain.get_result(block=True, timeout=5_000)


def test_a_group_child_whose_marker_expired_is_put_back_when_its_worker_dies(db_url: str) -> None:
    # Given a counted group child whose marker has expired, then whose worker died with attempts left
    first = actors.noop.message_with_options(args=("a",), max_attempts=3)
    members = group([first, actors.noop.message("b")])
    members.add_completion_callback(actors.group_done.message("done"))
    members.run()
    consumer, held = claim_in_process()
    if held.message_id != first.message_id:
        consumer.close()
        query(db_url, "UPDATE control_plane.messages SET eta = now() + interval '1 hour' WHERE id = %s",
              (held.message_id,))
        consumer, held = claim_in_process()
    query(db_url, "UPDATE control_plane.jobs SET status = 'running', attempts = 1 WHERE id = %s", (first.message_id,))
    middleware(GroupCallbacks).after_process_message(tasks.broker, held, result="a")
    query(db_url, "UPDATE control_plane.rate_limits SET expires_at = now() - interval '1 second' "
                  "WHERE key LIKE %s", (f"%@done:{first.message_id}",))
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second' WHERE id = %s",
          (first.message_id,))
    reap_from_another_worker()
    consumer.close()
    # Then it is put back to run: nothing shows its group went on
    assert job(db_url, first.message_id)["status"] == "pending"


def test_a_members_pass_a_crash_undid_under_a_claim_that_held_is_not_taken_for_done(db_url: str) -> None:
    # Given a group of two with a callback, whose first member ran and passed the barrier (a
    # statement that does not wait for the WAL flush), and a server crash that undid the pass
    # while the claim before it held (flushed already)
    children = sent_group(db_url, "crash", size=2)
    consumer, held = claim_in_process()
    held.started = True
    middleware(GroupCallbacks).after_process_message(tasks.broker, held, result=None)
    group = children[0].options["group_completion_uuid"]
    query(db_url, "DELETE FROM control_plane.rate_limits WHERE key = %s", (f"{group}@done:{held.message_id}",))
    query(db_url, "UPDATE control_plane.rate_limits SET value = 2 WHERE key = %s", (group,))
    # When its ack is written after the crash, under its claim
    settle_in_process(consumer, held, "ack")
    # Then it is refused: the member is not completed uncounted (its group's callback would
    # never come); it stays claimed until its lease ends
    assert job(db_url, held.message_id)["status"] == "pending"
    # And when the lease ends, it is put back, runs, and passes again; the other member too
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second' "
                  "WHERE claim_token IS NOT NULL")  # fmt: skip
    reap_from_another_worker()
    for _ in children:
        consumer, again = claim_in_process()
        again.started = True
        middleware(GroupCallbacks).after_process_message(tasks.broker, again, result=None)
        settle_in_process(consumer, again, "ack")
    # Then both members completed, and the callback was sent once
    assert {job(db_url, c.message_id)["status"] for c in children} == {"completed"}
    assert len(queued(db_url, "tests.group_done")) == 1


def test_a_groups_callback_that_is_a_duplicate_of_a_live_keyed_job_fails_its_last_member_saying_so(
    db_url: str, tmp_path: Path
) -> None:
    # Given a live job (delayed) holding the unique key that a group's completion callback carries
    holder = actors.group_done.send_with_options(args=("holder",), unique_key="report:42", delay=600_000)
    # And a group of two whose completion callback carries that key
    members = group([actors.noop.message(i) for i in range(2)])
    members.add_completion_callback(actors.group_done.message_with_options(args=("callback",), unique_key="report:42"))
    members.run()
    ids = [m.message_id for m in members.children]  # type: ignore[union-attr]
    # When a worker runs the members
    with running_worker(db_url, tmp_path):
        wait_for(lambda: jobs_in(db_url, ids, "completed", "failed"), what="both members' outcomes")
    # Then the callback was not sent (the holder is no callback of this group), and the member that
    # was to send it says so, as a pipeline's step whose next step met a live key does: it is
    # failed with a FollowUpNotSent naming the holder, not completed with nothing saying why
    rows = query(db_url, "SELECT status, last_error FROM control_plane.jobs WHERE id = ANY(%s::uuid[]) "
                         "ORDER BY status", (ids,))  # fmt: skip
    assert [r["status"] for r in rows] == ["completed", "failed"], rows
    error = rows[1]["last_error"]
    assert error.startswith("FollowUpNotSent: the job ran, but it could not be counted in its group"), error
    assert f"Conflict: job {holder.message_id} holds its unique key 'report:42'" in error, error
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'tests.group_done'") == [{"n": 1}]
    # And once the holder has ended, a retry of the failed member counts it and sends the callback
    assert query(db_url, "SELECT control_plane.cancel_job(%s) AS r", (holder.message_id,)) == [{"r": "cancelled"}]
    failed = next(i for i in ids if job(db_url, i)["status"] == "failed")
    assert query(db_url, "SELECT control_plane.retry_job(%s) AS r", (failed,)) == [{"r": True}]
    with running_worker(db_url, tmp_path):
        wait_for(lambda: query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'tests.group_done'"
                                       " AND status = 'completed'") == [{"n": 1}], what="the group's callback")
    assert job(db_url, failed)["status"] == "completed"


def test_a_group_sent_with_a_delay_past_its_barriers_ttl_sends_its_callback(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the sender's barrier_ttl (24 h by default) shorter than the delay a group is sent
    # with: as group(...).run(delay=<25 h>) with the default, scaled down to 2 s and 4 s
    hook = next(m for m in tasks.broker.middleware if isinstance(m, GroupCallbacks))
    monkeypatch.setattr(hook, "barrier_ttl", 2_000)
    # (a member that is a pipeline: its last step, which carries the group, is sent by a worker)
    members = group([actors.noop.message(0), pipeline([actors.noop.message(1), actors.noop.message()])])
    members.add_completion_callback(actors.group_done.message("after the delay"))
    # When it is sent (a Celery chord sent with a countdown), and a worker runs it once due
    members.run(delay=4_000)
    ids = [members.children[0].message_id, members.children[1].messages[-1].message_id]  # type: ignore[union-attr]
    with running_worker(db_url, tmp_path):
        wait_for(lambda: query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE id = ANY(%s::uuid[]) AND "
                                       "status IN ('completed', 'failed')", (ids,)) == [{"n": 2}],
                 what="both members' outcomes")
    # Then its completion callback was sent with the last member's count: its barrier had
    # expired before any member ran, the members ended completed and only a worker's log said so
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'tests.group_done'") == [{"n": 1}]


def test_a_pipeline_or_group_whose_keyed_message_is_a_duplicate_of_a_live_job_is_refused_at_its_send(
    db_url: str,
) -> None:
    # Given a live job (delayed) holding a unique key
    holder = actors.noop.send_with_options(args=("holder",), unique_key="nightly:7", delay=600_000)
    jobs_before = query(db_url, "SELECT count(*) AS n FROM control_plane.jobs")
    # When a pipeline whose first step carries that key is run
    steps = pipeline([actors.noop.message_with_options(args=(1,), unique_key="nightly:7"), actors.noop.message(2)])
    # Then the caller hears it at the send, the holder named: that job is no step of this pipeline,
    # which would never go on (its caller waited out its get_result timeout, with nothing saying why)
    with pytest.raises(Conflict, match=f"job {holder.message_id} holds the unique key 'nightly:7' of tests.noop .*"
                                       "the first step of a pipeline"):  # fmt: skip
        steps.run()
    # When a group with such a member is run inside the caller's transaction
    members = group([actors.noop.message(3), actors.noop.message_with_options(args=(4,), unique_key="nightly:7")])
    members.add_completion_callback(actors.group_done.message("never"))
    conn = psycopg2.connect(db_url)
    try:
        with pytest.raises(Conflict, match=r"a member of group .*, whose completion callbacks would never be sent"):
            with tasks.enqueue_in(conn):
                members.run()
    finally:
        conn.close()
    # Then nothing of it was sent: neither its other member nor its barrier
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs") == jobs_before
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.rate_limits") == [{"n": 0}]
    # And a keyed send on its own still returns the holder, as before
    assert actors.noop.send_with_options(args=(5,), unique_key="nightly:7").message_id == holder.message_id
