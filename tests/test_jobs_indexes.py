"""The jobs table's indexes: a completion rewrites its row in place, lookups by state stay indexed.

No index of ``control_plane.jobs`` covers a column that a job's normal run
changes, so a completion is a HOT update (no index entry written); operators'
lookups by state go through generated columns that are NULL for such jobs
(``live_key``, ``failed_at``, ``retry_at``) or through the message table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg2
import pytest

import tasks
from models import queries
from tasks.cli import main
from tests import actors
from tests.support import (
    claim_in_process,
    job,
    query,
    queue_stats_both_ways,
    running_worker,
    settle_in_process,
    wait_for,
)


def _plan(url: str, sql: str) -> str:
    """EXPLAIN of ``sql`` with sequential scans priced out: a scan shows only where no index can serve."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET enable_seqscan = off")
            cur.execute("ANALYZE control_plane.jobs")
            cur.execute("EXPLAIN " + sql)
            return "\n".join(row[0] for row in cur.fetchall())
    finally:
        conn.close()


def _jobs_updates(url: str) -> dict[str, Any]:
    rows = query(
        url,
        "SELECT n_tup_upd AS updates, n_tup_hot_upd AS hot FROM pg_stat_user_tables "
        "WHERE relid = 'control_plane.jobs'::regclass",
    )
    return rows[0]


def test_jobs_that_run_and_complete_are_rewritten_in_place_without_index_entries(
    db_url: str, quiet_server: None, tmp_path: Path
) -> None:
    # Given 300 jobs drained by a real worker
    messages = tasks.broker.enqueue_batch([actors.noop.message(i) for i in range(300)])
    with running_worker(db_url, tmp_path, processes=1, threads=4):
        wait_for(
            lambda: query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE status = 'completed'")[0]["n"]
            == 300,
            what="300 completed jobs",
        )
    # When the worker's connections have closed (they report their table statistics as they go)
    def reported() -> dict[str, Any] | None:
        stats = _jobs_updates(db_url)
        return stats if stats["updates"] >= 300 else None

    stats = wait_for(reported, what="the workers' statistics")
    # Then many completions were HOT updates: no index covers what a completion changes (one that
    # did, on `status` say, would make none HOT). How many beyond that depends on room in the pages
    # and on how soon the dead versions can be pruned, which a busy server's other snapshots delay:
    # 43% in a suite run beside three other sessions' tests, against more than half when quiet
    assert stats["hot"] >= stats["updates"] * 0.25, stats
    done = job(db_url, messages[0].message_id)
    assert (done["status"], done["attempts"], done["live_key"], done["failed_at"], done["retry_at"]) == (
        "completed", 1, None, None, None,
    )  # fmt: skip


def test_lookups_by_state_are_served_by_indexes_not_a_scan_of_the_history(db_url: str) -> None:
    for sql, index, table in (
        ("SELECT * FROM control_plane.failed_jobs", "_failed_at", "jobs"),
        # the latest failures, as the README asks for them (migration 0019's column): the index's end, no sort
        ("SELECT * FROM control_plane.failed_jobs ORDER BY failed_at DESC LIMIT 20",
         "Index Scan Backward using ix_jobs_failed_at", "jobs"),
        # the failed jobs per queue, counted at every `controlplane stats` and metrics scrape (migration 0018)
        ("SELECT queue, count(*) FROM control_plane.jobs WHERE failed_at IS NOT NULL GROUP BY queue",
         "Index Only Scan using ix_jobs_queue_failed_at", "jobs"),
        ("SELECT * FROM control_plane.retrying_jobs", "ix_jobs_retry_at", "jobs"),
        ("SELECT id FROM control_plane.jobs WHERE live_key = 'k'", "uq_jobs_live_key", "jobs"),
        # `controlplane jobs list --status failed`'s order, and `controlplane workers`' count of
        # each worker's messages (the whole message table once per worker, before migration 0011)
        ("SELECT id FROM control_plane.jobs WHERE failed_at IS NOT NULL ORDER BY failed_at DESC LIMIT 50",
         "ix_jobs_failed_at", "jobs"),
        ("SELECT * FROM control_plane.workers", "ix_messages_lease", "messages"),
    ):  # fmt: skip
        plan = _plan(db_url, sql)
        assert index in plan and f"Seq Scan on {table}" not in plan, (sql, plan)
    # And the query `controlplane stats` and the metrics run counts them so too (its count of the last
    # minute's completions may read the history: on PostgreSQL before 16, within its bound)
    stats = queries.queue_stats_via_messages(queries.STATS_COMPLETED_SCAN_MAX_ROWS)
    assert "Index Only Scan using ix_jobs_queue_failed_at" in _plan(db_url, stats)


