"""Time-ordered message ids (UUIDv7): what a sender and an operator see of them."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
import pytest
from dramatiq.brokers.stub import StubBroker

import tasks
from tasks.cron import CronSchedule
from tasks.middleware import TimeOrderedActor, TimeOrderedIds, time_ordered_id
from tasks.middleware import time_ordered_ids as ids_module
from tasks.periodic import Schedule
from tests import actors
from tests.support import query
from tests.test_cli_operations import in_process


def _millis(message_id: str) -> int:
    """The Unix milliseconds a UUIDv7 starts with."""
    return uuid.UUID(message_id).int >> 80


def test_a_plain_dramatiq_actors_messages_get_time_ordered_ids_that_name_their_jobs(db_url: str) -> None:
    # Given an actor declared with Dramatiq's own decorator and class
    assert type(actors.noop) is TimeOrderedActor
    before = time.time_ns() // 1_000_000
    # When messages are sent one per call and as a batch
    singles = [actors.noop.send(i) for i in range(3)]
    batch = tasks.broker.enqueue_batch([actors.noop.message(i) for i in range(50)])
    after = time.time_ns() // 1_000_000
    sent = [m.message_id for m in singles + batch]
    # Then every id is a UUID of version 7 made during the sends, each greater than the last
    assert {uuid.UUID(i).version for i in sent} == {7}
    assert all(before <= _millis(i) <= after for i in sent)
    assert sent == sorted(sent) and len(set(sent)) == len(sent)
    # And each names its job in control_plane.jobs
    rows = query(db_url, "SELECT id::text AS id FROM control_plane.jobs")
    assert sorted(r["id"] for r in rows) == sorted(sent)
    # And the batch, whose messages share their eta, is claimed in the order it was built
    claim_order = query(
        db_url,
        "SELECT id::text AS id FROM control_plane.messages WHERE id = ANY(%(ids)s::uuid[]) ORDER BY priority, eta, id",
        {"ids": [m.message_id for m in batch]},
    )
    assert [r["id"] for r in claim_order] == [m.message_id for m in batch]


def test_a_time_ordered_message_is_dramatiqs_own_but_for_its_id() -> None:
    # Given the same arguments and options, callbacks among them
    def build(build_with: Any) -> dramatiq.Message[Any]:
        message: dramatiq.Message[Any] = build_with(
            actors.noop, args=(1, "a"), kwargs={"k": [2]}, priority=3, on_failure=actors.noop, on_success="x.y"
        )
        return message

    ours = build(TimeOrderedActor.message_with_options)
    theirs = build(dramatiq.Actor.message_with_options)
    # Then the messages differ only in their ids (and the time they were made)
    assert ours.asdict() | {"message_id": "", "message_timestamp": 0} == theirs.asdict() | {
        "message_id": "",
        "message_timestamp": 0,
    }
    assert ours.options["on_failure"] == "tests.noop"
    # And a callback that is not an actor is refused as Dramatiq refuses it
    for build_with in (TimeOrderedActor.message_with_options, dramatiq.Actor.message_with_options):
        with pytest.raises(TypeError, match="on_success value must be an Actor"):
            build_with(actors.noop, args=(), on_success=42)


def test_ids_keep_increasing_when_the_clock_steps_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a clock that goes back a second between calls
    clock = iter(range(10**18, 10**18 - 100 * 10**9, -(10**9)))
    monkeypatch.setattr(ids_module, "time_ns", lambda: next(clock))
    # When ids are made
    made = [time_ordered_id() for _ in range(100)]
    # Then each is still greater than the one before, and a valid UUIDv7
    assert made == sorted(made) and len(set(made)) == 100
    assert {uuid.UUID(i).version for i in made} == {7}
    assert {uuid.UUID(i).variant for i in made} == {uuid.RFC_4122}


def test_an_id_lays_out_its_millisecond_and_random_bits_as_rfc_9562_says(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a known millisecond and known random bytes
    monkeypatch.setattr(ids_module, "time_ns", lambda: 0x0123456789AB * 1_000_000 + 999_999)
    monkeypatch.setattr(ids_module, "urandom", lambda n: bytes.fromhex("fedcba98765432101234")[:n])
    monkeypatch.setattr(ids_module, "_last", 0)
    # When an id is made
    made = time_ordered_id()
    # Then it is the millisecond (48 bits), version 7, 12 random bits, variant 0b10, 62 random bits:
    # the first 74 bits of the random bytes, in order
    random74 = int("fedcba98765432101234", 16) >> 6
    rand_a, rand_b = random74 >> 62, random74 & (1 << 62) - 1
    expected = uuid.UUID(int=0x0123456789AB << 80 | 7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b)
    assert made == str(expected)
    assert made.startswith("01234567-89ab-7")


def _fork_a_child_that_makes_an_id() -> Callable[[], tuple[str, int]]:
    """Fork a child that makes one id and exits (killed by an alarm if it cannot make one in
    10 s); returns what waits for it and gives its id and its exit code."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            signal.alarm(10)
            os.write(write, time_ordered_id().encode())
        finally:
            os._exit(0)
    os.close(write)

    def wait() -> tuple[str, int]:
        _, status = os.waitpid(pid, 0)
        with os.fdopen(read) as pipe:
            return pipe.read(), os.waitstatus_to_exitcode(status)

    return wait


