"""The failures SQL stores for a job's callers (a cancel's, the reaper's, a stopped pipeline's) live
as the job's own result would: its message's ``result_ttl``, else its actor's, else
``CONTROLPLANE_RESULT_TTL_MS`` (migration 0021), not a day whatever those say."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import dramatiq
import pytest
from dramatiq import pipeline
from dramatiq.results import ResultFailure, Results

import tasks
from tasks.broker import PostgresBroker
from tests import actors
from tests.support import claim_in_process, job, query, running_worker, wait_for

A_MINUTE_MS = 60_000
A_WEEK_MS = 7 * 86_400_000


@dramatiq.actor(actor_name="tests.results_for_a_minute", store_results=True, result_ttl=A_MINUTE_MS)
def results_for_a_minute(value: object = None) -> object:
    return value


def _results() -> Results:
    return next(m for m in tasks.broker.middleware if isinstance(m, Results))


def _declare_actors() -> None:
    """What a worker does when it starts consuming: record its actors (control_plane.actor_defaults)."""
    tasks.broker.consume("default", prefetch=1, timeout=100).close()


def _lives_for(url: str, message: Any) -> float:
    """Seconds from now until the result stored for ``message`` expires."""
    key = _results().backend.build_message_key(message)
    rows = query(url, "SELECT extract(epoch FROM expires_at - now()) AS s FROM control_plane.results WHERE key = %s",
                 (key,))  # fmt: skip
    assert rows, f"no result stored for {message}"
    return float(rows[0]["s"])


def _reap(url: str, settings: Any = None) -> None:
    """Expire every lease and reap, as another worker process would (its own broker)."""
    query(url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second'")
    other = PostgresBroker(url=url, settings=settings or tasks.settings)
    try:
        reaper = other.consume("default", prefetch=1, timeout=100)
        reaper._next_reap = 0.0
        reaper._housekeeping()
        reaper.close()
    finally:
        other.close()


def test_a_cancel_of_a_waiting_job_keeps_its_failure_as_long_as_its_actor_or_the_setting_says(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given workers keeping results a week (CONTROLPLANE_RESULT_TTL_MS), one actor a minute,
    # started (their actors declared), and a waiting job of each
    monkeypatch.setattr(_results(), "result_ttl", A_WEEK_MS)
    _declare_actors()
    default = actors.noop.send_with_options(args=(1,), delay=3_600_000)
    short = results_for_a_minute.send_with_options(args=(2,), delay=3_600_000)
    # When an operator cancels both from SQL
    for message in (default, short):
        assert query(db_url, "SELECT control_plane.cancel_job(%s) AS c", (message.message_id,))[0]["c"] == "cancelled"
    # Then their callers hear it, for as long as the jobs' own results would have lived
    for message in (default, short):
        with pytest.raises(ResultFailure, match="Cancelled"):
            message.get_result()
    assert A_WEEK_MS / 1000 - 60 < _lives_for(db_url, default) <= A_WEEK_MS / 1000
    assert _lives_for(db_url, short) <= A_MINUTE_MS / 1000


def test_a_cancel_of_a_waiting_pipeline_step_tells_the_pipelines_caller_for_its_last_actors_ttl(db_url: str) -> None:
    # Given a waiting pipeline whose last step's actor keeps its results a minute (declared)
    _declare_actors()
    pipe = pipeline([actors.noop.message(1), results_for_a_minute.message()])
    pipe.run(delay=3_600_000)
    first, last = pipe.messages[0], pipe.messages[-1]
    # When an operator cancels its first step
    assert query(db_url, "SELECT control_plane.cancel_job(%s) AS c", (first.message_id,))[0]["c"] == "cancelled"
    # Then the pipeline's caller hears it, for a minute (the last step's result's lifetime), not a day
    with pytest.raises(ResultFailure, match=r"the pipeline stopped at tests\.noop"):
        pipe.get_result()
    assert _lives_for(db_url, last) <= A_MINUTE_MS / 1000


def test_the_reapers_failure_lives_as_long_as_its_actor_or_the_setting_says(db_url: str) -> None:
    # Given a running job of an actor keeping its results a minute (its worker started: declared),
    # cancelled, whose worker then died
    short = results_for_a_minute.send(1)
    consumer, _held = claim_in_process()
    assert query(db_url, "SELECT control_plane.cancel_job(%s) AS c", (short.message_id,))[0]["c"] == "cancelling"
    # When another worker, keeping results a week, reaps it
    _reap(db_url, dataclasses.replace(tasks.settings, result_ttl_ms=A_WEEK_MS))
    # Then its caller hears it, for a minute
    with pytest.raises(ResultFailure, match="Cancelled"):
        short.get_result()
    assert _lives_for(db_url, short) <= A_MINUTE_MS / 1000
    consumer.close()
    # And a job whose actor says nothing keeps it as long as the reaper's setting says
    default = actors.noop.send(2)
    consumer, _held = claim_in_process()
    assert query(db_url, "SELECT control_plane.cancel_job(%s) AS c", (default.message_id,))[0]["c"] == "cancelling"
    query(db_url, "UPDATE control_plane.actor_defaults SET result_ttl_ms = NULL")  # (declared by an older release)
    _reap(db_url, dataclasses.replace(tasks.settings, result_ttl_ms=A_WEEK_MS))
    with pytest.raises(ResultFailure, match="Cancelled"):
        default.get_result()
    assert A_WEEK_MS / 1000 - 60 < _lives_for(db_url, default) <= A_WEEK_MS / 1000
    consumer.close()


def test_a_stopped_pipelines_failure_lives_as_long_as_its_last_actors_results(db_url: str) -> None:
    from tasks.middleware.canvas import _tell_the_pipelines_caller

    # Given a pipeline whose last step's actor keeps its results a minute
    last = results_for_a_minute.message()
    # When a step fails for good and its caller is told
    _tell_the_pipelines_caller(tasks.broker, last, "RuntimeError", "the pipeline stopped at x (job y): boom")
    # Then the failure lives a minute, as the last step's result would, not CONTROLPLANE_RESULT_TTL_MS
    assert _lives_for(db_url, last) <= A_MINUTE_MS / 1000


def test_a_worker_on_a_schema_before_0021_declares_its_actors_and_reaps_all_the_same(db_url: str) -> None:
    # Given a database without 0021's column (an older release's, this release's worker started before the migration)
    query(db_url, "ALTER TABLE control_plane.actor_defaults DROP COLUMN IF EXISTS result_ttl_ms")
    # When a worker starts, and reaps a job whose worker died on its last attempt
    _declare_actors()
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.actor_defaults WHERE actor = 'tests.noop'")[0]["n"]
    message = actors.noop.send_with_options(args=(1,), max_retries=0)
    consumer, _held = claim_in_process()
    query(db_url, "UPDATE control_plane.jobs SET attempts = max_attempts, status = 'running'")
    _reap(db_url)
    consumer.close()
    # Then its caller hears it, for the setting's lifetime
    with pytest.raises(ResultFailure, match="WorkerLost"):
        message.get_result()
    assert _lives_for(db_url, message) <= tasks.settings.result_ttl_ms / 1000


def test_a_send_whose_result_ttl_is_no_number_of_milliseconds_is_refused() -> None:
    from tasks.errors import InvalidOption

    # (as a backoff is: a worker's every settle carrying its result failed, its queue's outcomes held up)
    with pytest.raises(InvalidOption, match="result_ttl option must be a number of milliseconds"):
        actors.noop.send_with_options(args=(1,), result_ttl="1h")
    with pytest.raises(InvalidOption, match="result_ttl option must be a number of milliseconds"):
        pipeline([actors.noop.message(1), actors.noop.message_with_options(result_ttl="1h")]).run()


def test_a_message_whose_result_ttl_is_no_number_does_not_hold_up_its_queues_outcomes(
    db_url: str, tmp_path: Path
) -> None:
    # Given a job whose message says result_ttl "1h" (sent before the option was checked, or
    # written by hand), and a job sent after it
    bad = actors.noop.send("bad ttl")
    query(db_url, """UPDATE control_plane.messages
                     SET body = convert_to(jsonb_set(convert_from(body, 'UTF8')::jsonb, '{options,result_ttl}',
                                                     '"1h"')::text, 'UTF8')
                     WHERE id = %s""", (bad.message_id,))  # fmt: skip
    good = actors.noop.send("good")
    # When a worker runs them
    with running_worker(db_url, tmp_path):
        # Then both end completed (the settle carrying the bad one's result failed at every try,
        # and every outcome of the queue waited behind it), their results stored
        wait_for(lambda: {job(db_url, m.message_id)["status"] for m in (bad, good)} == {"completed"}, 30,
                 "both jobs to be recorded completed")  # fmt: skip
    assert bad.get_result() == "bad ttl"
    assert good.get_result() == "good"
    assert _lives_for(db_url, bad) <= tasks.settings.result_ttl_ms / 1000