def test_the_generated_columns_follow_a_job_through_retry_failure_and_retry_by_operator(db_url: str) -> None:
    # Given a keyed job that fails its first attempt and waits for another
    sent = actors.always_fails.send_with_options(args=("x",), unique_key="gen-cols")
    assert job(db_url, sent.message_id)["live_key"] == "gen-cols"
    consumer, held = claim_in_process()
    held.error_text = "RuntimeError: once"
    tasks.broker.enqueue(held, delay=60_000)  # what Dramatiq's Retries does with a failed attempt
    settle_in_process(consumer, held, "ack")
    waiting = job(db_url, sent.message_id)
    assert (waiting["status"], waiting["live_key"], waiting["failed_at"]) == ("pending", "gen-cols", None)
    assert waiting["retry_at"] == waiting["scheduled_at"]
    assert [r["id"] for r in query(db_url, "SELECT id::text FROM control_plane.retrying_jobs")] == [sent.message_id]
    # When it fails for good
    query(db_url, "UPDATE control_plane.messages SET eta = now() WHERE id = %s", (sent.message_id,))
    consumer, held = claim_in_process()
    settle_in_process(consumer, held, "nack")
    # Then it is failed, its key free, and found by failed_jobs
    failed = job(db_url, sent.message_id)
    assert (failed["status"], failed["live_key"], failed["retry_at"]) == ("failed", None, None)
    assert failed["failed_at"] == failed["completed_at"]
    assert query(db_url, "SELECT id::text, failed_at FROM control_plane.failed_jobs") == [
        {"id": sent.message_id, "failed_at": failed["completed_at"]}]  # fmt: skip
    # And a job retried by an operator holds its key again, so a second send finds it
    assert query(db_url, "SELECT control_plane.retry_job(%s::uuid) AS ok", (sent.message_id,))[0]["ok"] is True
    again = job(db_url, sent.message_id)
    assert (again["live_key"], again["failed_at"]) == ("gen-cols", None)
    duplicate = actors.always_fails.send_with_options(args=("y",), unique_key="gen-cols")
    assert duplicate.message_id == sent.message_id