def test_a_forked_child_does_not_make_its_parents_next_id(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a clock stopped at one millisecond, and a process that made the greatest id of it
    # (so that the next id of this millisecond can only follow on from it)
    monkeypatch.setattr(ids_module, "time_ns", lambda: 1_700_000_000_000_000_000)
    monkeypatch.setattr(ids_module, "_last", 1_700_000_000_000 << 74 | (1 << 74) - 1)
    # When parent and child each make their next id in that same millisecond
    child = _fork_a_child_that_makes_an_id()
    parents = time_ordered_id()
    childs, _ = child()
    # Then they differ: the child did not go on from its parent's last id
    assert uuid.UUID(childs).version == 7
    assert childs != parents


def test_a_child_forked_while_another_thread_made_an_id_can_make_its_own() -> None:
    # Given a thread of this process in the middle of making an id (holding its lock)
    with ids_module._lock:
        # When the process forks then
        child = _fork_a_child_that_makes_an_id()
    made, exit_code = child()
    # Then the child made its id (the lock it inherited held by a thread it does not have is not its lock)
    assert exit_code == 0
    assert uuid.UUID(made).version == 7


def test_actors_of_another_class_keep_dramatiqs_ids() -> None:
    # Given an actor of a class of the user's own
    class AuditedActor(dramatiq.Actor[Any, Any]):
        pass

    broker = StubBroker(middleware=[TimeOrderedIds()])

    @dramatiq.actor(actor_name="tests.audited", actor_class=AuditedActor, broker=broker)
    def audited() -> None:
        pass

    # When it builds a message
    message = audited.message()
    # Then its class and Dramatiq's uuid4 ids are left alone
    assert type(audited) is AuditedActor
    assert uuid.UUID(message.message_id).version == 4


def test_a_send_by_actor_name_from_the_cli_gets_a_time_ordered_id(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # When an actor no module here declares is sent by name
    result = in_process(capsys, monkeypatch, db_url, "send", "elsewhere.only_in_workers", "--queue", "far")
    # Then its job's id is a UUIDv7
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert uuid.UUID(job_id).version == 7
    assert query(db_url, "SELECT type FROM control_plane.jobs WHERE id = %(id)s", {"id": job_id}) == [
        {"type": "elsewhere.only_in_workers"}
    ]


def test_a_tick_of_an_actor_addressed_by_name_gets_a_time_ordered_id() -> None:
    # Given a schedule of an actor that only the workers' code declares
    entry = Schedule(name="far.nightly", cron=CronSchedule.parse("0 3 * * *"), actor_name="elsewhere.nightly",
                     queue_name="far")  # fmt: skip
    # When the clock builds a tick's message
    message = entry.message(tasks.broker)
    # Then its id is a UUIDv7
    assert message.actor_name == "elsewhere.nightly"
    assert uuid.UUID(message.message_id).version == 7
