"""``async def`` actors on real workers: Dramatiq's AsyncIO is on by default, and a cancel or a
time limit, a log line, an argument check and a second AsyncIO behave as for a sync actor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dramatiq.results import ResultFailure

import tasks
from tests import actors
from tests.support import ROOT, WorkerProcess, disagreements, effects, job, query, running_worker, wait_for


def test_an_async_actor_runs_with_its_result_its_message_and_its_log_context(db_url: str, tmp_path: Path) -> None:
    # Given an `async def` actor, in a module that does not add Dramatiq's AsyncIO itself
    message = actors.async_double.send(21)
    with running_worker(db_url, tmp_path) as worker:
        # When a worker runs it
        # Then its caller gets its result, computed with its own message at hand
        assert message.get_result(block=True, timeout=60_000) == {"double": 42, "message_id": message.message_id}
        wait_for(lambda: "async_double of 21" in worker.log(), what="the actor's log line")
        # And its log line carries the job, as a sync actor's does (it is written in the loop's thread)
        assert f"[tests.async_double {message.message_id}] async_double of 21" in worker.log()
    row = job(db_url, message.message_id)
    assert (row["status"], row["attempts"]) == ("completed", 1)


def test_an_async_actor_slow_to_stop_when_cancelled_ends_cancelled_with_its_hooks_and_result(
    db_url: str, tmp_path: Path
) -> None:
    # Given a running async job whose clean-up outlasts the second Dramatiq waits for a cancelled
    # coroutine (it then raises RuntimeError from the interrupt)
    message = actors.async_slow_to_stop.send("slow to stop")
    with running_worker(db_url, tmp_path, threads=1):
        wait_for(lambda: job(db_url, message.message_id)["status"] == "running", what="the job to run")
        # When an operator cancels it
        assert query(db_url, "SELECT control_plane.cancel_job(%s) AS o", (message.message_id,))[0]["o"] == "cancelling"
        # Then it ends cancelled, as a sync job does: its caller told why, its on_final_failure sent
        with pytest.raises(ResultFailure) as failure:
            message.get_result(block=True, timeout=60_000)
        assert str(failure.value).endswith("Cancelled: an operator cancelled the job while it ran")
        wait_for(lambda: effects(db_url, "callback"), what="on_final_failure")
    final = job(db_url, message.message_id)
    assert (final["status"], final["attempts"]) == ("cancelled", 1)
    assert [e["error"] for e in final["errors"]] == ["Cancelled: an operator cancelled the job while it ran"]
    assert disagreements(db_url) == []


def test_send_checks_an_async_actors_arguments(db_url: str) -> None:
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "send", "tests.async_double", "--module", "tests.actors",
         "--args", "[1, 2, 3]"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout
    assert "tests.async_double cannot be called with these arguments: too many positional arguments" in done.stderr
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs")[0]["n"] == 0


@pytest.mark.parametrize("module", ["tests.async_again", "tests.async_before"])
def test_a_module_adding_dramatiqs_asyncio_again_still_runs_async_actors_and_stops(
    db_url: str, tmp_path: Path, module: str
) -> None:
    # Given a worker whose module adds Dramatiq's AsyncIO, as Dramatiq's documentation says to,
    # after this package's or before it (with two of Dramatiq's, the worker never exits on SIGTERM)
    message = actors.async_double.send(2)
    worker = WorkerProcess(db_url, module=module, log_path=tmp_path / "worker.log")
    try:
        worker.wait_ready()
        # Then async actors run
        assert message.get_result(block=True, timeout=60_000)["double"] == 4
        # And SIGTERM stops it, cleanly
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(60) == 0, worker.log()
    finally:
        worker.terminate()
    assert "Traceback" not in (tmp_path / "worker.log").read_text()


def test_the_event_loop_this_package_starts_for_a_worker_ends_with_it() -> None:
    from dramatiq.asyncio import get_event_loop_thread

    from tasks.middleware.async_actors import AsyncActors

    # Given the loop thread this package's middleware starts as a worker boots
    found = get_event_loop_thread()
    middleware = AsyncActors()
    middleware.before_worker_boot(tasks.broker, None)
    started = get_event_loop_thread()
    assert started is not None and started is not found and started.is_alive()
    # When the worker shuts down
    middleware.after_worker_shutdown(tasks.broker, None)
    # Then its thread has ended (an in-process worker booted again and again leaks none), and the
    # loop found before it is set back
    assert not started.is_alive()
    assert get_event_loop_thread() is found
