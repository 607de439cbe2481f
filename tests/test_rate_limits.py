"""Dramatiq's rate limiters and group barriers on control_plane.rate_limits (no Redis)."""

from __future__ import annotations

import threading
from datetime import datetime
from itertools import pairwise
from pathlib import Path

import psycopg2
import pytest
from dramatiq import group
from dramatiq.rate_limits import Barrier, BucketRateLimiter, ConcurrentRateLimiter, WindowRateLimiter
from freezegun import freeze_time

import tasks
from tasks.rate_limits import PostgresRateLimiterBackend
from tests import actors
from tests.support import effects, jobs_in, query, running_worker, runs, wait_for


def backend() -> PostgresRateLimiterBackend:
    return tasks.rate_limiter_backend


def test_add_sets_a_key_once_until_it_expires(db_url: str) -> None:
    # Given a key added with a long TTL, and one with a 1 ms TTL
    assert backend().add("long", 3, ttl=60_000)
    assert backend().add("short", 3, ttl=1)
    # When each is added again
    # Then the live key refuses, and the expired one is set anew (expired counts as absent)
    assert not backend().add("long", 5, ttl=60_000)
    wait_for(lambda: backend().add("short", 5, ttl=60_000), what="the 1 ms key to expire")
    values = {r["key"]: r["value"] for r in query(db_url, "SELECT key, value FROM control_plane.rate_limits")}
    assert values == {"long": 3, "short": 5}


@pytest.mark.parametrize("ttl", [0, -1000])
def test_a_limiter_whose_ttl_is_not_positive_is_refused_not_opened_to_everyone(db_url: str, ttl: int) -> None:
    # Given a mutex whose ttl is not positive (its counter expired at once: every acquirer got in)
    mutex = ConcurrentRateLimiter(backend(), "ttl-mutex", limit=1, ttl=ttl)
    # When it is acquired, Then it is refused, naming the ttl, and takes nothing
    with pytest.raises(ValueError, match="ttl must be a positive number"), mutex.acquire():
        pass
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.rate_limits") == [{"n": 0}]


