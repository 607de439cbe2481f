"""The benchmark harness runs end to end (``python -m bench run --quick``), with tiny sizes.

This proves the harness works, not how fast anything is: no timing thresholds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg2
import pytest
from sqlalchemy.engine import make_url

from bench import runs, server
from bench.harness import Run, parse_config
from bench.systems import DEFAULT_SYSTEMS, SYSTEMS
from tasks import db
from tests.support import ROOT, query, wait_for

#: The phases the test runs: drain_1x8 and growth are left out to keep it short; they are
#: the same backlog drain as drain_2x8 (``Run._drain``) with other sizes and process counts.
PHASES = "enqueue,drain_2x8,latency,memory,provision"

#: Every metric those phases must report for floor and ours.
METRICS = {
    "enqueue_single_per_s",
    "enqueue_batch_per_s",
    "drain_2x8_per_s",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "memory_small_mb",
    "memory_big_mb",
    "memory_ratio",
    "memory_ratio_tree",
    "provision_per_project_s",
    "provision_concurrent_per_project_s",
    "provision_p50_s",
}


@pytest.mark.e2e
def test_quick_benchmark_writes_a_results_file(server_url: str, tmp_path: Path) -> None:
    # Given the quick mode, made tinier still so that the test stays short (and workers that get
    # one second to stop after SIGTERM before SIGKILL: their databases are dropped anyway)
    output = tmp_path / "results.json"
    command = [
        sys.executable, "-m", "bench", "run", "--quick", "--phases", PHASES,
        "--enqueue-n", "20", "--drain-n", "200", "--batch-size", "50",
        "--latency-n", "10", "--memory-sizes", "50,200", "--provision-n", "3", "--provision-workers", "1x2",
        "--provision-hand-threads", "3", "--stall-timeout", "30", "--stop-grace", "1", "--output", str(output),
    ]  # fmt: skip
    # (a URL with a password: trust authentication ignores one it does not need)
    url = make_url(server_url)
    if not url.password and not os.environ.get("PGPASSWORD"):
        url = url.set(password="bench-quick-pw")
    env = {**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False)}
    # (and a setting of ours in the caller's shell, which the systems must not see)
    env["CONTROLPLANE_SETTLE_WINDOW_MS"] = "7"

    # When it runs
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)

    # Then it succeeds and writes a results file with the machine, versions, every metric and the targets
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(output.read_text())
    assert {"run_id", "command", "machine", "versions", "config", "rounds", "summary", "targets", "skipped"} <= set(doc)
    assert {"nproc", "cpu_model", "postgres", "python"} <= set(doc["machine"])
    assert "dramatiq" in doc["versions"]["project"]
    assert doc["systems"] == ["floor", "ours"]
    assert len(doc["rounds"]) == 1
    assert doc["rounds"][0]["errors"] == {}
    for system in ("floor", "ours"):
        assert METRICS <= set(doc["summary"][system])
        assert doc["summary"][system]["drain_2x8_per_s"]["ratio_median"] > 0
        assert doc["summary"][system]["provision_per_project_s"]["ratio_median"] > 0
        assert doc["rounds"][0]["results"][system]["provision_n"] == 3
        # every timed latency job, and not the sender's untimed warm-up job
        assert doc["rounds"][0]["results"][system]["latency_n"] == 10
    # and memory is the job-running processes' (the whole tree's beside it), and the ignored setting is named
    assert doc["rounds"][0]["results"]["ours"]["memory_ratio_tree"] > 0
    assert any("CONTROLPLANE_SETTLE_WINDOW_MS" in note for note in doc["config"]["notes"])
    # and floor provisioned its projects three at a time, as told (more than the pool's default of two)
    assert doc["config"]["provision_hand_threads"] == 3
    assert doc["rounds"][0]["results"]["floor"]["provision_hand_threads"] == 3
    # and again as many at once as ours' 1x2 workers run (two: the provisioning queue's limit per process)
    assert doc["rounds"][0]["results"]["floor"]["provision_concurrent_threads"] == 2
    # and the file does not keep the server's password
    assert url.password not in output.read_text()
    # and the provision phase reported where ours' time went, step by step
    steps = doc["rounds"][0]["results"]["ours"]["provision_steps"]
    assert {"wait_ms", "job_ms", "work_ms"} <= set(steps)
    assert set(steps["job_ms"]) == {"claim", "roles", "database", "schema", "services", "api_keys", "activate"}
    # and the CPU each way cost while its clock ran, by role: floor's SQL runs in its driver,
    # ours' in its worker processes; PostgreSQL worked for both (it created their databases)
    cpu = {system: doc["rounds"][0]["results"][system]["provision_cpu_ms_per_project"] for system in ("floor", "ours")}
    assert set(cpu["ours"]) == {"machine_busy", "machine_iowait", "machine_idle", "postgres", "driver", "harness",
                                "workers"}
    assert cpu["floor"]["workers"] == 0 and cpu["ours"]["workers"] > 0
    assert cpu["floor"]["postgres"] > 0 and cpu["ours"]["postgres"] > 0
    assert [t["metric"] for t in doc["targets"]] == [
        "drain_2x8_per_s",
        "enqueue_single_per_s",
        "enqueue_batch_per_s",
        "latency_p99_ms",
        "growth_ratio",
        "memory_ratio",
        "provision_per_project_s",
    ]
    measured = {t["metric"]: t["met"] is not None for t in doc["targets"]}
    assert measured == {m: m != "growth_ratio" for m in measured}
    # and the table it prints names every metric
    assert "| drain_2x8_per_s" in done.stdout
    assert "| provision_per_project_s" in done.stdout
    # and it left no database of its own behind, nor any tenant database or role it provisioned
    conn = psycopg2.connect(server_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (f"bench%{doc['run_id']}",))
            assert cur.fetchall() == []
            tenants = f"p\\_bp{doc['run_id']}%"
            cur.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (tenants,))
            assert cur.fetchall() == []
            cur.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (tenants,))
            assert cur.fetchall() == []
    finally:
        conn.close()
    # and `bench runs` lists it against the targets (a quick run is shown when named, never by default)
    listed = subprocess.run([sys.executable, "-m", "bench", "runs", str(output)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    row, met = ([c.strip() for c in line.strip("|").split("|")] for line in listed.stdout.splitlines()[2:4])
    assert row[0] == f"`{output.name}`"
    assert [cell[-1] if cell != "-" else None for cell in row[2:]] == [
        None if t["met"] is None else ("✓" if t["met"] else "✗") for t in doc["targets"]
    ]
    assert met[2:] == [f"{int(bool(t['met']))} of {int(t['met'] is not None)}" for t in doc["targets"]]
    assert not runs.is_full_run(doc)


@pytest.mark.e2e
def test_floor_tuned_runs_beside_floor_with_uss_and_the_callers_settings(server_url: str, tmp_path: Path) -> None:
    # Given the opt-in reference floor_tuned (async commits, one listener per process), tiny sizes,
    # and libpq and Dramatiq settings in the caller's environment, a password among them
    output = tmp_path / "results.json"
    command = [
        sys.executable, "-m", "bench", "run", "--quick", "--only", "floor,floor_tuned",
        "--phases", "drain_2x8,latency,memory", "--drain-n", "200", "--batch-size", "50", "--latency-n", "10",
        "--memory-sizes", "50,200", "--stall-timeout", "30", "--stop-grace", "1", "--output", str(output),
    ]  # fmt: skip
    url = make_url(server_url)
    # (the server's own password if it has one: libpq prefers the URL's anyway)
    password = url.password or os.environ.get("PGPASSWORD") or "bench-tuned-pw"
    env = {**os.environ, "DATABASE_URL": server_url, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "17",
           "dramatiq_bench_probe": "1"}  # fmt: skip

    # When it runs
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)

    # Then floor_tuned is measured in every phase, as a ratio to floor
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(output.read_text())
    assert doc["systems"] == ["floor", "floor_tuned"]
    assert doc["rounds"][0]["errors"] == {}
    for metric in ("drain_2x8_per_s", "latency_p99_ms", "memory_ratio", "memory_uss_ratio"):
        assert doc["summary"]["floor_tuned"][metric]["ratio_median"] > 0
    # and memory reports the workers' USS beside their RSS, in the table too (USS is the private part of RSS)
    for system in ("floor", "floor_tuned"):
        result = doc["rounds"][0]["results"][system]
        assert 0 < result["memory_uss_small_mb"] < result["memory_small_mb"]
    assert "| memory_uss_ratio" in done.stdout
    # and the caller's client settings that reached the systems are recorded, the password masked
    environment = doc["config"]["environment"]
    assert environment["PGCONNECT_TIMEOUT"] == "17" and environment["dramatiq_bench_probe"] == "1"
    assert environment["PGPASSWORD"] == "[REDACTED]"
    assert any("PGCONNECT_TIMEOUT=17" in note for note in doc["config"]["notes"])
    assert password not in output.read_text() and password not in done.stdout


def test_floor_tuned_is_opt_in_and_a_reference_that_no_target_compares_ours_with() -> None:
    # Given the harness's defaults: a full run (and `bench runs`' idea of one) is as it was
    assert "floor_tuned" not in DEFAULT_SYSTEMS
    assert "floor_tuned" not in parse_config([]).systems
    assert parse_config([]).big_phases_for == ["floor", "floor_batch", "ours"]
    # and named, it runs growth and memory like the other floors
    assert "floor_tuned" in parse_config(["--only", "floor_tuned,ours"]).big_phases_for
    # When ours is behind floor_tuned (and floor_batch) but ahead of the one peer
    entry = {"median": 100.0, "ratio_median": 3.5}
    summary: dict[str, Any] = {
        "floor": {"drain_2x8_per_s": {"median": 10.0}},
        "floor_batch": {"drain_2x8_per_s": {"median": 1000.0}},
        "floor_tuned": {"drain_2x8_per_s": {"median": 1000.0}},
        "ours": {"drain_2x8_per_s": entry},
        "pgqueuer": {"drain_2x8_per_s": {"median": 50.0}},
    }
    names = ("floor", "floor_batch", "floor_tuned", "ours", "pgqueuer")
    run = SimpleNamespace(systems=[SYSTEMS[n] for n in names], skipped={})
    verdicts = Run.targets(run, summary)  # type: ignore[arg-type]
    # Then "ahead of every peer" is met: the floors are references, not peers
    drain = next(v for v in verdicts if v["metric"] == "drain_2x8_per_s")
    assert drain["met"] is True and drain["detail"] == ""
    # But when a peer asked for was skipped (its virtualenv could not be built), it is unproven
    run.skipped = {"procrastinate": "virtualenv could not be built: no network"}
    drain = next(v for v in Run.targets(run, summary) if v["metric"] == "drain_2x8_per_s")  # type: ignore[arg-type]
    assert drain["met"] is None and drain["detail"] == "not compared with procrastinate (not measured)"


def test_uss_is_the_private_part_of_a_processes_resident_memory() -> None:
    from bench import procfs

    uss = procfs.uss_kb(os.getpid())
    assert uss is not None and 0 < uss < procfs.rss_kb(os.getpid())
    assert procfs.uss_kb(2**22 + 1) is None  # (no such process: beyond pid_max's largest value)


def test_postgres_cpu_is_counted_for_the_benchmarked_server_alone(server_url: str, tmp_path: Path) -> None:
    from bench import procfs

    # Given the benchmarked server, found from one of its backends, and another PostgreSQL on
    # the machine that has done some work (as another test process's embedded server may)
    ours = procfs.postmaster_at(server_url)
    other_home = tmp_path / "other"
    try:
        other_url = db.embedded_url(other_home, "postgres")
        other = procfs.postmaster_at(other_url)
        assert ours is not None and other is not None and ours != other
        query(other_url, "SELECT sum(i) FROM generate_series(1, 5000000) AS i")
        assert procfs.postgres_cpu_seconds(other) > 0
        before = procfs.postgres_cpu_seconds(ours)
    finally:
        db.stop_embedded(other_home)
    # When the other stops, and the benchmarked one works a little
    wait_for(lambda: procfs.cpu_seconds(other) == 0.0, what="the other server's postmaster to exit")
    query(server_url, "SELECT sum(i) FROM generate_series(1, 100000) AS i")
    # Then the benchmarked server's count did not lose the other's time (it never had it)
    assert procfs.postgres_cpu_seconds(ours) >= before
    assert procfs.postmaster_of(os.getpid()) is None  # (not a PostgreSQL backend)


@pytest.mark.e2e
def test_the_drain_ab_and_the_dramatiq_floor_aids_run(server_url: str) -> None:
    # Given this checkout as both trees of an A/B, with a tiny drain
    env = {**os.environ, "DATABASE_URL": server_url}
    command = [sys.executable, "-m", "bench.ab_drain", str(ROOT), f"{ROOT}::dramatiq_queue_prefetch=4",
               "--n", "500", "--rounds", "1", "--processes", "1"]  # fmt: skip
    # When they run
    ab = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    floor = subprocess.run([sys.executable, "-m", "bench.dramatiq_floor", "--n", "200"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    # Then each prints its summary: one median line per tree, and Dramatiq's own cost per message
    assert ab.returncode == 0, ab.stdout[-3000:] + ab.stderr[-3000:]
    medians = [line for line in ab.stdout.splitlines() if ": median " in line]
    assert [line.split(": median ")[0] for line in medians] == [str(ROOT), f"{ROOT}::dramatiq_queue_prefetch=4"]
    assert all("jobs/s" in line and "PostgreSQL" in line for line in medians)
    assert all("deadlocks 0, consumer restarts 0 in all" in line for line in medians)
    assert floor.returncode == 0, floor.stderr[-3000:]
    assert "µs of CPU per message" in floor.stdout


@pytest.mark.e2e
def test_the_send_ab_runs_a_tree_with_extra_environment(server_url: str) -> None:
    # Given this checkout as both trees, the second with its statements unprepared
    env = {**os.environ, "DATABASE_URL": server_url}
    unprepared = f"{ROOT}::CONTROLPLANE_PREPARED_STATEMENTS=off"
    command = [sys.executable, "-m", "bench.ab_enqueue", str(ROOT), unprepared,
               "--n", "200", "--batch", "100", "--single", "20", "--rounds", "1"]  # fmt: skip
    # When it runs
    ab = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    # Then it prints one median line per tree, in the order given
    assert ab.returncode == 0, ab.stdout[-3000:] + ab.stderr[-3000:]
    medians = [line for line in ab.stdout.splitlines() if ": median " in line]
    assert [line.split(": median ")[0] for line in medians] == [str(ROOT), unprepared]
    assert all("µs/job" in line and "one per call" in line for line in medians)


@pytest.mark.e2e
def test_a_tree_spec_without_a_value_is_refused(server_url: str) -> None:
    # Given an extra-environment pair with no "="
    env = {**os.environ, "DATABASE_URL": server_url}
    command = [sys.executable, "-m", "bench.ab_enqueue", f"{ROOT}::CONTROLPLANE_PREPARED_STATEMENTS", "--rounds", "1"]
    # When the A/B starts
    ab = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    # Then it stops at once, naming the malformed pair
    assert ab.returncode != 0
    assert "expected ROOT::NAME=VALUE" in ab.stderr and "'CONTROLPLANE_PREPARED_STATEMENTS'" in ab.stderr


def _run_aid(server_url: str, tmp_path: Path, module: str, *args: str, timeout: float = 120) -> tuple[
    subprocess.CompletedProcess[str], Any
]:
    """Run ``python -m bench.<module> ARGS --output FILE`` against ``server_url``; once it has
    exited 0, what it printed and the results it wrote."""
    output = tmp_path / f"{module}.json"
    command = [sys.executable, "-m", f"bench.{module}", *args, "--output", str(output)]
    env = {**os.environ, "DATABASE_URL": server_url}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(output.read_text())


@pytest.mark.e2e
def test_the_history_cost_aid_sends_into_a_filled_history_and_an_empty_one(server_url: str, tmp_path: Path) -> None:
    # Given a small history and a few sends of each kind
    args = ("--history", "3000", "--single", "20", "--n", "1000", "--rounds", "1", "--no-warm-up")
    # When it runs
    done, result = _run_aid(server_url, tmp_path, "history_cost", *args, timeout=180)
    # Then the sender made every send into each database, each part with its WAL per job, and the medians are printed
    assert set(result["rounds"]) == {"empty", "history"}
    for (sample,) in result["rounds"].values():
        assert sample["single"]["jobs"] == 20 and sample["batch"]["jobs"] == 1000
        assert sample["single"]["wal_bytes_per_job"] > 0 and sample["batch"]["wal_bytes_per_job"] > 0
    assert "history: control_plane.jobs" in done.stdout
    assert [line.split(": median ")[0] for line in done.stdout.splitlines() if ": median " in line] == [
        "empty",
        "history",
    ]


def test_the_history_cost_aid_keeps_the_wal_it_reads_through_checkpoints(db_url: str) -> None:
    from bench.history_cost import _connect, _full_page_images, _hold_wal

    with contextlib.closing(_connect(db_url)) as conn, conn.cursor() as cur:
        try:
            cur.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        except psycopg2.Error:
            pytest.skip("pg_walinspect is not available on this server")
        # Given the aid's hold on the WAL, taken before its sends
        _hold_wal(cur)
        cur.execute("SELECT pg_current_wal_lsn()")
        (start,) = cur.fetchone()
        # When writes, WAL segment switches and checkpoints pass before the WAL is read (a full
        # test run's other process checkpoints too: the read once failed, the segment recycled)
        cur.execute("CREATE TABLE walheld (x int)")
        for _ in range(3):
            cur.execute("INSERT INTO walheld SELECT generate_series(1, 1000); SELECT pg_switch_wal(); CHECKPOINT")
        cur.execute("SELECT pg_current_wal_lsn()")
        (end,) = cur.fetchone()
        # Then the WAL is still there to read: the table's first writes after a checkpoint were full pages
        assert _full_page_images(cur, start, end, 1).get("walheld", 0) > 0


@pytest.mark.e2e
def test_the_notify_cost_aid_measures_its_three_variants(server_url: str, tmp_path: Path) -> None:
    # Given one and two senders for a moment each
    args = ("--senders", "1,2", "--seconds", "0.3", "--rounds", "1")
    # When it runs
    done, result = _run_aid(server_url, tmp_path, "notify_cost", *args)
    # Then every variant sent something at both sizes, and the table names them
    rates = result["results"]
    assert set(rates) == {"NOTIFY always", "NOTIFY a waiting consumer (none)", "no NOTIFY"}
    assert all(rates[v][n][0] > 0 for v in rates for n in ("1", "2"))
    assert "| senders | NOTIFY always |" in done.stdout


@pytest.mark.e2e
def test_the_prune_cost_aid_drains_beside_each_way_of_pruning(server_url: str, tmp_path: Path) -> None:
    # Given a small history and queue
    args = ("--history", "15000", "--jobs", "2000", "--rounds", "1")
    # When it runs
    _, result = _run_aid(server_url, tmp_path, "prune_cost", *args)
    # Then each way of pruning deleted the whole history while the queue drained, and no prune deleted nothing
    results = result["results"]
    assert {mode: [r["pruned"] for r in rounds] for mode, rounds in results.items()} == {
        "none": [0], "one statement": [15000], "batches": [15000]}  # fmt: skip
    assert all(r["jobs_per_s"] > 0 for rounds in results.values() for r in rounds)


@pytest.mark.e2e
def test_the_joined_send_cost_aid_sends_plain_and_prepared_in_transactions(server_url: str, tmp_path: Path) -> None:
    # Given a few sends per variant
    args = ("--sends", "30", "--rounds", "2")
    # When it runs (it exits non-zero if a variant lost a send or ran prepared when it should not, or the reverse)
    done, result = _run_aid(server_url, tmp_path, "joined_send_cost", *args)
    # Then both variants were measured in both rounds, and the table names them
    per_send = result["per_send"]
    assert set(per_send) == {"plain (as enqueue_in runs it)", "prepared"}
    assert all(len(v["wall_us"]) == 2 and min(v["wall_us"]) > 0 for v in per_send.values())
    assert "| backend CPU |" in done.stdout


@pytest.mark.e2e
def test_the_latency_parts_aid_splits_each_pickup_into_the_send_and_the_rest(server_url: str, tmp_path: Path) -> None:
    # Given a few jobs to send into idle workers
    env = {**os.environ, "DATABASE_URL": server_url}
    output = tmp_path / "parts.json"
    command = [sys.executable, "-m", "bench.latency_parts", "--n", "20", "--rate", "100", "--output", str(output)]
    # When it runs (in a session of its own: on a timeout, its workers go with it)
    aid = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # fmt: skip
    try:
        out, err = aid.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        os.killpg(aid.pid, signal.SIGKILL)
        raise
    done = subprocess.CompletedProcess(command, aid.returncode, out, err)
    # Then every job ran, each matched with its send, and the parts are reported
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["n"] == 20
    assert set(result["percentiles_ms"]) == {"pickup", "send", "after the send returned"}
    assert all(job["send"] > 0 for job in result["slowest_ms"])
    assert "the slowest 1 pickups" in done.stdout


@pytest.mark.e2e
def test_the_drain_profile_runs_against_the_broker_as_it_is(server_url: str) -> None:
    # Given a tiny drain to profile (it wraps the consumer's claim and flush, and EXPLAINs the hot statements)
    env = {**os.environ, "DATABASE_URL": server_url}
    command = [sys.executable, "-m", "bench.profile_ours", "--n", "300", "--processes", "1"]
    # When it runs
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    # Then it drained every job, counted the claims and settles, and explained all three statements
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "drained 300 jobs" in done.stdout
    assert '"settle": {"statements": ' in done.stdout
    assert all(f'"{label}"' in done.stdout for label in ("enqueue_500", "claim_16", "settle_16"))


def test_growth_drains_the_small_backlog_three_times_per_round_unless_told_otherwise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given the harness's command line (the small backlog drains in a fraction of a second,
    # so its rate is the median of several drains per round)
    # Then a full run drains it three times, the quick mode once, and --growth-repeats decides
    assert parse_config([]).growth_repeats == 3
    assert parse_config(["--quick"]).growth_repeats == 1
    assert parse_config(["--growth-repeats", "5"]).growth_repeats == 5
    # and a count under one is refused, naming the flag
    with pytest.raises(SystemExit):
        parse_config(["--growth-repeats", "0"])
    assert "--growth-repeats must be at least 1" in capsys.readouterr().err


def test_floor_provisions_in_sequence_unless_told_how_many_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    # Given the harness's command line (the reference runs the SQL by hand in sequence)
    # Then floor provisions one project at a time by default, and as many at once as told
    assert parse_config([]).provision_hand_threads == 1
    assert parse_config(["--provision-hand-threads", "16"]).provision_hand_threads == 16
    # and a count under one is refused, naming the flag
    with pytest.raises(SystemExit):
        parse_config(["--provision-hand-threads", "0"])
    assert "--provision-hand-threads must be at least 1" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_run_against_a_server_it_cannot_use_stops_at_once_naming_it(server_url: str, tmp_path: Path) -> None:
    # Given a DATABASE_URL where no server answers, one whose role may not create databases, and one
    # whose role may create databases but not the provision phase's roles (each role logs in as
    # server_url's does, with its password if it has one)
    dead = f"postgresql://root:s3cret@127.0.0.1:{_closed_port()}/postgres"
    admin = make_url(db.with_database(server_url, "postgres"))
    suffix = uuid.uuid4().hex[:8]
    roles = {f"bench_nocreatedb_{suffix}": "NOCREATEDB", f"bench_nocreaterole_{suffix}": "CREATEDB NOCREATEROLE"}
    password = f" PASSWORD '{admin.password}'" if admin.password else ""
    for role, options in roles.items():
        query(server_url, f"CREATE ROLE {role} LOGIN {options}{password}")
    try:
        as_role = [admin.set(username=role).render_as_string(hide_password=False) for role in roles]
        cases = (
            (dead, "cannot connect to PostgreSQL at"),
            (as_role[0], "may not create databases"),
            (as_role[1], "may not create roles"),
        )
        for url, says in cases:
            output = tmp_path / "results.json"
            # When a run (whose phases include provision) starts on it
            command = [sys.executable, "-m", "bench", "run", "--quick", "--output", str(output)]
            done = subprocess.run(command, cwd=ROOT, env={**os.environ, "DATABASE_URL": url},
                                  capture_output=True, text=True, timeout=120)  # fmt: skip
            # Then it stops before measuring anything, saying why and which server, without its password,
            # and writes no results file
            assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
            assert says in done.stderr and "set DATABASE_URL" in done.stderr, done.stderr
            assert "s3cret" not in done.stderr + done.stdout
            assert not output.exists()
            assert "round 1" not in done.stdout
    finally:
        for role in roles:
            query(server_url, f"DROP ROLE IF EXISTS {role}")


def test_without_database_url_or_a_local_server_the_benchmarks_use_the_embedded_postgres(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given no DATABASE_URL, and no server answering at 127.0.0.1:5432 (taken away for this process only)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("CONTROLPLANE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(server, "_answers", lambda host, port: False)
    server.admin_url.cache_clear()
    try:
        # When the benchmarks ask where to measure
        url = server.admin_url()
        # Then they get the project's embedded PostgreSQL, started under CONTROLPLANE_HOME, and usable
        assert (tmp_path / "home" / "pgdata" / "postmaster.pid").exists()
        assert server.unusable(url) is None
        assert int(query(url, "SHOW server_version_num")[0]["server_version_num"]) >= 180000
        assert "measuring on the embedded PostgreSQL" in capsys.readouterr().err
    finally:
        server.admin_url.cache_clear()
        db.stop_embedded(tmp_path / "home")