@pytest.mark.parametrize("status", ["pending", "running", "completed", "failed"])
def test_jobs_list_by_status_lists_exactly_the_jobs_in_that_state(
    db_url: str, status: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given one job in each state (running: claimed and started, its start mark written)
    ids = {}
    for state in ("completed", "failed"):
        ids[state] = actors.noop.send(state).message_id
        consumer, held = claim_in_process()
        settle_in_process(consumer, held, "ack" if state == "completed" else "nack")
    ids["running"] = actors.noop.send("running").message_id
    running, held = claim_in_process()
    tasks.broker._started(held)  # what a worker thread does as it starts the job
    wait_for(lambda: job(db_url, ids["running"])["status"] == "running", what="the start mark")
    ids["pending"] = actors.noop.send("pending").message_id
    try:
        # When an operator lists the jobs in one state
        monkeypatch.setenv("DATABASE_URL", db_url)
        capsys.readouterr()
        assert main(["jobs", "list", "--status", status, "--json"]) == 0
        # Then exactly that job is listed
        assert [row["id"] for row in json.loads(capsys.readouterr().out)] == [ids[status]]
    finally:
        running.close()


def test_jobs_list_retrying_lists_the_pending_jobs_waiting_for_another_attempt_from_an_index(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job whose first attempt failed and that waits for another, and a job never tried
    retried = actors.always_fails.send("x").message_id
    consumer, held = claim_in_process()
    tasks.broker.enqueue(held, delay=60_000)  # what Dramatiq's Retries does with a failed attempt
    settle_in_process(consumer, held, "ack")
    fresh = actors.noop.send("fresh").message_id
    monkeypatch.setenv("DATABASE_URL", db_url)
    # When an operator lists the retrying jobs, and the pending ones
    listed = {}
    for status in ("retrying", "pending"):
        capsys.readouterr()
        assert main(["jobs", "list", "--status", status, "--json"]) == 0
        listed[status] = [row["id"] for row in json.loads(capsys.readouterr().out)]
    # Then retrying lists the first only, pending both (newest first)
    assert listed == {"retrying": [retried], "pending": [fresh, retried]}
    # And retrying is read from retry_at's index, not the history
    plan = _plan(db_url, "SELECT id FROM control_plane.jobs WHERE retry_at IS NOT NULL "
                         "ORDER BY created_at DESC LIMIT 50")  # fmt: skip
    assert "ix_jobs_retry_at" in plan and "Seq Scan on jobs" not in plan, plan


def test_queue_stats_from_the_message_table_agree_with_the_view(db_url: str) -> None:
    # Given, in queue "default", one job of each kind: completed, failed, running,
    # claimed but not started (prefetched), ready, delayed, waiting for a retry;
    # and one ready job in queue "slow"
    for outcome in ("ack", "nack"):
        actors.noop.send(outcome)
        consumer, held = claim_in_process()
        settle_in_process(consumer, held, outcome)
    retried = actors.always_fails.send("x")
    consumer, held = claim_in_process()
    tasks.broker.enqueue(held, delay=60_000)  # what Dramatiq's Retries does with a failed attempt
    settle_in_process(consumer, held, "ack")
    started = actors.noop.send("running").message_id
    actors.noop.send("prefetched")
    running = tasks.broker.consume("default", prefetch=2, timeout=5000)
    held, prefetched = next(running), next(running)
    assert held is not None and held.message_id == started and prefetched is not None
    tasks.broker._started(held)  # what a worker thread does as it starts the job
    wait_for(lambda: job(db_url, started)["status"] == "running", what="the start mark")
    actors.noop.send("ready")
    actors.noop.send_with_options(args=("later",), delay=3_600_000)
    actors.slow_noop.send(0)
    try:
        # When the stats are read both ways in one snapshot
        view, fast = queue_stats_both_ways(db_url)
    finally:
        running.close()
    # Then they agree on every queue that has jobs (the others listed are consumed
    # by this process's heartbeating consumers: all zeros), and the counts are the ones given
    # (and the paused column, which the view has not: no queue is paused)
    assert [r for r in fast if r.pop("paused") is False and r["queue"] in {"default", "slow"}] == view
    assert all(not any(v for k, v in r.items() if k != "queue") for r in fast if r["queue"] not in {"default", "slow"})
    counts = {r["queue"]: tuple(r[c] for c in ("ready", "scheduled", "running", "failed", "completed_last_minute"))
              for r in view}  # fmt: skip
    assert counts == {"default": (2, 2, 1, 1, 1), "slow": (1, 0, 0, 0, 0)}
    assert job(db_url, retried.message_id)["attempts"] == 1
    assert all(r["oldest_ready_age_seconds"] >= 0 for r in fast)


def test_queue_stats_from_the_message_table_list_consumed_queues_and_skip_old_history(
    db_url: str, tmp_path: Path
) -> None:
    # Given a queue whose only job completed an hour ago, and a worker consuming other queues
    query(
        db_url,
        "INSERT INTO control_plane.jobs (id, type, queue, status, completed_at) "
        "VALUES (gen_random_uuid(), 'old', 'archive', 'completed', now() - interval '1 hour')",
    )
    with running_worker(db_url, tmp_path, processes=1, threads=1):
        # When the stats are read from the message table
        _, fast = queue_stats_both_ways(db_url)
    # Then the consumed queues are listed with zeros, and the queue with only old history is not
    queues = {r["queue"]: r for r in fast}
    assert {"default", "slow"} <= set(queues) and "archive" not in queues, queues
    assert (queues["default"]["ready"], queues["default"]["completed_last_minute"]) == (0, 0)


def test_recent_completions_are_counted_from_a_brin_index_where_it_keeps_updates_hot(db_url: str) -> None:
    version = int(query(db_url, "SHOW server_version_num")[0]["server_version_num"])
    brin = query(db_url, "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_jobs_completed_at_brin'")
    if version >= 160000:
        # Given PostgreSQL 16 or later, where a BRIN index does not stop HOT updates:
        # Then the index exists and the stats read no whole table
        assert brin and "USING brin (completed_at)" in brin[0]["indexdef"], brin
        assert "pages_per_range='16'" in brin[0]["indexdef"], brin
        plan = _plan(db_url, queries.QUEUE_STATS_VIA_MESSAGES)
        assert "ix_jobs_completed_at_brin" in plan and "Seq Scan on jobs" not in plan, plan
    else:
        # Given an older server, where it would: Then there is no such index (completions stay HOT)
        assert brin == []


def _rows_read(node: dict[str, Any]) -> int:
    """Rows the plan's scans of control_plane.messages produced or filtered out, loops counted."""
    read = 0
    if node.get("Relation Name") == "messages":
        loops = node.get("Actual Loops", 1)
        read += (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops
    return read + sum(_rows_read(child) for child in node.get("Plans", []))


def test_a_claim_reads_the_due_messages_not_every_one_waiting_for_a_delay(db_url: str) -> None:
    # Given a queue with 5,000 messages waiting out a delay or a retry backoff, and 6 due at two priorities
    query(db_url, """
        INSERT INTO control_plane.messages (id, queue, actor, priority, eta, body)
        SELECT gen_random_uuid(), 'default', 'tests.noop', g % 2 * 5, now() + interval '1 day', '\\x7b7d'::bytea
        FROM generate_series(1, 5000) AS g
        UNION ALL
        SELECT gen_random_uuid(), 'default', 'tests.noop', g % 2 * 5, now() - interval '1 second', '\\x7b7d'::bytea
        FROM generate_series(1, 6) AS g;
        ANALYZE control_plane.messages""")  # fmt: skip
    # When a worker claims from it
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            params = {"queue": "default", "limit": 16, "token": "00000000-0000-0000-0000-000000000001",
                      "worker": "w", "lease": 30}  # fmt: skip
            cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + queries.CLAIM, params)  # runs it, rolled back below
            plan = cur.fetchone()[0][0]["Plan"]
    finally:
        conn.rollback()
        conn.close()
    # Then it gets the due ones, having read about as many rows, not the 5,000 that wait
    assert plan["Actual Rows"] == 6
    assert _rows_read(plan) < 100, json.dumps(plan, indent=1)[:3000]


def test_the_heartbeat_and_the_workers_view_read_each_claim_once_not_once_per_worker(db_url: str) -> None:
    # Given 39 workers holding 100 claimed messages each, and w0 holding 5, each under a claim token of its own
    query(db_url, """
        INSERT INTO control_plane.worker_heartbeats (id, hostname, pid)
        SELECT 'w' || g, 'host', g FROM generate_series(0, 39) AS g;
        INSERT INTO control_plane.messages (id, queue, actor, priority, eta, body, claim_token, worker,
                                            lease_expires_at)
        SELECT gen_random_uuid(), 'default', 'tests.noop', 0, now(), '\\x7b7d'::bytea,
               ('00000000-0000-0000-0000-' || lpad(w::text, 12, '0'))::uuid, 'w' || w,
               now() + interval '30 seconds'
        FROM generate_series(0, 3904) AS g, LATERAL (SELECT CASE WHEN g < 5 THEN 0 ELSE 1 + g % 39 END AS w) AS x;
        ANALYZE control_plane.messages""")  # fmt: skip
    held = [r["id"] for r in query(db_url, "SELECT id::text FROM control_plane.messages WHERE worker = 'w0'")]
    params = {"ids": held, "tokens": ["00000000-0000-0000-0000-000000000000"], "lease": 30, "worker": "w0",
              "hostname": "host", "pid": 0, "queues": ["default"], "queue": "default"}  # fmt: skip
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SET enable_seqscan = off")  # as with a table too big to read whole
            # When worker w0 heartbeats (run, then rolled back)
            cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + queries.HEARTBEAT, params)
            heartbeat = cur.fetchone()[0][0]["Plan"]
            # and an operator lists the workers
            cur.execute("EXPLAIN (ANALYZE, FORMAT JSON) SELECT * FROM control_plane.workers")
            workers = cur.fetchone()[0][0]["Plan"]
    finally:
        conn.rollback()
        conn.close()
    # Then the heartbeat reads w0's 5 claims, not all 3,905 (twice), and the list reads the 3,905
    # once, not once per worker (156,000; 2.3 s with 1,000 workers holding 64 each)
    assert _rows_read(heartbeat) < 100, json.dumps(heartbeat, indent=1)[:3000]
    assert _rows_read(workers) <= 3905, json.dumps(workers, indent=1)[:3000]
    in_flight = query(db_url, "SELECT in_flight, count(*) AS n FROM control_plane.workers GROUP BY 1 ORDER BY 1")
    assert in_flight == [{"in_flight": 5, "n": 1}, {"in_flight": 100, "n": 39}]


def test_a_claim_in_a_queue_of_more_priorities_than_it_descends_still_takes_them_in_order(db_url: str) -> None:
    # Given a queue whose due messages have more distinct priorities than a claim looks up one
    # by one, each priority with a message waiting for a delay before its due one
    n = queries.CLAIM_PRIORITIES + 8
    query(db_url, """
        INSERT INTO control_plane.messages (id, queue, actor, priority, eta, body)
        SELECT gen_random_uuid(), 'default', 'tests.noop', g, now() + interval '1 day', '\\x7b7d'::bytea
        FROM generate_series(1, %(n)s) AS g
        UNION ALL
        SELECT gen_random_uuid(), 'default', 'tests.noop', g, now() - make_interval(secs => g), '\\x7b7d'::bytea
        FROM generate_series(1, %(n)s) AS g""", {"n": n})  # fmt: skip
    # When a worker claims more than there are, and then a second claims what is left of a smaller claim
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur:
            claim = {"queue": "default", "token": "00000000-0000-0000-0000-000000000001", "worker": "w", "lease": 30}
            cur.execute(queries.CLAIM, {**claim, "limit": n - 3})
            first = [row[0] for row in cur.fetchall()]
            cur.execute(queries.CLAIM, {**claim, "limit": 100})
            second = [row[0] for row in cur.fetchall()]
    finally:
        conn.rollback()
        conn.close()
    # Then the first got the n - 3 lowest priorities' due messages, in order, and the second the rest
    due = [r["id"] for r in query(db_url, "SELECT id::text FROM control_plane.messages WHERE eta <= now() "
                                          "ORDER BY priority")]  # fmt: skip
    assert (first, second) == (due[: n - 3], due[n - 3 :])