def test_a_release_racing_the_deletion_of_its_row_does_not_open_the_mutex_twice(db_url: str) -> None:
    # Given a held mutex whose row an operator is deleting (docs/operations.md), not yet committed
    key = "mutex"
    mutex = ConcurrentRateLimiter(backend(), key, limit=1, ttl=60_000)
    assert backend().incr(key, 1, maximum=1, ttl=60_000)
    operator = psycopg2.connect(db_url)
    try:
        with operator.cursor() as cur:
            cur.execute("DELETE FROM control_plane.rate_limits WHERE key = %s", (key,))
        # When the holder releases its slot while the deletion commits
        released: list[bool] = []
        release = threading.Thread(target=lambda: released.append(backend().decr(key, 1, minimum=0, ttl=60_000)))
        release.start()
        waiting = (
            "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        )
        wait_for(lambda: query(db_url, waiting)[0]["n"] == 1, what="the release to wait for the row")
        operator.commit()
        release.join()
    finally:
        operator.close()
    # Then the release finds nothing to take from (as with a missing key in Redis), stores no
    # negative count, and the mutex admits one holder, not two
    assert released == [False]
    assert query(db_url, "SELECT value FROM control_plane.rate_limits WHERE key = %s", (key,)) == []
    first, second = mutex.acquire(raise_on_failure=False), mutex.acquire(raise_on_failure=False)
    assert [first.__enter__(), second.__enter__()] == [True, False]


def test_more_expired_counters_than_one_sweep_takes_are_swept_on_the_next_call(db_url: str) -> None:
    # Given more expired counters than one sweep deletes (many window keys, one row per second each)
    query(db_url, "INSERT INTO control_plane.rate_limits (key, value, expires_at) "
                  "SELECT 'w@' || i, 1, now() - interval '1 minute' FROM generate_series(1, 10001) AS i")
    fresh = PostgresRateLimiterBackend(tasks.connection)
    # When the backend is used twice in a row (its sweep is due on the first call only, a minute apart)
    assert fresh.incr("k", 1, maximum=5, ttl=60_000)
    assert fresh.incr("k", 1, maximum=5, ttl=60_000)
    # Then a full batch made the second call sweep the rest, instead of leaving it for a minute
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.rate_limits WHERE expires_at < now()")[0]["n"] == 0


def test_incr_and_decr_stay_within_their_bounds(db_url: str) -> None:
    # Given a missing key (it counts as 0)
    b = backend()
    # When it is incremented up to a maximum of 2
    assert [b.incr("k", 1, maximum=2, ttl=60_000) for _ in range(3)] == [True, True, False]
    # And decremented down to a minimum of 0
    assert [b.decr("k", 1, minimum=0, ttl=60_000) for _ in range(3)] == [True, True, False]
    # Then it ends at 0, and a missing key cannot go below 0 either
    assert query(db_url, "SELECT value FROM control_plane.rate_limits WHERE key = 'k'")[0]["value"] == 0
    assert not b.decr("missing", 1, minimum=0, ttl=60_000)
    # And an amount larger than the maximum never applies
    assert not b.incr("big", 5, maximum=4, ttl=60_000)


def test_a_concurrent_limiter_holds_its_limit_across_threads(db_url: str) -> None:
    # Given a limiter of 2 and 6 threads that each try it once a round, for 5 rounds, and hold
    # what they got until all 6 have tried (so that every try meets the holders of its round)
    limiter = ConcurrentRateLimiter(backend(), "threads", limit=2, ttl=60_000)
    threads, rounds = 6, 5
    lock = threading.Lock()
    holders = [0]
    per_round: list[tuple[int, int]] = []  # (threads holding it, the count in the table), each round
    failures: list[BaseException] = []

    def count_the_holders() -> None:  # run by one thread once all have tried, before any lets go
        value = query(db_url, "SELECT value FROM control_plane.rate_limits WHERE key = 'threads'")[0]["value"]
        per_round.append((holders[0], value))
        holders[0] = 0

    tried = threading.Barrier(threads, action=count_the_holders)
    let_go = threading.Barrier(threads)

    def work() -> None:
        try:
            for _ in range(rounds):
                with limiter.acquire(raise_on_failure=False) as acquired:
                    if acquired:
                        with lock:
                            holders[0] += 1
                    tried.wait(timeout=60)
                let_go.wait(timeout=60)  # every slot of this round is free before the next
        except BaseException as exc:
            failures.append(exc)
            tried.abort()
            let_go.abort()

    # When they all run at once
    started = [threading.Thread(target=work) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join()
    # Then in every round exactly 2 held it, and the table counted 2, while the other 4 were refused
    assert failures == []
    assert per_round == [(2, 2)] * rounds
    # And the count is back to 0
    assert query(db_url, "SELECT value FROM control_plane.rate_limits WHERE key = 'threads'")[0]["value"] == 0


def test_a_slot_taken_inside_enqueue_in_is_released_like_any_other(db_url: str) -> None:
    # Given a job that takes a mutex while its sends join its own transaction
    mutex = ConcurrentRateLimiter(backend(), "in-a-transaction", limit=1, ttl=60_000)
    conn = psycopg2.connect(db_url)
    try:
        with tasks.enqueue_in(conn), mutex.acquire():
            actors.noop.send("follow-up")
        # When it commits
        conn.commit()
    finally:
        conn.close()
    # Then the mutex is free for the next holder (not taken for its whole ttl), and the send landed
    with mutex.acquire(raise_on_failure=False) as acquired:
        assert acquired
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'tests.noop'")[0]["n"] == 1


def test_a_window_limiter_allows_limit_per_window_by_the_databases_clock(db_url: str) -> None:
    # Given a window limiter of 3 per minute, used from hosts whose clocks disagree
    limiter = WindowRateLimiter(backend(), "window", limit=3, window=60)

    def attempt() -> bool:
        with limiter.acquire(raise_on_failure=False) as acquired:
            return bool(acquired)

    results: list[bool] = []
    for host_clock in (datetime(2026, 3, 2, 10, 0, 0), datetime(2026, 3, 2, 9, 59, 30)):
        with freeze_time(host_clock):
            # When 3 attempts are made from each, from 3 threads at once
            threads = [threading.Thread(target=lambda: results.append(attempt())) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    # Then 3 pass in all: the host 30 s behind does not get a window of its own
    assert sorted(results) == [False, False, False, True, True, True]
    # And the window is the database's: its seconds name the buckets
    now = query(db_url, "SELECT floor(extract(epoch FROM now()))::bigint AS s")[0]["s"]
    seconds = [int(r["key"].split("@")[1]) for r in query(db_url, "SELECT key FROM control_plane.rate_limits")]
    assert seconds and all(abs(s - now) <= 5 for s in seconds)


def test_a_bucket_limiter_counts_in_the_databases_bucket_whatever_the_hosts_clocks(db_url: str) -> None:
    hour = 3_600_000
    bucket_now = "SELECT (floor(extract(epoch FROM now()) * 1000 / %s) * %s)::bigint AS b"
    for attempt in range(3):  # again in the (unlikely) case the database's hour turned meanwhile
        # Given a bucket limiter of 3 an hour, used from two hosts whose clocks are an hour apart
        # (each names a bucket of its own by its clock)
        limiter = BucketRateLimiter(backend(), f"bucket-{attempt}", limit=3, bucket=hour)
        before = query(db_url, bucket_now, (hour, hour))[0]["b"]
        results: list[bool] = []
        for host_clock in (datetime(2026, 3, 2, 10, 0, 0), datetime(2026, 3, 2, 11, 0, 0)):
            with freeze_time(host_clock):
                # When 3 attempts are made from each
                for _ in range(3):
                    with limiter.acquire(raise_on_failure=False) as acquired:
                        results.append(bool(acquired))
        if query(db_url, bucket_now, (hour, hour))[0]["b"] == before:
            break
    # Then 3 pass in all, and their bucket is the database's hour
    assert results == [True, True, True, False, False, False]
    keys = [r["key"] for r in query(db_url, "SELECT key FROM control_plane.rate_limits WHERE key LIKE %s",
                                    (f"bucket-{attempt}@%",))]  # fmt: skip
    assert keys == [f"bucket-{attempt}@{before}"]


def test_a_concurrent_limiter_whose_key_looks_like_a_buckets_keeps_its_own_key(db_url: str) -> None:
    # Given two mutexes named by a minute's tick (as a bucket's key looks), a minute apart
    tick = 1_772_445_600_000  # 2026-03-02 10:00 UTC, a multiple of 60,000
    first = ConcurrentRateLimiter(backend(), f"report@{tick}", limit=1, ttl=60_000)
    second = ConcurrentRateLimiter(backend(), f"report@{tick + 60_000}", limit=1, ttl=60_000)
    # When each is taken, and the first given back and taken again
    with first.acquire(raise_on_failure=False) as a, second.acquire(raise_on_failure=False) as b:
        assert (a, b) == (True, True)
    with first.acquire(raise_on_failure=False) as again:
        # Then each counted under its own key, and a slot given back is free again
        assert again
        keys = {r["key"]: r["value"] for r in query(db_url, "SELECT key, value FROM control_plane.rate_limits")}
        assert keys == {f"report@{tick}": 1, f"report@{tick + 60_000}": 0}


def test_a_window_limiter_makes_room_as_its_window_slides(db_url: str) -> None:
    # Given a limiter of 2 per second, full
    limiter = WindowRateLimiter(backend(), "per-second", limit=2, window=1)

    def attempt() -> bool:
        with limiter.acquire(raise_on_failure=False) as acquired:
            return bool(acquired)

    wait_for(lambda: attempt() and attempt() and not attempt(), what="2 passing and a third refused in one second")
    # When the second passes, there is room again
    wait_for(attempt, what="room in the next second")


def test_a_barrier_releases_a_blocked_party_when_the_last_arrives(db_url: str) -> None:
    # Given a barrier for 2 parties, and a first party blocked on it in a thread
    barrier = Barrier(backend(), "barrier-1", ttl=60_000)
    assert barrier.create(parties=2)
    assert not barrier.create(parties=2)  # created once
    released: list[bool] = []
    first = threading.Thread(target=lambda: released.append(barrier.wait(block=True, timeout=30_000)))
    first.start()
    wait_for(
        lambda: query(
            db_url,
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'controlplane-barrier' "
            "AND state = 'idle' AND query LIKE '%value > 0%'",
        ),
        what="the first party to listen",
    )
    # When the second party arrives
    assert barrier.wait(block=False)
    first.join()
    # Then the first party is released (by NOTIFY), and a late waiter passes at once
    assert released == [True]
    assert barrier.wait(block=True, timeout=1000)


def test_a_blocked_wait_times_out_without_an_event(db_url: str) -> None:
    # Given a barrier for 3 parties of which one arrives
    barrier = Barrier(backend(), "barrier-2", ttl=60_000)
    barrier.create(parties=3)
    # When it waits with a timeout
    # Then it returns False: not everyone came
    assert barrier.wait(block=True, timeout=1000) is False


def test_a_concurrency_limit_of_one_holds_across_two_worker_processes(db_url: str, tmp_path: Path) -> None:
    # Given 6 jobs that each hold a ConcurrentRateLimiter(limit=1) for a while
    ids = [actors.limited.send(0.2).message_id for _ in range(6)]
    # When 2 worker processes with 2 threads each run them
    with running_worker(db_url, tmp_path, processes=2, threads=2):
        wait_for(lambda: jobs_in(db_url, ids, "completed"), timeout=90, what="6 limited jobs to complete")
    # Then every job ran once
    started, finished = effects(db_url, "started"), effects(db_url, "finished")
    assert sorted(str(r["message_id"]) for r in started) == sorted(ids)
    assert sorted(str(r["message_id"]) for r in finished) == sorted(ids)
    # And no two runs overlapped: each started after the previous one finished (one database clock)
    held = runs(db_url)
    for (_, previous_end), (next_start, _) in pairwise(held):
        assert next_start >= previous_end, held
    # And the mutex is free again
    assert query(db_url, "SELECT value FROM control_plane.rate_limits WHERE key = 'tests.limited'")[0]["value"] == 0


def test_a_group_completion_callback_fires_once(db_url: str, tmp_path: Path) -> None:
    # Given a group of 4 jobs with a completion callback (its barrier in control_plane.rate_limits),
    # the last of which waits on a gate
    members = group([*(actors.noop.message(i) for i in range(3)), actors.wait_for_gate.message("last member")])
    members.add_completion_callback(actors.group_done.message("all four"))
    members.run()
    member_ids = [m.message_id for m in members.children]
    callbacks_sql = "SELECT id::text, status FROM control_plane.jobs WHERE type = 'tests.group_done'"
    # When workers in 2 processes run the group, the first 3 members complete and the 4th runs
    with running_worker(db_url, tmp_path, processes=2, threads=4):
        wait_for(lambda: jobs_in(db_url, member_ids[:3], "completed"), what="the first 3 members to complete")
        wait_for(lambda: effects(db_url, "started"), what="the last member to start")
        # (a completed job's hooks committed first: a callback they sent is there now)
        before_the_last = query(db_url, callbacks_sql)
        # When the last member finishes
        query(db_url, "INSERT INTO test_support.gates (name) VALUES ('last member')")
        wait_for(lambda: effects(db_url, "group_done"), what="the completion callback")
        wait_for(lambda: jobs_in(db_url, member_ids, "completed"), what="the members to complete")
        callbacks = query(db_url, callbacks_sql)
        wait_for(lambda: jobs_in(db_url, [c["id"] for c in callbacks], "completed"), what="the callback job")
    # Then no callback was sent while a member had not finished
    assert before_the_last == []
    # And the callback ran once, after all 4 members, as one job
    assert len(callbacks) == 1
    done = effects(db_url, "group_done")
    assert [r["value"] for r in done] == ["all four"]
    assert all(r["at"] <= done[0]["at"] for r in effects(db_url, "noop") + effects(db_url, "finished"))


def test_a_window_limiter_of_one_lets_exactly_one_through(db_url: str) -> None:
    # Given a window limiter of 1 per minute (one call per window is the common "at most once a minute")
    limiter = WindowRateLimiter(tasks.rate_limiter_backend, "once-a-minute", limit=1, window=60)

    def attempt() -> bool:
        with limiter.acquire(raise_on_failure=False) as acquired:
            return bool(acquired)

    # When called on a fresh bucket (the insert path, not the update path), then again
    first = attempt()
    second = attempt()
    # Then the first passes and the second is refused; the buckets hold that one call
    assert (first, second) == (True, False)
    assert sum(r["value"] for r in query(db_url, "SELECT value FROM control_plane.rate_limits")) == 1
