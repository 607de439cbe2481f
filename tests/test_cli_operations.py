"""The operator subcommands of ``controlplane`` on the test database.

Each subcommand runs at least once as a real subprocess; the variants of a
user mistake run in-process through :func:`tasks.cli.main`, which is the same
code without the interpreter start-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg2
import pytest

import tasks
from tasks.cli import main
from tests import actors
from tests.support import ROOT, claim_in_process, job, query, wait_for

UNREACHABLE = "postgresql://root@127.0.0.1:1/nowhere"


#: The console script, as a user runs it (installed with the package, beside this interpreter).
CONTROLPLANE = str(Path(sys.executable).with_name("controlplane"))


def _popen(url: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``controlplane ARGS`` against ``url`` and wait for it."""
    return run_all(url, [args])[0]


def run_all(url: str, commands: Sequence[Sequence[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Run several independent commands at once (they start in parallel) and collect them in order."""
    procs = [(args, _popen(url, args)) for args in commands]
    done = []
    for args, proc in procs:
        out, err = proc.communicate(timeout=60)
        done.append(subprocess.CompletedProcess(list(args), proc.returncode, out, err))
    return done


def in_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, url: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``controlplane ARGS`` in this process (``tasks.cli.main``), its output captured."""
    monkeypatch.setenv("DATABASE_URL", url)
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def assert_user_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    """Exit status 1 and one line on stderr, ``controlplane: error: ...``, naming the problem; no traceback."""
    assert result.returncode == 1, (result.args, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, (result.args, result.stderr)
    assert lines[0].startswith("controlplane: error: "), lines[0]
    assert fragment in lines[0], (fragment, lines[0])


def fail_everything_queued() -> None:
    """Claim every queued message in this process and record each as failed for good."""
    consumer = tasks.broker.consume("default", prefetch=50, timeout=2000)
    while True:
        with consumer.state.lock:
            waiting = bool(consumer.state.buffer)
        if not waiting and consumer._claim(50) == 0:
            break
        held = next(consumer)
        assert held is not None
        held.error_text = "RuntimeError: failed on purpose"
        held.fail()
        consumer.nack(held)
    consumer._flush()
    consumer.close()


@pytest.mark.parametrize("command", [("jobs", "retry"), ("jobs", "cancel"), ("stats",), ("prune",), ("workers",)])
def test_every_operator_subcommand_has_help(capsys: pytest.CaptureFixture[str], command: tuple[str, ...]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: controlplane {' '.join(command)}")


def test_jobs_retry_puts_a_failed_job_back_and_explains_when_it_cannot(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a failed job and a pending one
    failed = actors.always_fails.send("x")
    fail_everything_queued()
    pending = actors.noop.send(1)
    # When an operator retries the failed one
    result = cli(db_url, "jobs", "retry", failed.message_id)
    # Then it is pending again
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"retried {failed.message_id}: pending again"
    assert job(db_url, failed.message_id)["status"] == "pending"
    # And mistakes are one clear line each
    missing = str(uuid.uuid4())

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return in_process(capsys, monkeypatch, db_url, "jobs", "retry", *args)

    assert_user_error(run(pending.message_id), f"job {pending.message_id} is pending: only failed or cancelled jobs")
    assert_user_error(run(missing), f"no job with id {missing}")
    assert_user_error(run("42"), "'42' is not a job id")
    assert_user_error(run(pending.message_id, "--failed"), "give a job id, or --failed")
    assert_user_error(run("--type", "tests.noop"), "--type goes with --failed")


def test_jobs_retry_failed_retries_every_failed_job_of_a_type(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two failed jobs of one actor, one of another, and a pending one
    two = [actors.always_fails.send("a").message_id, actors.always_fails.send("b").message_id]
    other = actors.noop.send("c").message_id
    fail_everything_queued()
    pending = actors.noop.send("d").message_id
    # When the failed jobs of one actor are retried
    result = cli(db_url, "jobs", "retry", "--failed", "--type", "tests.always_fails")
    # Then those two are pending again, and the other failed job is still failed
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "retried 2 failed job(s) of type tests.always_fails"
    assert {job(db_url, i)["status"] for i in two} == {"pending"}
    assert job(db_url, other)["status"] == "failed"
    assert job(db_url, pending)["status"] == "pending"
    # When every failed job is retried, Then the last one is too
    result = in_process(capsys, monkeypatch, db_url, "jobs", "retry", "--failed")
    assert result.stdout.strip() == "retried 1 failed job(s)"
    assert job(db_url, other)["status"] == "pending"


def test_jobs_retry_failed_narrows_to_a_queue_and_a_number_and_counts_without_retrying_on_a_dry_run(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given three failed jobs in queue default, failed one after the other, and one in queue slow
    in_default = []
    for n in range(3):
        in_default.append(actors.always_fails.send(str(n)).message_id)
        fail_everything_queued()
    elsewhere = actors.slow_noop.send(0).message_id
    query(db_url, "UPDATE control_plane.jobs SET status = 'failed', completed_at = now() WHERE id = %s", (elsewhere,))
    # When an operator asks what retrying queue default would do
    dry = in_process(capsys, monkeypatch, db_url, "jobs", "retry", "--failed", "--queue", "default", "--dry-run")
    # Then it counts them and retries none
    assert dry.stdout.strip() == "would retry 3 failed job(s) in queue default"
    assert {job(db_url, i)["status"] for i in [*in_default, elsewhere]} == {"failed"}
    # When the two oldest failures of that queue are retried
    two = in_process(capsys, monkeypatch, db_url, "jobs", "retry", "--failed", "--queue", "default", "--limit", "2")
    # Then those two are pending, the newest failure and the other queue's job still failed
    assert two.stdout.strip() == "retried 2 failed job(s) in queue default"
    assert [job(db_url, i)["status"] for i in in_default] == ["pending", "pending", "failed"]
    assert job(db_url, elsewhere)["status"] == "failed"
    # When the other queue's job had failed two days ago, and every failure of the last day is retried
    query(db_url, "UPDATE control_plane.jobs SET completed_at = now() - interval '2 days' WHERE id = %s", (elsewhere,))
    day = in_process(capsys, monkeypatch, db_url, "jobs", "retry", "--failed", "--since", "1 day")
    # Then only the recent failure is retried, the old one left for another day
    assert day.stdout.strip() == "retried 1 failed job(s) failed in the last 1 day"
    assert job(db_url, in_default[2])["status"] == "pending"
    assert job(db_url, elsewhere)["status"] == "failed"
    # And a period the server cannot read is named, nothing retried
    assert_user_error(in_process(capsys, monkeypatch, db_url, "jobs", "retry", "--failed", "--since", "1 dya"),
                      "--since must be a PostgreSQL interval such as '1 hour' or '2 days', got '1 dya'")  # fmt: skip
    # and so is one it reads as negative, which would match nothing ('1 day ago' is minus a day)
    assert_user_error(in_process(capsys, monkeypatch, db_url, "jobs", "retry", "--failed", "--since", "1 day ago"),
                      "got '1 day ago', which PostgreSQL reads as a negative interval")  # fmt: skip
    assert job(db_url, elsewhere)["status"] == "failed"
    # And the narrowing options need --failed: with one job's id, none of them retries it
    for option in (("--queue", "default"), ("--dry-run",), ("--limit", "1"), ("--since", "1 day")):
        assert_user_error(in_process(capsys, monkeypatch, db_url, "jobs", "retry", elsewhere, *option),
                          f"{option[0]} goes with --failed")  # fmt: skip
    assert job(db_url, elsewhere)["status"] == "failed"


def test_an_interrupted_retry_of_every_failed_job_says_how_far_it_got_and_a_second_run_goes_on(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import cli as cli_module

    # Given three failed jobs, and an operator who presses Ctrl-C as the third is retried
    ids = [actors.always_fails.send(str(n)).message_id for n in range(3)]
    fail_everything_queued()
    calls = {"n": 0}
    scalar = cli_module._scalar

    def interrupted_at_the_third(conn: Any, sql: str, params: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return scalar(conn, sql, params)

    monkeypatch.setattr(cli_module, "_scalar", interrupted_at_the_third)
    # When every failed job is retried
    result = in_process(capsys, monkeypatch, db_url, "jobs", "retry", "--failed")
    # Then it stops with Ctrl-C's status and says how far it got, the two it retried pending
    assert result.returncode == 130
    assert result.stderr.strip() == (
        "interrupted: retried 2 of 3 failed job(s); run it again to retry the rest")  # fmt: skip
    assert sorted(job(db_url, i)["status"] for i in ids) == ["failed", "pending", "pending"]
    # And a second run retries the rest
    monkeypatch.setattr(cli_module, "_scalar", scalar)
    again = in_process(capsys, monkeypatch, db_url, "jobs", "retry", "--failed")
    assert again.stdout.strip() == "retried 1 failed job(s)"
    assert {job(db_url, i)["status"] for i in ids} == {"pending"}


def test_jobs_cancel_cancels_pending_jobs_and_asks_for_running_ones(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a running job (claimed in this process) and a pending one
    running = actors.noop.send("running")
    consumer, held = claim_in_process()
    assert held.message_id == running.message_id
    pending = actors.noop.send("pending")
    # When an operator cancels both
    cancel_pending, cancel_running = run_all(
        db_url, [("jobs", "cancel", pending.message_id), ("jobs", "cancel", running.message_id)]
    )
    # Then the pending one is cancelled at once and the running one is marked for its worker
    assert cancel_pending.returncode == 0, cancel_pending.stderr
    assert cancel_pending.stdout.strip() == f"cancelled {pending.message_id}"
    assert job(db_url, pending.message_id)["status"] == "cancelled"
    assert cancel_running.returncode == 0, cancel_running.stderr
    assert cancel_running.stdout.startswith(f"cancelling {running.message_id}: a worker holds it")
    assert query(db_url, "SELECT cancel_requested_at IS NOT NULL AS asked FROM control_plane.messages")[0]["asked"]
    consumer.close()
    # And a job that cannot be cancelled, or does not exist, is one clear line
    missing = str(uuid.uuid4())
    again = in_process(capsys, monkeypatch, db_url, "jobs", "cancel", pending.message_id)
    assert_user_error(again, f"job {pending.message_id} is cancelled: only pending or running jobs can be cancelled")
    assert_user_error(in_process(capsys, monkeypatch, db_url, "jobs", "cancel", missing), f"no job with id {missing}")
    assert_user_error(in_process(capsys, monkeypatch, db_url, "jobs", "cancel", "x"), "'x' is not a job id")


def test_jobs_cancel_queue_cancels_every_live_job_of_the_queue_and_of_one_type_only_if_asked(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given, in queue default, a running job (claimed in this process), two pending ones of one
    # actor and one of another, a failed one; and a pending job in another queue
    running = actors.noop.send("running")
    consumer, held = claim_in_process()
    assert held.message_id == running.message_id
    noops = [actors.noop.send(n).message_id for n in range(2)]
    other_type = actors.always_fails.send("x").message_id
    elsewhere = actors.slow_noop.send(0).message_id
    # When an operator cancels the queue's jobs of one actor
    of_type = in_process(capsys, monkeypatch, db_url, "jobs", "cancel", "--queue", "default", "--type", "tests.noop")
    # Then the pending ones of that actor are cancelled and the running one is asked to stop
    assert of_type.returncode == 0, of_type.stderr
    assert of_type.stdout.strip() == ("cancelled 2 pending job(s) of type tests.noop in queue default; 1 running "
                                      "job(s) asked to stop (their workers interrupt them, unless they finish first)")
    assert [job(db_url, i)["status"] for i in noops] == ["cancelled", "cancelled"]
    assert query(db_url, "SELECT cancel_requested_at IS NOT NULL AS asked FROM control_plane.messages WHERE id = %s",
                 (running.message_id,))[0]["asked"]  # fmt: skip
    assert job(db_url, other_type)["status"] == "pending"
    consumer.close()
    # When the whole queue is cancelled, Then the other actor's job goes too, and the other queue's stays
    whole = in_process(capsys, monkeypatch, db_url, "jobs", "cancel", "--queue", "default")
    assert whole.stdout.startswith("cancelled 1 pending job(s) in queue default"), whole.stdout
    assert job(db_url, other_type)["status"] == "cancelled"
    assert job(db_url, elsewhere)["status"] == "pending"
    # And the options are checked as the single cancel's are
    assert_user_error(in_process(capsys, monkeypatch, db_url, "jobs", "cancel", noops[0], "--queue", "default"),
                      "give a job id, or --queue")  # fmt: skip
    assert_user_error(in_process(capsys, monkeypatch, db_url, "jobs", "cancel", "--type", "tests.noop"),
                      "--type goes with --queue")  # fmt: skip


def test_an_interrupted_cancel_of_a_queue_says_how_far_it_got_not_counting_a_job_that_ended_meanwhile(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import cli as cli_module

    # Given four pending jobs of a queue, the second of which completes once listed (before its
    # cancel), and an operator who presses Ctrl-C as the fourth is cancelled
    ids = [actors.noop.send(n).message_id for n in range(4)]
    calls = {"n": 0}
    scalar = cli_module._scalar

    def ended_then_interrupted(conn: Any, sql: str, params: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            query(db_url, "DELETE FROM control_plane.messages WHERE id = %(id)s; UPDATE control_plane.jobs SET "
                          "status = 'completed', completed_at = now() WHERE id = %(id)s", {"id": ids[1]})  # fmt: skip
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return scalar(conn, sql, params)

    monkeypatch.setattr(cli_module, "_scalar", ended_then_interrupted)
    # When the queue's jobs are cancelled
    result = in_process(capsys, monkeypatch, db_url, "jobs", "cancel", "--queue", "default")
    # Then it stops with Ctrl-C's status and says how far it got, the ended job counted nowhere
    assert result.returncode == 130
    assert result.stderr.strip() == (
        "interrupted: cancelled 2 and asked 0 running job(s) to stop, of 4; run it again to cancel the rest")
    assert [job(db_url, i)["status"] for i in ids] == ["cancelled", "completed", "cancelled", "pending"]


def test_a_retry_of_more_than_a_hundred_failed_jobs_shows_its_progress_to_the_end(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 101 failed jobs
    for n in range(101):
        actors.always_fails.send(str(n))
    fail_everything_queued()
    # When every failed job is retried
    result = in_process(capsys, monkeypatch, db_url, "jobs", "retry", "--failed")
    # Then the progress goes on stderr every 100, and the last line says all were done
    assert result.stdout.strip() == "retried 101 failed job(s)"
    assert result.stderr.splitlines() == ["  100/101 failed jobs done", "  101/101 failed jobs done"]


def test_send_with_a_held_unique_key_prints_the_existing_job(db_url: str) -> None:
    send = ("send", "tests.noop", "--module", "tests.actors", "--unique-key", "tenant:1")
    # Given a job sent with a unique key
    job_id = actors.noop.send_with_options(args=(1,), unique_key="tenant:1").message_id
    # When the same key is sent again, plainly and with --json
    plain, as_json = run_all(db_url, [(*send, "--args", "[2]"), (*send, "--args", "[3]", "--json")])
    # Then both print the existing job, and no second job exists
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == job_id
    assert f"job {job_id} holds unique key 'tenant:1'" in plain.stderr
    assert json.loads(as_json.stdout) == {"id": job_id, "deduplicated": True}
    assert [str(r["id"]) for r in query(db_url, "SELECT id FROM control_plane.jobs")] == [job_id]


def test_send_knows_the_built_in_actors_and_says_when_it_does_not_know_one(db_url: str) -> None:
    # Given provision_project sent by name, as `controlplane send --help` shows, and an actor no
    # module loaded here declares
    payload = json.dumps([{"project_id": "cli_sent", "tenant_id": "t", "region": "eu"}])
    built_in, unknown, by_name = run_all(db_url, [("send", "provision_project", "--args", payload),
                                                  ("send", "billing.sync"),
                                                  ("send", "billing.sync", "--queue", "billing")])  # fmt: skip
    # Then provision_project goes where its workers look, with its unique key
    assert built_in.returncode == 0, built_in.stderr
    row = query(db_url, "SELECT queue, unique_key FROM control_plane.jobs WHERE id = %s", (built_in.stdout.strip(),))
    assert row[0]["queue"] == "provisioning" and row[0]["unique_key"].startswith("provision_project:cli_sent:")
    # And the unknown one is refused (a misspelt name would wait forever in a queue nobody
    # reads), saying how to send it, and nothing is sent
    assert unknown.returncode == 1 and not unknown.stdout
    assert "'billing.sync' is not declared" in unknown.stderr
    assert "--module" in unknown.stderr and "--queue" in unknown.stderr
    # While, given its queue, it is sent by name
    assert by_name.returncode == 0, by_name.stderr
    rows = query(db_url, "SELECT id::text, queue FROM control_plane.jobs WHERE type = 'billing.sync'")
    assert rows == [{"id": by_name.stdout.strip(), "queue": "billing"}]


def test_send_refuses_arguments_the_actor_cannot_take_and_a_queue_its_workers_do_not_read(db_url: str) -> None:
    # Given an actor its workers declared on queue 'billing' (as a worker's start records it)
    query(db_url, "INSERT INTO control_plane.actor_defaults (actor, queue, priority, max_attempts) "
                  "VALUES ('billing.sync', 'billing', 0, 20)")  # fmt: skip
    # When it is sent by name to another queue, and tests.noop (one optional argument) is sent three
    wrong_queue, right_queue, undeclared, too_many, loaded_elsewhere = run_all(db_url, [
        ("send", "billing.sync", "--queue", "biling"),
        ("send", "billing.sync", "--queue", "billing"),
        ("send", "billing.nobody", "--queue", "billing"),
        ("send", "tests.noop", "--module", "tests.actors", "--args", "[1, 2, 3]"),
        ("send", "tests.noop", "--module", "tests.actors", "--queue", "other"),
    ])  # fmt: skip
    # Then the wrong queue is refused, naming the declared one, and so are the arguments, and a
    # --queue other than the queue of an actor loaded here (it was ignored)
    assert_user_error(wrong_queue, "actor 'billing.sync' is declared by its workers on queue 'billing'")
    assert_user_error(too_many, "tests.noop cannot be called with these arguments: too many positional arguments")
    assert_user_error(loaded_elsewhere, "tests.noop is declared on queue 'default', not 'other'")
    # while the declared queue is taken, and an actor no worker declared is sent with a warning
    assert right_queue.returncode == 0 and not right_queue.stderr, right_queue.stderr
    assert undeclared.returncode == 0, undeclared.stderr
    assert "warning: no worker has declared actor 'billing.nobody' yet" in undeclared.stderr
    sent = {r["id"] for r in query(db_url, "SELECT id::text FROM control_plane.jobs")}
    assert sent == {right_queue.stdout.strip(), undeclared.stdout.strip()}


def test_send_leaves_unchecked_the_arguments_of_an_actor_behind_another_decorator_or_without_a_signature(
    db_url: str, tmp_path: Path
) -> None:
    # Given an app's actors: one behind a decorator that passes its function an argument of its
    # own (functools.wraps: its signature names the inner function's), and a builtin
    (tmp_path / "wrapped_jobs.py").write_text(
        "import functools\nimport dramatiq\nimport tasks\n\n"
        "def with_conn(fn):\n"
        "    @functools.wraps(fn)\n"
        "    def wrapper(*args, **kwargs):\n"
        "        return fn('CONN', *args, **kwargs)\n"
        "    return wrapper\n\n"
        "@dramatiq.actor(actor_name='app.injected', queue_name='app')\n@with_conn\n"
        "def injected(conn, invoice_id):\n    return f'{conn}:{invoice_id}'\n\n"
        "biggest = dramatiq.actor(max, actor_name='app.biggest', queue_name='app')\n"
    )
    env = {**os.environ, "DATABASE_URL": db_url}
    # When each is sent with the arguments its caller takes
    done = [subprocess.run([CONTROLPLANE, "send", name, "--args", payload, "--module", "wrapped_jobs"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=60)
            for name, payload in (("app.injected", "[7]"), ("app.biggest", "[1, 2]"))]  # fmt: skip
    # Then both are sent
    assert [d.returncode for d in done] == [0, 0], [d.stderr for d in done]
    assert len(query(db_url, "SELECT id FROM control_plane.jobs WHERE queue = 'app'")) == 2


def test_a_home_whose_data_this_user_may_not_read_counts_as_holding_a_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.db import has_embedded

    # Given another user's embedded server (its data directory 0700: reading in it is refused)
    (tmp_path / "pgdata").mkdir()
    real_exists = Path.exists

    def refused(path: Path, **kwargs: Any) -> bool:
        if path.name == "PG_VERSION":
            raise PermissionError(13, "Permission denied", str(path))
        return real_exists(path, **kwargs)

    monkeypatch.setattr(Path, "exists", refused)
    # Then the commands go on to start it, which says whose it is, instead of a traceback
    assert has_embedded(tmp_path) is True


def test_send_refuses_a_priority_the_database_cannot_hold_before_connecting(db_url: str) -> None:
    done = cli(db_url, "send", "controlplane.prune", "--priority", "99999999999")
    assert done.returncode == 2 and not done.stdout
    assert "argument --priority: '99999999999' is out of range (-2147483648 to 2147483647)" in done.stderr


def test_modules_are_found_in_the_current_directory_as_the_dramatiq_command_finds_them(
    db_url: str, tmp_path: Path
) -> None:
    # Given an app module in the directory the command runs in, not installed, not on PYTHONPATH
    (tmp_path / "myapp_jobs.py").write_text(
        "import dramatiq\nfrom tasks.periodic import periodic\n\n"
        "@periodic('*/5 * * * *')\n@dramatiq.actor(actor_name='myapp.sync', queue_name='myapp')\n"
        "def sync() -> None: ...\n"
    )
    # and, beside it, a file named like a module the control plane imports (Python's `secrets`)
    (tmp_path / "secrets.py").write_text("raise SystemExit('shadowed: this is not the secrets module')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DATABASE_URL"] = db_url
    commands = [["clock", "--list", "--module", "myapp_jobs"], ["send", "myapp.sync", "--module", "myapp_jobs"]]
    done = [subprocess.run([CONTROLPLANE, *c], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
            for c in commands]  # fmt: skip
    # Then both load it, as `dramatiq myapp_jobs` would
    assert [d.returncode for d in done] == [0, 0], [d.stderr for d in done]
    assert "myapp.sync" in done[0].stdout
    row = query(db_url, "SELECT queue FROM control_plane.jobs WHERE id = %s", (done[1].stdout.strip(),))
    assert row[0]["queue"] == "myapp"


def test_stats_says_so_when_it_leaves_out_the_completions_a_large_history_would_cost(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from models import queries

    # Given a job completed a moment ago and one waiting in the same queue, and a history over the
    # bound stats read without the BRIN index (a bound of 0 rows stands for a large history)
    query(db_url, "INSERT INTO control_plane.jobs (id, type, queue, status, completed_at) "
                  "VALUES (gen_random_uuid(), 'tests.noop', 'default', 'completed', now())")  # fmt: skip
    actors.noop.send(1)
    query(db_url, "ANALYZE control_plane.jobs")
    monkeypatch.setattr(queries, "QUEUE_STATS_VIA_MESSAGES", queries.queue_stats_via_messages(0))
    brin = query(db_url, "SELECT 1 FROM pg_indexes WHERE indexname = 'ix_jobs_completed_at_brin'")
    # When an operator asks for the stats, as a table and as JSON
    table = in_process(capsys, monkeypatch, db_url, "stats")
    as_json = in_process(capsys, monkeypatch, db_url, "stats", "--json")
    # Then the count is there where the BRIN index (PostgreSQL 16+) finds it; else a dash and why
    # (JSON: null), not a false 0
    (row,) = json.loads(as_json.stdout)
    assert row["completed_last_minute"] == (1 if brin else None)
    (line,) = [x for x in table.stdout.splitlines() if x.startswith("default")]
    assert line.split()[5] == ("1" if brin else "-")
    assert ("completed_last_minute not counted" in table.stdout) is not bool(brin)
    # And when the only queue's jobs have all just completed, so that no row is left to show
    # the dash on, it still does not say "no jobs": it says what it did not count
    query(db_url, "DELETE FROM control_plane.messages; UPDATE control_plane.jobs SET status = 'completed', "
                  "completed_at = now()")  # fmt: skip
    monkeypatch.setattr(queries, "STATS_COMPLETIONS_COUNTED", queries.STATS_COMPLETIONS_COUNTED.replace(
        str(queries.STATS_COMPLETED_SCAN_MAX_ROWS), "0"))  # fmt: skip
    empty = in_process(capsys, monkeypatch, db_url, "stats")
    if brin:
        assert empty.stdout.startswith("queue ") and "not counted" not in empty.stdout
    else:
        assert empty.stdout.startswith("no queue with live, failed or paused jobs")
        assert "completed_last_minute not counted" in empty.stdout


def test_stats_shows_each_queue_once_as_json_and_until_ctrl_c_when_watching(db_url: str) -> None:
    # Given two ready jobs, one failed job and one delayed job in the default queue
    actors.always_fails.send("x")
    fail_everything_queued()
    actors.noop.send(1)
    actors.noop.send(2)
    actors.noop.send_with_options(args=(3,), delay=3_600_000)
    # and a queue whose only job completed an hour ago
    query(
        db_url,
        "INSERT INTO control_plane.jobs (id, type, queue, status, completed_at) "
        "VALUES (gen_random_uuid(), 'old', 'archive', 'completed', now() - interval '1 hour')",
    )
    # When an operator asks for the stats, as a table and as JSON
    table, as_json = run_all(db_url, [("stats",), ("stats", "--json")])
    # Then both show the queue's counts, read from the message table (the Postgres broker's):
    # nothing for the queue with only old history (the view would list it with zeros)
    assert table.returncode == 0, table.stderr
    header, _, row = table.stdout.splitlines()
    assert header.split() == [
        "queue", "ready", "scheduled", "running", "failed", "completed_last_minute", "oldest_ready_age", "paused"
    ]
    assert row.split()[:6] == ["default", "2", "1", "0", "1", "0"]
    assert row.split()[-1] == "False"
    (stats,) = json.loads(as_json.stdout)
    assert (stats["queue"], stats["ready"], stats["scheduled"], stats["failed"]) == ("default", 2, 1, 1)
    # When it watches, Then it refreshes until Ctrl-C and then exits cleanly
    # (SIGINT as a terminal delivers it: not ignored, even when pytest itself was started
    # with SIGINT ignored, as a background job of a script is, which its children inherit)
    watcher = _popen(db_url, ["stats", "--watch", "--interval", "0.2"], preexec_fn=_sigint_default)
    try:
        assert watcher.stdout is not None
        stdout = watcher.stdout
        lines: list[str] = []

        def refreshed_twice() -> bool:
            lines.append(stdout.readline())
            return sum(line.startswith("default") for line in lines) >= 2

        wait_for(refreshed_twice, what="two refreshes")
        watcher.send_signal(signal.SIGINT)
        _, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    assert "Traceback" not in err
    # When it watches into a pipe whose reader stops after the first line (`| head -1`)
    piped = _popen(db_url, ["stats", "--watch", "--json", "--interval", "0.2"])
    try:
        assert piped.stdout is not None and piped.stderr is not None
        assert json.loads(piped.stdout.readline())[0]["queue"] == "default"
        piped.stdout.close()
        err = piped.stderr.read()
        piped.wait(timeout=30)
    finally:
        if piped.poll() is None:
            piped.kill()
    # Then it stops at its next refresh, quietly, as a filter does (it printed a BrokenPipeError traceback)
    assert (piped.returncode, err) == (141, "")


def test_prune_deletes_old_finished_jobs_and_refuses_a_bad_age(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job completed ten days ago, one completed an hour ago, and one failed ten days ago
    for status, age in (("completed", "10 days"), ("completed", "1 hour"), ("failed", "10 days")):
        query(
            db_url,
            "INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at) "
            "VALUES (gen_random_uuid(), 'old', 'default', %s, now() - %s::interval - interval '1 minute', "
            "now() - %s::interval)",
            (status, age, age),
        )
    # and, as the daily controlplane.prune also forgets, two ticks of a schedule ten days apart and
    # an expired rate-limit counter
    query(db_url, "INSERT INTO control_plane.schedule_ticks (schedule_name, tick_at, job_id) VALUES "
                  "('s', now() - interval '20 days', gen_random_uuid()), ('s', now() - interval '10 days', "
                  "gen_random_uuid())")  # fmt: skip
    query(db_url, "INSERT INTO control_plane.rate_limits (key, value, expires_at) VALUES ('k', 1, now() - "
                  "interval '1 minute')")  # fmt: skip
    # When an operator prunes with the defaults (7 days, failed 30 days), Then only the first goes,
    # with the older tick (each schedule's latest stays) and the counter: a cron line without a
    # clock prunes what the daily task does
    result = cli(db_url, "prune")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pruned 1 job(s), completed or cancelled longer ago than 7 days or failed "
                                    "longer ago than 30 days, and 0 expired result(s)")
    assert "and 1 schedule tick(s)" in result.stdout and "1 expired rate-limit counter(s)" in result.stdout
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.schedule_ticks")[0]["n"] == 1
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.rate_limits")[0]["n"] == 0
    # When pruning with shorter ages, Then the others go too
    shorter = ("prune", "--completed-after", "1 minute", "--failed-after", "1 day")
    result = in_process(capsys, monkeypatch, db_url, *shorter)
    assert result.stdout.startswith("pruned 2 job(s)")
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs")[0]["n"] == 0
    # And an age that is not an interval is one clear line
    assert_user_error(
        in_process(capsys, monkeypatch, db_url, "prune", "--failed-after", "a while"),
        "--failed-after must be a PostgreSQL interval",
    )
    # and so is one PostgreSQL would read as seconds
    assert_user_error(
        in_process(capsys, monkeypatch, db_url, "prune", "--completed-after", "7"),
        "'7' has no unit",
    )
    # and one of no length at all, which would prune what finished a moment ago
    assert_user_error(
        in_process(capsys, monkeypatch, db_url, "prune", "--completed-after", "0 days"),
        "'0 days' is zero",
    )
    # And a bad setting the defaults come from is named as that setting, not as an option never given
    monkeypatch.setenv("CONTROLPLANE_RETENTION_COMPLETED", "garbage 5")
    assert_user_error(
        in_process(capsys, monkeypatch, db_url, "prune"),
        "CONTROLPLANE_RETENTION_COMPLETED must be a PostgreSQL interval",
    )


def test_workers_lists_live_workers_and_what_they_hold(db_url: str) -> None:
    # Given a worker's heartbeat, and a message it holds
    actors.noop.send(1)
    consumer, _ = claim_in_process()
    consumer._housekeeping()  # its heartbeat
    try:
        # When an operator lists the workers
        table, as_json = run_all(db_url, [("workers",), ("workers", "--json")])
    finally:
        consumer.close()
    # Then the worker is there with its queue and its one message in flight
    assert as_json.returncode == 0, as_json.stderr
    (worker,) = json.loads(as_json.stdout)
    assert worker["id"] == tasks.broker.worker_id
    assert "default" in worker["queues"]
    assert worker["in_flight"] == 1
    assert worker["state"] == "alive"
    assert table.returncode == 0, table.stderr
    assert tasks.broker.worker_id in table.stdout.splitlines()[2]
    # And a worker silent for a lease (killed: nothing removed its row) is listed as dead
    query(db_url, "INSERT INTO control_plane.worker_heartbeats (id, hostname, pid, queues, started_at, heartbeat_at) "
                  "VALUES ('gone:1', 'gone', 1, '{default}', now() - interval '1 hour', "
                  "now() - interval '1 minute')")  # fmt: skip
    later = cli(db_url, "workers")
    assert next(line for line in later.stdout.splitlines() if line.startswith("gone:1")).split()[1:5] == [
        "dead", "(silent", "past", "its"
    ]


def test_a_statement_the_database_cancels_is_reported_as_refused_not_as_a_lost_connection(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a waiting job whose message another session holds locked, and a lock_timeout
    message = actors.noop.send(1)
    holder = psycopg2.connect(db_url)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT 1 FROM control_plane.messages WHERE id = %s FOR UPDATE", (message.message_id,))
        monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=100")
        # When an operator cancels it
        result = in_process(capsys, monkeypatch, db_url, "jobs", "cancel", message.message_id)
    finally:
        holder.close()
    # Then the error says what the database said (psycopg2 files it as an OperationalError, as it
    # does a lost connection), and the job was left as it was
    assert_user_error(result, "the database refused: canceling statement due to lock timeout")
    assert job(db_url, message.message_id)["status"] == "pending"


def test_user_mistakes_are_one_line_errors_never_tracebacks(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = str(uuid.uuid4())
    # An unreachable database, from a real process (connecting) and in-process (every subcommand)
    for result in run_all(UNREACHABLE, [("stats",), ("send", "tests.noop", "--module", "tests.actors")]):
        assert_user_error(result, "cannot connect to the database")
    for args in (("workers",), ("prune",), ("jobs", "cancel", job_id), ("jobs", "retry", job_id), ("stats",)):
        assert_user_error(in_process(capsys, monkeypatch, UNREACHABLE, *args), "cannot connect to the database")
    # Bad JSON
    bad_json = in_process(capsys, monkeypatch, db_url, "send", "tests.noop", "--args", "[1,")
    assert_user_error(bad_json, "--args is not valid JSON")


def test_jobs_retry_and_cancel_refuse_when_rabbitmq_carries_the_messages(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the RabbitMQ broker (the messages are not in control_plane.messages) and a failed job
    query(db_url, "INSERT INTO control_plane.jobs (id, type, queue, status, completed_at) "
                  "VALUES (gen_random_uuid(), 'tests.noop', 'default', 'failed', now())")
    (failed,) = [r["id"] for r in query(db_url, "SELECT id::text FROM control_plane.jobs")]
    monkeypatch.setenv("BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    # When an operator retries or cancels a job, or lists the workers, Then it is told why that
    # cannot work here (RabbitMQ's workers write no heartbeats: the list would be stale rows)
    for args in (("jobs", "retry", failed), ("jobs", "retry", "--failed"), ("jobs", "cancel", failed), ("workers",)):
        assert_user_error(in_process(capsys, monkeypatch, db_url, *args), "needs the PostgreSQL broker")
    # each with what to do instead: a retry is a new send; a cancel has no way there
    assert_user_error(in_process(capsys, monkeypatch, db_url, "jobs", "retry", failed), "send it again")
    assert_user_error(in_process(capsys, monkeypatch, db_url, "jobs", "cancel", failed),
                      "a job in RabbitMQ cannot be cancelled: it runs as sent")  # fmt: skip
    # and the job was not made pending (no worker would ever run it)
    assert job(db_url, failed)["status"] == "failed"
    # And a queue cannot be paused there (its workers would not read it), but a pause left from
    # the Postgres broker's days can still be listed and resumed
    assert_user_error(in_process(capsys, monkeypatch, db_url, "queues", "pause", "default"),
                      "needs the PostgreSQL broker")  # fmt: skip
    query(db_url, "INSERT INTO control_plane.queue_pauses (queue) VALUES ('default')")
    assert in_process(capsys, monkeypatch, db_url, "queues", "list").stdout.splitlines()[2].startswith("default ")
    resumed = in_process(capsys, monkeypatch, db_url, "queues", "resume", "default")
    assert (resumed.returncode, resumed.stdout) == (0, "resumed default: its workers take its jobs again\n")


def test_jobs_list_since_finds_failed_jobs_by_when_they_failed(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job sent two days ago that failed for good a minute ago, and one that failed long ago
    for kind, failed_ago in (("late", "1 minute"), ("old", "1 day")):
        query(db_url, "INSERT INTO control_plane.jobs (id, type, queue, status, created_at, completed_at) "
                      "VALUES (gen_random_uuid(), %s, 'default', 'failed', now() - interval '2 days', "
                      "now() - %s::interval)", (kind, failed_ago))
    # When the operator lists what failed in the last hour
    listing = ("jobs", "list", "--status", "failed", "--since", "1 hour", "--json")
    result = in_process(capsys, monkeypatch, db_url, *listing)
    # Then the late failure is there, though it was sent long before
    assert [row["type"] for row in json.loads(result.stdout)] == ["late"]


def test_jobs_list_orders_jobs_sent_at_the_same_instant_by_id_and_refuses_empty_filters(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given six jobs of one instant (a batch's jobs share their created_at), written out of id order
    ids = [str(uuid.UUID(int=n)) for n in (4, 1, 6, 3, 5, 2)]
    for job_id in ids:
        query(db_url, "INSERT INTO control_plane.jobs (id, type, queue, created_at) "
                      "VALUES (%s, 'tests.noop', 'default', '2026-12-07 10:00+00')", (job_id,))  # fmt: skip
    # When the operator lists them, all and the first page of three
    def listed(limit: str) -> list[str]:
        result = in_process(capsys, monkeypatch, db_url, "jobs", "list", "--limit", limit, "--json")
        return [row["id"] for row in json.loads(result.stdout)]

    # Then they come newest id first, and a page is the start of the full list
    assert listed("6") == sorted(ids, reverse=True)
    assert listed("3") == sorted(ids, reverse=True)[:3]
    # And an empty actor or a queue name no worker could read is refused by its option's name
    for option, value in (("--queue", ""), ("--queue", "billing "), ("--type", " ")):
        refused = cli(db_url, "jobs", "list", option, value)
        assert refused.returncode == 2 and f"argument {option}" in refused.stderr, refused.stderr


def test_jobs_list_running_lists_the_jobs_a_worker_holds_and_started(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job a worker holds and started, and one waiting
    actors.noop.send("started")
    actors.noop.send("waiting")
    consumer, held = claim_in_process()
    try:
        query(db_url, "UPDATE control_plane.jobs SET status = 'running', attempts = 1 WHERE id = %s",
              (held.message_id,))  # fmt: skip
        # When the operator lists what runs
        listed = in_process(capsys, monkeypatch, db_url, "jobs", "list", "--status", "running", "--json")
        # Then it is that one
        assert [row["id"] for row in json.loads(listed.stdout)] == [held.message_id]
    finally:
        consumer.close()


def test_cli_errors_are_one_line_and_never_print_a_password(empty_db: str, server_url: str, db_url: str) -> None:
    # A URL libpq cannot read (a '%' in the password that is not percent-encoding)
    broken = cli("postgresql://root:Top%zzSecret@127.0.0.1:5432/postgres", "stats")
    assert_user_error(broken, "DATABASE_URL is not a valid PostgreSQL URL")
    assert "zzSecret" not in broken.stderr + broken.stdout
    # and one whose password has a '/' or an '@' that is not percent-encoded (libpq would read a
    # part of it as the port or the host, and quote it in its connection error)
    for password in ("Top/zzSecret", "Top@zzSecret"):
        misread = cli(f"postgresql://root:{password}@127.0.0.1:5432/postgres", "stats")
        assert_user_error(misread, "DATABASE_URL is not a valid PostgreSQL URL")
        assert "zzSecret" not in misread.stderr + misread.stdout and "Top" not in misread.stderr + misread.stdout
    # A URL that is not PostgreSQL's at all (refused while the command loads its settings), even for --help
    for args in (("stats",), ("--help",)):
        other = cli("mysql://root:S3cret@127.0.0.1/db", *args)
        assert_user_error(other, "DATABASE_URL must be a postgresql:// URL")
    # A database nobody migrated: what to do about it
    for args in (("stats",), ("jobs", "list")):
        unmigrated = cli(empty_db, *args)
        assert_user_error(unmigrated, "the database has no control-plane tables yet")
        assert "run `controlplane migrate`" in unmigrated.stderr
    # and a send there (a SchemaMissing from the broker: it was a 36-line traceback)
    unsent = cli(empty_db, "send", "tests.noop", "--queue", "default")
    assert_user_error(unsent, "cannot send: the database's control-plane tables are missing or older than this release")
    assert "run `controlplane migrate`" in unsent.stderr
    # A password in the URL's query string, on success
    with_query_password = db_url + ("&" if "?" in db_url else "?") + "password=S3cret"
    migrated = cli(with_query_password, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "migrated DATABASE_URL" in migrated.stdout and "S3cret" not in migrated.stdout + migrated.stderr
    # A role that may not create anything: the database's refusal in one line, not a traceback
    role = f"cp_nocreate_{uuid.uuid4().hex[:8]}"
    query(server_url, f"CREATE ROLE {role} LOGIN")
    try:
        from sqlalchemy.engine import make_url

        as_role = make_url(empty_db).set(username=role, password=None).render_as_string(hide_password=False)
        refused = cli(as_role, "migrate")
        assert_user_error(refused, "cannot migrate: the database refused: permission denied")
    finally:
        query(server_url, f"DROP ROLE {role}")


def test_bad_numbers_on_the_command_line_are_usage_errors_not_tracebacks(db_url: str) -> None:
    for args, option in [
        (("send", "tests.noop", "--delay", "nan"), "--delay"),
        (("send", "tests.noop", "--delay", "inf"), "--delay"),
        (("stats", "--watch", "--interval", "-1"), "--interval"),
        (("stats", "--watch", "--interval", "0"), "--interval"),
        (("send", "tests.noop", "--delay", "1e20"), "--delay"),
        (("metrics", "--port", "99999"), "--port"),
    ]:
        result = cli(db_url, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert f"argument {option}" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_odd_send_and_list_arguments_are_one_line_errors_and_send_nothing(db_url: str) -> None:
    deep = "[" * 3000 + "]" * 3000
    cases = [
        # an empty key was dropped: the job went out with no key, so nothing was deduplicated
        (("send", "tests.noop", "--module", "tests.actors", "--unique-key", ""), "must be a non-empty string"),
        # stored under a queue no worker reads (or under 'x' for 'x.DQ'), exit 0
        (("send", "elsewhere.job", "--queue", ""), "the queue name '' is not one"),
        (("send", "elsewhere.job", "--queue", "bad queue!"), "the queue name 'bad queue!' is not one"),
        (("send", "elsewhere.job", "--queue", "x.DQ"), "ends in .DQ"),
        # tracebacks
        (("send", "tests.noop", "--module", ""), "cannot import module ''"),
        (("send", "tests.noop", "--module", "."), "cannot import module '.'"),
        (("send", "tests.noop", "--module", "tests.actors", "--args", deep), "--args nests arrays or objects too deep"),
        # ignored: every job listed
        (("jobs", "list", "--since", ""), "--since must be a period"),
        # the server's words, without the option's name
        (("jobs", "list", "--since", "yesterday"), "--since must be a PostgreSQL interval such as '1 hour'"),
    ]
    for (_, fragment), result in zip(cases, run_all(db_url, [args for args, _ in cases]), strict=True):
        assert_user_error(result, fragment)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs") == [{"n": 0}]
    # And a limit that is not a count of rows is refused by its option's name
    for limit in ("-1", "0", "many", "\u00b2", str(2**63)):
        refused = cli(db_url, "jobs", "list", "--limit", limit)
        assert refused.returncode == 2 and f"argument --limit: {limit!r} is not a whole number" in refused.stderr, (
            refused.stderr
        )


def test_jobs_show_and_list_never_write_control_characters_to_the_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    # Given a job whose error quotes input holding terminal escapes (clear the screen, go red)
    message = actors.noop.send(1)
    error = "RuntimeError: bad name \x1b[2J\x1b[31mRED"
    query(db_url, "UPDATE control_plane.jobs SET status = 'failed', last_error = %s, completed_at = now(), "
                  "errors = jsonb_build_array(jsonb_build_object('attempt', 1, 'at', now(), 'error', %s)) "
                  "WHERE id = %s", (error, error, message.message_id))  # fmt: skip
    # When it is shown and listed
    shown = in_process(capsys, monkeypatch, db_url, "jobs", "show", message.message_id)
    listed = in_process(capsys, monkeypatch, db_url, "jobs", "list", "--status", "failed")
    # Then the escapes are written as text, in the error and in the attempts log
    for out in (shown.stdout, listed.stdout):
        assert "\x1b" not in out
        assert "bad name \\x1b[2J\\x1b[31mRED" in out
    assert shown.stdout.count("\\x1b[2J") == 2
    # And an error quoting a job's unique key (a retry refused: another job holds the key) too
    key = "k\x1b[2J"
    first = actors.noop.send_with_options(args=(2,), unique_key=key)
    query(db_url, "UPDATE control_plane.jobs SET status = 'failed', completed_at = now() WHERE id = %s",
          (first.message_id,))  # fmt: skip
    query(db_url, "DELETE FROM control_plane.messages WHERE id = %s", (first.message_id,))
    actors.noop.send_with_options(args=(3,), unique_key=key)
    refused = in_process(capsys, monkeypatch, db_url, "jobs", "retry", first.message_id)
    assert refused.returncode == 1 and "\x1b" not in refused.stderr
    assert "same unique key k\\x1b[2J" in refused.stderr


def test_jobs_show_and_list_print_dates_in_utc_whatever_the_local_time_zone(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    import time

    # Given a job that failed years ago, and a session in Tokyo
    message = actors.noop.send(1)
    query(db_url, "UPDATE control_plane.jobs SET status = 'failed', scheduled_at = '2020-01-02 03:04:05.678+00', "
                  "completed_at = '2020-01-02 03:04:05.678+00' WHERE id = %s", (message.message_id,))  # fmt: skip
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        # When it is shown and listed
        shown = in_process(capsys, monkeypatch, db_url, "jobs", "show", message.message_id)
        listed = in_process(capsys, monkeypatch, db_url, "jobs", "list", "--status", "failed")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    # Then each time carries its date, in UTC, saying so
    assert "completed_at: 2020-01-02 03:04:05.678 UTC" in shown.stdout
    assert "2020-01-02 03:04:05.678 UTC" in listed.stdout


def test_commands_about_jobs_do_not_make_a_new_embedded_server_in_a_folder_without_one(tmp_path: Path) -> None:
    # Given a folder with no embedded server, and DATABASE_URL unset (a user in the wrong folder)
    home = tmp_path / ".controlplane"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env |= {"CONTROLPLANE_HOME": str(home), "PYTHONPATH": str(ROOT)}
    commands = [
        ("jobs", "list"),
        ("jobs", "show", str(uuid.uuid4())),
        ("jobs", "retry", "--failed"),
        ("jobs", "cancel", str(uuid.uuid4())),
        ("stats",),
        ("workers",),
        ("prune",),
        ("send", "controlplane.prune"),
        ("clock", "--once"),
    ]
    procs = [
        (args, subprocess.Popen([sys.executable, "-m", "tasks.cli", *args], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for args in commands
    ]
    for args, proc in procs:
        out, err = proc.communicate(timeout=120)
        # When a command about jobs runs there / Then it says where it looked and what to do,
        # in one line
        assert_user_error(subprocess.CompletedProcess(list(args), proc.returncode, out, err),
                          f"no embedded PostgreSQL in {home} (CONTROLPLANE_HOME")
    # And stopping the server there says there is none
    stop = subprocess.run([sys.executable, "-m", "tasks.cli", "db", "stop"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (stop.returncode, stop.stdout.strip()) == (0, f"there is no embedded server in {home} (nothing to stop)")
    # And no server was made or started
    assert not (home / "pgdata").exists()


def test_jobs_retry_failed_leaves_cancelled_and_completed_jobs_alone(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given one failed job, one an operator cancelled while it waited, and one completed
    failed = actors.always_fails.send("f").message_id
    fail_everything_queued()
    cancelled = actors.noop.send("c").message_id
    assert query(db_url, "SELECT control_plane.cancel_job(%s::uuid) AS o", (cancelled,))[0]["o"] == "cancelled"
    done = actors.noop.send("d").message_id
    query(db_url, "DELETE FROM control_plane.messages WHERE id = %s::uuid", (done,))
    query(db_url, "UPDATE control_plane.jobs SET status = 'completed', completed_at = now() WHERE id = %s::uuid",
          (done,))
    # When every failed job is retried
    result = in_process(capsys, monkeypatch, db_url, "jobs", "retry", "--failed")
    # Then only the failed one is pending again: the cancellation stands, the completed job is untouched
    assert result.stdout.strip() == "retried 1 failed job(s)"
    assert job(db_url, failed)["status"] == "pending"
    assert job(db_url, cancelled)["status"] == "cancelled"
    assert job(db_url, done)["status"] == "completed"


def test_jobs_list_filters_by_a_queue_or_an_actor_named_retrying(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job in a queue named 'retrying', one of an actor named 'retrying', and another
    for queue, actor in (("retrying", "tests.a"), ("default", "retrying"), ("default", "tests.b")):
        query(db_url, "INSERT INTO control_plane.jobs (id, type, queue) VALUES (gen_random_uuid(), %s, %s)",
              (actor, queue))  # fmt: skip
    # When the operator lists the jobs of that queue, and of that actor
    by_queue = in_process(capsys, monkeypatch, db_url, "jobs", "list", "--queue", "retrying", "--json")
    by_type = in_process(capsys, monkeypatch, db_url, "jobs", "list", "--type", "retrying", "--json")
    # Then each lists its one job, not every job of every queue
    assert [(r["queue"], r["type"]) for r in json.loads(by_queue.stdout)] == [("retrying", "tests.a")]
    assert [(r["queue"], r["type"]) for r in json.loads(by_type.stdout)] == [("default", "retrying")]


def test_clock_once_exits_non_zero_when_a_due_tick_was_not_enqueued(db_url: str, tmp_path: Path) -> None:
    # Given workers that declare billing.sync on queue 'invoices', and a clock module that
    # schedules it by name every minute on queue 'billing' (a tick the clock refuses to send)
    query(db_url, "INSERT INTO control_plane.actor_defaults (actor, queue, priority, max_attempts) "
                  "VALUES ('billing.sync', 'invoices', 0, 20)")  # fmt: skip
    (tmp_path / "clock_by_name.py").write_text(
        "from tasks.periodic import schedule\n"
        "schedule('* * * * *', 'billing.sync', queue_name='billing', name='billing.by_name')\n"
    )
    env = {**os.environ, "DATABASE_URL": db_url, "PYTHONPATH": str(ROOT), "CONTROLPLANE_PRUNE_SCHEDULE": "off"}
    # When a cron line runs `controlplane clock --once`
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "clock", "--once", "--module", "clock_by_name"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    # Then nothing was sent, and the exit status says so (cron mails it; a wrapper retries it)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs") == [{"n": 0}]
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "controlplane: error: 1 due tick(s) not enqueued" in done.stderr, done.stderr
    assert "billing.by_name" in done.stderr


def test_db_start_with_a_database_url_says_running_only_when_it_answers(db_url: str) -> None:
    # Given DATABASE_URL naming a server that does not answer
    down = cli(UNREACHABLE, "db", "start")
    # Then `db start` (`controlplane db start && controlplane migrate`) does not say it runs
    assert_user_error(down, "cannot connect to the database")
    assert "running" not in down.stdout
    # While one that answers is said to run
    up = cli(db_url, "db", "start")
    assert up.returncode == 0 and up.stdout.startswith("running: DATABASE_URL"), (up.stdout, up.stderr)


def test_arguments_that_are_not_utf8_are_one_line_errors_not_tracebacks(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An operator's terminal in Latin-1: 'café' arrives as bytes Python keeps as a surrogate
    latin1 = "caf\udce9"
    for args in (("jobs", "list", "--type", latin1), ("jobs", "list", "--since", latin1),
                 ("jobs", "retry", "--failed", "--type", latin1), ("queues", "pause", "default", "--reason", latin1),
                 ("jobs", "cancel", "--queue", "default", "--type", latin1)):  # fmt: skip
        assert_user_error(in_process(capsys, monkeypatch, db_url, *args), "not valid UTF-8")
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.queue_pauses") == [{"n": 0}]


def test_a_bulk_retry_or_cancel_the_database_cut_short_says_how_far_it_got(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks import cli as cli_module

    # Given three failed jobs, three pending ones, and a server that goes away at the third statement
    failed = [actors.always_fails.send(str(n)).message_id for n in range(3)]
    fail_everything_queued()
    pending = [actors.noop.send(n).message_id for n in range(3)]
    calls = {"n": 0}
    scalar = cli_module._scalar

    def lost_at_the_third(conn: Any, sql: str, params: Any = None) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise psycopg2.OperationalError("server closed the connection unexpectedly")
        return scalar(conn, sql, params)

    monkeypatch.setattr(cli_module, "_scalar", lost_at_the_third)
    # When every failed job is retried, and the queue's jobs cancelled
    retried = in_process(capsys, monkeypatch, db_url, "jobs", "retry", "--failed")
    calls["n"] = 0
    cancelled = in_process(capsys, monkeypatch, db_url, "jobs", "cancel", "--queue", "default", "--type", "tests.noop")
    # Then each fails, saying how far it got (as after Ctrl-C) beside the database's error
    assert retried.returncode == 1
    assert "retried 2 of 3 failed job(s)" in retried.stderr, retried.stderr
    assert "cannot connect to the database: server closed the connection unexpectedly" in retried.stderr
    assert cancelled.returncode == 1
    assert "cancelled 2 and asked 0 running job(s) to stop, of 3" in cancelled.stderr, cancelled.stderr
    assert sorted(job(db_url, i)["status"] for i in pending) == ["cancelled", "cancelled", "pending"]
    assert sorted(job(db_url, i)["status"] for i in failed) == ["failed", "pending", "pending"]
