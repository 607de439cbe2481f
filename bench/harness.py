"""The benchmark harness: ``python -m bench run [--quick] [--rounds N] [--only floor,ours,...]``.

Every system runs the same phases, interleaved (for each round, for each phase,
each system in turn, the order rotating between rounds), each phase on a fresh
database of its own (``bench_*``, cloned from a template the system set up
once) on the same PostgreSQL, with no-op jobs. Every number is reported as
a median with min-max over the rounds, and as a ratio to ``floor`` measured in
the same round.

Phases and what they measure:

``enqueue``
    jobs/s sending ``--enqueue-n`` jobs one per call, then ``--drain-n`` jobs in
    calls of ``--batch-size`` (systems without a batch call report none).
``drain_1x8``, ``drain_2x8``
    a backlog of ``--drain-n`` jobs is sent first; then 1 (or 2) worker
    processes of 8 threads start; rate = completions / (last start - first
    start), from the jobs' own records, so worker start-up is not counted.
``latency``
    2x8 workers, warmed up and idle; ``--latency-n`` jobs sent one per call at
    ``--latency-rate``/s by a sender whose first call (an untimed job) is behind
    it; latency = the job's start - the sender's clock just before its send
    call; p50/p95/p99 in ms.
``growth``
    drain rate (2x8) with the larger of ``--growth-sizes`` divided by the rate
    with the smaller. The smaller backlog drains in a fraction of a second, so
    one stall moves its rate by a third: it is drained ``--growth-repeats``
    times per round (once before the larger, the rest after it) and its rate
    is the median of those.
``memory``
    2x8 workers; RSS of the worker processes that ran jobs after the smaller of
    ``--memory-sizes`` jobs and after the larger, and their ratio (the target's);
    beside it the same processes' USS (private memory: Private_Clean +
    Private_Dirty of /proc/PID/smaps_rollup), which leaves out the pages shared
    with other processes and so shows a process's own growth more plainly.
``provision`` (floor and ours only)
    ``--provision-n`` tenant projects provisioned for real (roles, ``CREATE
    DATABASE``, schema, registrations with loopback stand-in services, API keys,
    the project row), seconds per project = total / n. ``ours`` sends
    ``provision_project`` jobs to ``dramatiq tasks tasks.provision`` workers
    (``--provision-workers``) at once (``--provision-serial``: one after the
    other) and waits until every project's last step is completed in
    ``control_plane.jobs``; ``floor`` runs the same SQL by hand, one
    project after another (``--provision-hand-threads``: that many at once),
    calling the project's own step functions directly
    (``bench/drivers/provision_driver.py``). Tenant databases and roles carry
    the run id and are dropped after the phase.

Jobs record themselves with :func:`bench.record.record` in a file per phase.
Workers are stopped with SIGTERM, then SIGKILL, in ``finally`` blocks; every
database this run created is dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import importlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2.sql import SQL, Composable, Identifier

from bench import procfs, server
from bench.systems import (
    DEFAULT_SYSTEMS,
    QUICK_SYSTEMS,
    ROOT,
    SYSTEMS,
    VERSION_PACKAGES,
    System,
    ensure_venv,
    versions,
)
from tasks.db import loggable_error
from tasks.redaction import redact

RESULTS = ROOT / "bench" / "results"


def in_round_order(names: Any, round_no: int) -> list[Any]:
    """``names`` in the order a measurement aid runs them in round ``round_no``: as given in even
    rounds, reversed in odd ones (A B, B A), so that no variant always runs first."""
    return list(names) if round_no % 2 == 0 else list(reversed(list(names)))


def save_aid_results(kind: str, command: str, args: Any, results: Any, output: Path | None) -> Path:
    """Write a measurement aid's results (``bench/results/<kind>-<UTC time>.json`` unless
    ``output``), with its command and arguments; print and return where."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = output or RESULTS / f"{kind}-{stamp}.json"
    doc = {"command": command, "args": vars(args), "results": results}
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nresults: {out}")
    return out
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
PHASES = ("enqueue", "drain_1x8", "drain_2x8", "latency", "growth", "memory", "provision")
#: The systems the provision phase runs for: floor is the hand-run SQL, ours is provision_project.
PROVISION_SYSTEMS = ("floor", "ours")
THREADS = 8

#: metric -> (unit, True when higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "enqueue_single_per_s": ("jobs/s", True),
    "enqueue_batch_per_s": ("jobs/s", True),
    "drain_1x8_per_s": ("jobs/s", True),
    "drain_2x8_per_s": ("jobs/s", True),
    "latency_p50_ms": ("ms", False),
    "latency_p95_ms": ("ms", False),
    "latency_p99_ms": ("ms", False),
    "growth_small_per_s": ("jobs/s", True),
    "growth_big_per_s": ("jobs/s", True),
    "growth_ratio": ("big/small", True),
    "growth_ratio_whole": ("big/small", True),
    "memory_small_mb": ("MB", False),
    "memory_big_mb": ("MB", False),
    "memory_ratio": ("big/small", False),
    "memory_ratio_tree": ("big/small", False),
    "memory_uss_small_mb": ("MB", False),
    "memory_uss_big_mb": ("MB", False),
    "memory_uss_ratio": ("big/small", False),
    "provision_per_project_s": ("s/project", False),
    "provision_concurrent_per_project_s": ("s/project", False),
    "provision_p50_s": ("s", False),
}

#: Provisioning jobs one of ours' worker processes runs at once (tasks.settings.DEFAULT_QUEUE_CONCURRENCY).
OURS_PROVISIONING_PER_PROCESS = 2

#: The issue's targets for ``ours``: (metric, compared as, operator, bound, description).
TARGETS: tuple[tuple[str, str, str, float, str], ...] = (
    ("drain_2x8_per_s", "ratio", ">=", 3.0, "drain 2x8 at least 3x floor, ahead of every peer"),
    ("enqueue_single_per_s", "ratio", ">=", 1.0, "enqueue one per call at least 1x floor"),
    ("enqueue_batch_per_s", "ratio", ">=", 0.5, "enqueue batch at least 0.5x floor's batch insert"),
    ("latency_p99_ms", "ratio", "<=", 1.25, "pickup p99 at most 1.25x floor, ahead of every Postgres peer"),
    ("growth_ratio", "value", ">=", 0.9, "growth (big backlog rate / small) at least 0.9"),
    ("memory_ratio", "value", "<=", 1.10, "worker RSS after the big run within 10% of after the small"),
    ("provision_per_project_s", "ratio", "<=", 1.25, "provision_project at most 1.25x the hand-run SQL per project"),
)


class BenchError(Exception):
    """A phase of one system could not be measured (the run goes on without it)."""


@dataclass
class Config:
    """What one run measures, and how big."""

    rounds: int
    systems: list[str]
    phases: list[str]
    enqueue_n: int
    drain_n: int
    batch_size: int
    latency_n: int
    latency_rate: float
    growth_sizes: tuple[int, int]
    memory_sizes: tuple[int, int]
    big_phases_for: list[str]
    admin_url: str
    redis_url: str
    quick: bool
    stall_timeout: float
    keep_logs: bool
    ours_root: Path = ROOT
    provision_n: int = 20
    growth_repeats: int = 3
    provision_workers: tuple[int, int] = (2, THREADS)
    provision_serial: bool = False
    provision_hand_threads: int = 1
    uncapped: bool = False
    stop_grace: float = 20.0
    output: Path | None = None
    notes: list[str] = field(default_factory=list)
    #: The caller's PG* and dramatiq_* variables that reach the systems (see client_environment).
    environment: dict[str, str] = field(default_factory=dict)


# -- processes ---------------------------------------------------------------


class WorkerGroup:
    """Worker processes of one system, each command in its own process group."""

    def __init__(self, commands: list[list[str]], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.log = log
        self._out = log.open("ab")
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for command in commands:
                self.procs.append(
                    subprocess.Popen(
                        command, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        except BaseException:
            self.stop()
            raise

    def check_alive(self) -> None:
        """Raise if a worker command exited on its own."""
        for proc in self.procs:
            if proc.poll() is not None:
                tail = self.log.read_text(errors="replace")[-1500:]
                raise BenchError(f"a worker exited with {proc.returncode}: {tail}")

    def pids(self) -> list[int]:
        """Every process of the group (the commands and their descendants)."""
        return procfs.tree(*(p.pid for p in self.procs if p.poll() is None))

    def memory_kb(self) -> tuple[dict[int, int], dict[int, int | None]]:
        """Resident and private (USS, None where unreadable) memory of each worker process now, in kB."""
        pids = self.pids()
        return {pid: procfs.rss_kb(pid) for pid in pids}, {pid: procfs.uss_kb(pid) for pid in pids}

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM every process group, wait up to ``grace`` s, then SIGKILL what is left."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            # Kill the group even if its leader is gone: forked workers may outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait()
        self._out.close()


class Records:
    """The record file of one phase: ``sent started pid`` per job that ran."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._count = 0

    def count(self) -> int:
        """Lines written so far (read incrementally)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return 0
        complete = chunk.rfind(b"\n") + 1
        self._count += chunk.count(b"\n", 0, complete)
        self._offset += complete
        return self._count

    def rows(self) -> list[tuple[float, float, int]]:
        """Every complete line, parsed."""
        rows = []
        with self.path.open("rb") as f:
            for line in f:
                if line.endswith(b"\n"):
                    sent, started, pid = line.split()
                    rows.append((float(sent), float(started), int(pid)))
        return rows

    def wait_for(self, target: int, group: WorkerGroup, stall_timeout: float) -> None:
        """Wait until ``target`` jobs ran; raise if the workers die or stall."""
        last, last_change = self.count(), time.monotonic()
        while True:
            now_count = self.count()
            if now_count >= target:
                return
            now = time.monotonic()
            if now_count != last:
                last, last_change = now_count, now
            elif now - last_change > stall_timeout:
                raise BenchError(f"stalled: {now_count}/{target} jobs ran, none in the last {stall_timeout:.0f} s")
            group.check_alive()
            time.sleep(0.02)


#: One job's record: (sent, started, pid).
Row = tuple[float, float, int]


def drain_rate(rows: list[Row]) -> float:
    """Jobs per second between the first and the last job start."""
    starts = [r[1] for r in rows]
    span = max(starts) - min(starts)
    if len(starts) < 2 or span <= 0:
        raise BenchError("too few jobs to measure a rate")
    return (len(starts) - 1) / span


def steady_rate(rows: list[Row]) -> float:
    """Jobs per second between the 10th and the 90th percentile job start: a drain's pace once
    under way, without its ramp-up (the first claims, a second process starting a few ms
    later) and its tail. A 2,000-job drain lasts 0.1-0.5 s, in which the ramp-up weighs; a
    200,000-job one does not notice it (growth compares the two)."""
    starts = sorted(r[1] for r in rows)
    first, last = len(starts) // 10, len(starts) * 9 // 10 - 1
    if last <= first or starts[last] <= starts[first]:
        raise BenchError("too few jobs to measure a rate")
    return (last - first) / (starts[last] - starts[first])


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]


# -- the run -------------------------------------------------------------------


class Run:
    """One benchmark run: templates, rounds, results file."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.run_id = uuid.uuid4().hex[:8]
        self.started = dt.datetime.now(dt.UTC)
        stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        self.output = config.output or RESULTS / f"{stamp}.json"
        self.scratch = RESULTS / f"{stamp}-{self.run_id}.tmp"
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.templates: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.systems: list[System] = []
        self.rounds: list[dict[str, Any]] = []
        self.created_dbs: set[str] = set()
        # HEAD may move while a long run goes on: record it at the start.
        self.git = _git_state(ROOT)
        self.ours_source = source_digest(config.ours_root)

    # -- databases -------------------------------------------------------------

    def url_for(self, database: str) -> str:
        from tasks.db import with_database

        return with_database(self.config.admin_url, database)

    def admin(self, sql: str | Composable, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
        conn = psycopg2.connect(self.config.admin_url, application_name="bench-harness")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return list(cur.fetchall()) if cur.description else []
        finally:
            conn.close()

    def settle(self) -> None:
        """Write out the dirty pages the previous system left (CHECKPOINT), so that no system
        pays for another's writes: a checkpoint that falls in a phase slows whoever runs then.
        A role that may not checkpoint skips this, and the run goes on."""
        try:
            self.admin("CHECKPOINT")
        except psycopg2.Error:
            pass

    def create_db(self, name: str, template: str | None = None) -> str:
        self.created_dbs.add(name)
        self.admin(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        return self.url_for(name)

    def drop_db(self, name: str) -> None:
        try:
            self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            self.created_dbs.discard(name)
        except psycopg2.Error as exc:
            print(f"  warning: could not drop {name}: {exc}".rstrip(), file=sys.stderr)

    @contextlib.contextmanager
    def target(self, system: System, label: str) -> Iterator[str]:
        """A fresh database (or flushed Redis database) for one phase of one system."""
        if system.uses_redis:
            self.driver(system, "setup", self.config.redis_url)
            try:
                yield self.config.redis_url
            finally:
                with contextlib.suppress(BenchError):
                    self.driver(system, "setup", self.config.redis_url)
            return
        name = f"bench_{system.name}_{label}_{self.run_id}"[:63]
        url = self.create_db(name, self.templates[system.name])
        try:
            yield url
        finally:
            self.drop_db(name)

    # -- subprocesses ----------------------------------------------------------

    def cwd(self, system: System) -> Path:
        """Where the system's processes start: ``--ours-root`` for ours (Dramatiq puts the cwd first on sys.path)."""
        return self.config.ours_root if system.name == "ours" else ROOT

    def env(self, system: System, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = passed_environ()
        # ``tasks``, ``models`` and ``migrations`` from --ours-root; ``bench`` from this checkout.
        roots = [self.cwd(system), ROOT]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(str(r) for r in roots))
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra or {})
        return env

    def driver(
        self,
        system: System,
        command: str,
        url: str,
        *args: str,
        timeout: float = 900,
        module: str | None = None,
        extra_env: dict[str, str] | None = None,
        label: str | None = None,
    ) -> dict[str, Any]:
        """Run ``system``'s driver (or ``module``); its last output line is a JSON object (or nothing)."""
        cmd = [str(system.python), "-m", module or system.driver, command, "--url", url, *args]
        label = label or system.name
        try:
            done = subprocess.run(
                cmd,
                cwd=self.cwd(system),
                env=self.env(system, {**system.worker_env(url), **(extra_env or {})}),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{label} {command} timed out after {timeout:.0f} s") from exc
        if done.returncode != 0:
            raise BenchError(f"{label} {command} exited {done.returncode}: {done.stderr.strip()[-1500:]}")
        lines = done.stdout.strip().splitlines()
        if not lines:
            return {}
        result: dict[str, Any] = json.loads(lines[-1])
        return result

    @contextlib.contextmanager
    def workers(self, system: System, url: str, processes: int, records: Records) -> Iterator[WorkerGroup]:
        env = self.env(system, {**system.worker_env(url), "BENCH_RECORD_FILE": str(records.path)})
        log = records.path.with_suffix(".log")
        group = WorkerGroup(system.worker_commands(url, processes, THREADS), env, log, self.cwd(system))
        try:
            yield group
        finally:
            group.stop(self.config.stop_grace)

    def records(self, system: System, label: str, round_no: int) -> Records:
        return Records(self.scratch / f"r{round_no}-{system.name}-{label}.rec")

    def fill(self, system: System, url: str, n: int) -> dict[str, Any]:
        """Send ``n`` backlog jobs the fastest way the system offers."""
        batch = self.config.batch_size if system.batch_api else 1
        return self.driver(system, "enqueue", url, "--n", str(n), "--batch", str(batch))

    def cap(self, system: System) -> tuple[int | None, str]:
        """The largest backlog ``system`` gets in this run, and why (None: no cap)."""
        if system.max_backlog is not None:
            return system.max_backlog, system.cap_reason
        if system.time_cap is not None and not self.config.uncapped:
            return system.time_cap, (
                f"backlogs capped at {system.time_cap:,} to keep the run near 20 minutes (lift with --uncapped)"
            )
        return None, ""

    def capped(self, system: System, n: int) -> int:
        limit, _ = self.cap(system)
        return n if limit is None else min(n, limit)

    # -- phases ------------------------------------------------------------------

    def phase_enqueue(self, system: System, round_no: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self.target(system, "enq") as url:
            n = self.config.enqueue_n
            res = self.driver(system, "enqueue", url, "--n", str(n), "--batch", "1")
            out["enqueue_single_per_s"] = res["n"] / res["seconds"]
            if system.batch_api:
                n = self.capped(system, self.config.drain_n)
                res = self.driver(system, "enqueue", url, "--n", str(n), "--batch", str(self.config.batch_size))
                out["enqueue_batch_per_s"] = res["n"] / res["seconds"]
        return out

    def _drain(self, system: System, round_no: int, label: str, processes: int, n: int) -> list[Row]:
        """The records of a drain of an ``n``-job backlog by ``processes`` worker processes."""
        records = self.records(system, label, round_no)
        with self.target(system, label) as url:
            self.fill(system, url, n)
            with self.workers(system, url, processes, records) as group:
                records.wait_for(n, group, self.config.stall_timeout)
        return records.rows()

    def phase_drain_1x8(self, system: System, round_no: int) -> dict[str, Any]:
        n = self.capped(system, self.config.drain_n)
        return {"drain_1x8_per_s": drain_rate(self._drain(system, round_no, "d1", 1, n)), "drain_n": n}

    def phase_drain_2x8(self, system: System, round_no: int) -> dict[str, Any]:
        n = self.capped(system, self.config.drain_n)
        return {"drain_2x8_per_s": drain_rate(self._drain(system, round_no, "d2", 2, n)), "drain_n": n}

    def phase_latency(self, system: System, round_no: int) -> dict[str, Any]:
        records = self.records(system, "lat", round_no)
        n = self.config.latency_n
        with self.target(system, "lat") as url, self.workers(system, url, 2, records) as group:
            # Warm up until both worker processes have run a job, then let them go idle.
            sent = 0
            for _ in range(6):
                warm = 4 * THREADS * 2
                self.driver(system, "enqueue", url, "--n", str(warm), "--batch", "1")
                sent += warm
                records.wait_for(sent, group, self.config.stall_timeout)
                if len({r[2] for r in records.rows()}) >= 2:
                    break
            time.sleep(1.0)
            res = self.driver(system, "latency", url, "--n", str(n), "--rate", str(self.config.latency_rate))
            records.wait_for(sent + res.get("warm_up", 0) + n, group, self.config.stall_timeout)
            rows = [r for r in records.rows() if r[0] > 0]
        if len(rows) != n or len({r[0] for r in rows}) != n:  # each timed job carries its own send time
            distinct = len({r[0] for r in rows})
            raise BenchError(f"{distinct} of the {n} timed jobs ran, in {len(rows)} runs: each must run once")
        latencies = [(started - sent_at) * 1000 for sent_at, started, _ in rows]
        return {
            "latency_p50_ms": percentile(latencies, 50),
            "latency_p95_ms": percentile(latencies, 95),
            "latency_p99_ms": percentile(latencies, 99),
            "latency_max_ms": max(latencies),
            "latency_n": len(latencies),
        }

    def phase_growth(self, system: System, round_no: int) -> dict[str, Any]:
        small, big = self.config.growth_sizes
        drains = [self._drain(system, round_no, "gs1", 2, small)]
        big_rows = self._drain(system, round_no, "gb", 2, big)
        drains += [self._drain(system, round_no, f"gs{i}", 2, small) for i in range(2, self.config.growth_repeats + 1)]
        # The ratio of the steady rates (see steady_rate); the whole drains' ratio, as runs before
        # 2026-12-05 reported it, is kept beside it.
        samples = [steady_rate(rows) for rows in drains]
        rate_small, rate_big = statistics.median(samples), steady_rate(big_rows)
        whole_small, whole_big = statistics.median(drain_rate(rows) for rows in drains), drain_rate(big_rows)
        return {
            "growth_small_per_s": rate_small,
            "growth_big_per_s": rate_big,
            "growth_ratio": rate_big / rate_small,
            "growth_small_samples_per_s": samples,
            "growth_ratio_whole": whole_big / whole_small,
        }

    def phase_memory(self, system: System, round_no: int) -> dict[str, Any]:
        small, big = self.config.memory_sizes
        records = self.records(system, "mem", round_no)
        with self.target(system, "mem") as url, self.workers(system, url, 2, records) as group:
            self.fill(system, url, small)
            records.wait_for(small, group, self.config.stall_timeout)
            time.sleep(0.5)
            at_small, uss_at_small = group.memory_kb()
            self.fill(system, url, big - small)
            records.wait_for(big, group, self.config.stall_timeout)
            time.sleep(0.5)
            at_big, uss_at_big = group.memory_kb()
        # The processes that ran jobs, the same ones at both points: a supervisor (Dramatiq's main
        # process) that runs none would add a constant to both and pull the ratio towards 1. The
        # whole tree's ratio is kept too.
        ran = {pid for _, _, pid in records.rows()}
        rss_small, rss_big = (sum(kb for pid, kb in at.items() if pid in ran) / 1024 for at in (at_small, at_big))
        tree_small, tree_big = (sum(at.values()) / 1024 for at in (at_small, at_big))
        out: dict[str, Any] = {
            "memory_small_mb": rss_small,
            "memory_big_mb": rss_big,
            # The target (TARGETS' memory_ratio) stays judged on this RSS ratio; USS is beside it.
            "memory_ratio": rss_big / rss_small,
            "memory_ratio_tree": tree_big / tree_small,
        }
        # USS of the same processes, when every one of them could be read at both points.
        uss = [[kb for pid, kb in at.items() if pid in ran] for at in (uss_at_small, uss_at_big)]
        if all(kbs and None not in kbs for kbs in uss):
            uss_small, uss_big = (sum(kb or 0 for kb in kbs) / 1024 for kbs in uss)
            out.update(memory_uss_small_mb=uss_small, memory_uss_big_mb=uss_big, memory_uss_ratio=uss_big / uss_small)
        else:
            out["memory_uss"] = "not measured: /proc/PID/smaps_rollup (and smaps) could not be read"
        return out

    # -- provision: provision_project end to end against the same SQL by hand ------------------

    def provision_prefix(self, round_no: int | None = None, system: System | None = None) -> str:
        """Project ids of this run (and round and system) start with this; tenant names with ``p_`` + it."""
        prefix = f"bp{self.run_id}"
        if round_no is not None and system is not None:
            prefix += f"_r{round_no}_{system.name}"
        return prefix

    def drop_tenants(self, prefix: str) -> None:
        """Drop the tenant databases, then the roles, whose names start with ``p_<prefix>``."""
        pattern = "p\\_" + prefix.replace("_", "\\_") + "%"
        try:
            databases = self.admin("SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,))
            roles = self.admin("SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (pattern,))
        except psycopg2.Error as exc:
            print(f"  warning: could not list tenants {prefix}: {exc}".rstrip(), file=sys.stderr)
            return
        for (name,) in databases:
            with contextlib.suppress(psycopg2.Error):
                self.admin(SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(Identifier(name)))
        # The app roles first: nothing depends on them once the databases are gone.
        for (name,) in sorted(roles, key=lambda r: not str(r[0]).endswith("_app")):
            try:
                self.admin(SQL("DROP ROLE IF EXISTS {}").format(Identifier(name)))
            except psycopg2.Error as exc:
                print(f"  warning: could not drop role {name}: {exc}".rstrip(), file=sys.stderr)

    @contextlib.contextmanager
    def standins(self) -> Iterator[dict[str, str]]:
        """The auth, realtime and storage stand-in admin APIs on loopback; yields their settings."""
        from tasks.provision.standin import SERVICE_NAMES, StandinService

        tokens = {name: f"bench-{name}-{uuid.uuid4().hex}" for name in SERVICE_NAMES}
        services = [StandinService(name, token) for name, token in tokens.items()]
        try:
            env = {}
            for service in services:
                service.start()
                env[f"{service.name.upper()}_SERVICE_URL"] = service.url
                env[f"{service.name.upper()}_SERVICE_TOKEN"] = tokens[service.name]
            yield env
        finally:
            for service in services:
                service.stop()

    def provision_template(self) -> str:
        """A migrated control-plane database to clone (ours' template, or one made for this phase)."""
        if "ours" in self.templates:
            return self.templates["ours"]
        name = f"bench_tmpl_prov_{self.run_id}"
        if name not in self.created_dbs:
            url = self.create_db(name)
            try:
                self.driver(SYSTEMS["ours"], "setup", url, timeout=300)
            except BenchError:
                self.drop_db(name)
                raise
        return name

    def wait_heartbeats(self, url: str, processes: int, group: WorkerGroup) -> None:
        """Wait until ``processes`` worker processes heartbeat in ``control_plane.worker_heartbeats``."""
        deadline = time.monotonic() + max(self.config.stall_timeout, 30.0)
        conn = psycopg2.connect(url, application_name="bench-harness")
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while True:
                    cur.execute("SELECT count(*) FROM control_plane.worker_heartbeats")
                    row = cur.fetchone()
                    if row is not None and row[0] >= processes:
                        return
                    group.check_alive()
                    if time.monotonic() > deadline:
                        raise BenchError(f"the provisioning workers did not heartbeat: {group.log}")
                    time.sleep(0.05)
        finally:
            conn.close()

    def ours_provisioning_concurrency(self) -> int:
        """How many projects ours' provisioning workers run at once (``--provision-workers``, and the
        per-process limit of the provisioning queue)."""
        processes, threads = self.config.provision_workers
        return processes * min(threads, OURS_PROVISIONING_PER_PROCESS)

    def provision_worker_command(self) -> list[str]:
        """ours' provisioning workers: ``dramatiq tasks tasks.provision`` with ``--provision-workers``."""
        processes, threads = self.config.provision_workers
        return [
            str(SYSTEMS["ours"].python), "-m", "dramatiq", "tasks", "tasks.provision",
            "--processes", str(processes), "--threads", str(threads),
        ]  # fmt: skip

    def phase_provision(self, system: System, round_no: int) -> dict[str, Any]:
        n = self.config.provision_n
        prefix = self.provision_prefix(round_no, system)
        ours = SYSTEMS["ours"]
        name = f"bench_{system.name}_prov_{self.run_id}"
        try:
            with self.standins() as services:
                url = self.create_db(name, self.provision_template())
                env = {
                    **services,
                    "DATABASE_URL": url,
                    "PROVISION_DATABASE_URL": self.config.admin_url,
                    "API_KEY_PEPPER": f"bench-pepper-{self.run_id}-{uuid.uuid4().hex}",
                    "CONTROLPLANE_HOME": str(self.scratch / "controlplane-home"),
                }
                args = ["--prefix", prefix, "--n", str(n), "--stall-timeout", str(self.config.stall_timeout)]
                module = "bench.drivers.provision_driver"
                if system.name == "floor":
                    # The same SQL by hand, run with ours' source tree (--ours-root), so it is the same SQL.
                    hand_args = [*args, "--threads", str(self.config.provision_hand_threads)]
                    res = self.driver(
                        ours, "hand", url, *hand_args, module=module, extra_env=env, label="floor provision"
                    )
                    concurrent = self.ours_provisioning_concurrency()
                    if concurrent != self.config.provision_hand_threads and not self.config.provision_serial:
                        # And as many at once as ours runs (like for like), into tenants of their own.
                        again = [a if a != prefix else f"{prefix}c" for a in args]
                        res["concurrent"] = self.driver(
                            ours, "hand", url, *again, "--threads", str(concurrent), module=module,
                            extra_env=env, label="floor provision, concurrent",
                        )  # fmt: skip
                else:
                    processes, _ = self.config.provision_workers
                    log = self.scratch / f"r{round_no}-{system.name}-prov.log"
                    group = WorkerGroup([self.provision_worker_command()], self.env(ours, env), log, self.cwd(ours))
                    try:
                        self.wait_heartbeats(url, processes, group)
                        if self.config.provision_serial:
                            args.append("--serial")
                        res = self.driver(
                            ours, "send", url, *args, module=module, extra_env=env, label="ours provision"
                        )
                        group.check_alive()
                    finally:
                        group.stop(self.config.stop_grace)
        finally:
            self.drop_db(name)
            self.drop_tenants(prefix)
        if res.get("n") != n or len(res.get("per_project_s", [])) != n:
            raise BenchError(f"provisioned {len(res.get('per_project_s', []))} of {n} projects")
        out: dict[str, Any] = {
            "provision_per_project_s": res["seconds"] / n,
            # floor: the SQL by hand as many projects at once as ours runs; ours: its own time again,
            # so that this metric's ratio compares the two at the same concurrency
            "provision_concurrent_per_project_s": res.get("concurrent", res)["seconds"] / n,
            "provision_p50_s": statistics.median(res["per_project_s"]),
            "provision_n": n,
            "provision_steps": res.get("steps", {}),
            # CPU while the clock ran, per project and by role: what each system's way costs the cores.
            "provision_cpu_ms_per_project": {role: round(sec * 1000 / n, 1) for role, sec in res["cpu_s"].items()},
        }
        if system.name == "ours":
            out["provision_workers"] = "{}x{}".format(*self.config.provision_workers)
            out["provision_serial"] = self.config.provision_serial
        else:
            out["provision_hand_threads"] = res.get("threads")
            if "concurrent" in res:
                out["provision_concurrent_threads"] = res["concurrent"].get("threads")
        return out

    def skip_reason(self, system: System, phase: str) -> str | None:
        """Why ``phase`` is not run for ``system`` in this configuration, if it is not."""
        if phase == "provision" and system.name not in PROVISION_SYSTEMS:
            return "provision compares ours with the same SQL by hand (floor) only"
        if phase in ("growth", "memory"):
            if system.name not in self.config.big_phases_for:
                return "not in --big-phases-for"
            big = max(self.config.growth_sizes if phase == "growth" else self.config.memory_sizes)
            limit, reason = self.cap(system)
            if limit is not None and big > limit:
                return reason
        return None

    # -- driving the rounds ------------------------------------------------------------

    def prepare(self) -> None:
        """Build peer virtualenvs and one template database per system; skip what fails."""
        if "provision" in self.config.phases:
            # The stand-in services run in this process: import them now, so that a run is not
            # broken (or made of two versions) by edits to the work tree in the minutes before
            # its provision phase.
            importlib.import_module("tasks.provision.standin")
        for name in self.config.systems:
            system = SYSTEMS[name]
            if system.venv is not None:
                print(f"preparing {name}: virtualenv bench/.venvs/{system.venv} ...", flush=True)
                reason = ensure_venv(system.venv, self.scratch / f"venv-{system.venv}.log")
                if reason is not None:
                    self.skipped[name] = f"virtualenv could not be built: {reason}"
                    print(f"  skipped: {self.skipped[name]}", flush=True)
                    continue
            if not system.uses_redis:
                template = f"bench_tmpl_{name}_{self.run_id}"
                try:
                    url = self.create_db(template)
                    self.driver(system, "setup", url, timeout=300)
                except (BenchError, psycopg2.Error) as exc:
                    self.skipped[name] = f"setup failed: {exc}"
                    print(f"  skipped {name}: {self.skipped[name]}", flush=True)
                    self.drop_db(template)
                    continue
                self.templates[name] = template
            else:
                try:
                    self.driver(system, "setup", self.config.redis_url, timeout=60)
                except BenchError as exc:
                    self.skipped[name] = f"Redis not usable: {exc}"
                    print(f"  skipped {name}: {self.skipped[name]}", flush=True)
                    continue
            self.systems.append(system)

    def run_rounds(self) -> None:
        for round_no in range(1, self.config.rounds + 1):
            shift = (round_no - 1) % max(len(self.systems), 1)
            order = self.systems[shift:] + self.systems[:shift]
            results: dict[str, dict[str, Any]] = {s.name: {} for s in order}
            errors: dict[str, dict[str, str]] = {}
            notes: dict[str, dict[str, str]] = {}
            print(f"round {round_no}/{self.config.rounds}: {' '.join(s.name for s in order)}", flush=True)
            for phase in self.config.phases:
                for system in order:
                    reason = self.skip_reason(system, phase)
                    if reason is not None:
                        notes.setdefault(system.name, {})[phase] = f"not run: {reason}"
                        continue
                    self.settle()
                    began = time.monotonic()
                    try:
                        metrics = getattr(self, f"phase_{phase}")(system, round_no)
                    except BenchError as exc:
                        errors.setdefault(system.name, {})[phase] = str(exc)
                        print(f"  {phase:<10} {system.name:<14} FAILED: {str(exc)[:300]}", flush=True)
                        continue
                    results[system.name].update(metrics)
                    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if k in METRICS)
                    print(f"  {phase:<10} {system.name:<14} {shown}  ({time.monotonic() - began:.1f} s)", flush=True)
            self.rounds.append(
                {
                    "round": round_no,
                    "order": [s.name for s in order],
                    "results": results,
                    "errors": errors,
                    "notes": notes,
                }
            )
            self.write()

    def cleanup(self) -> None:
        if "provision" in self.config.phases:
            self.drop_tenants(self.provision_prefix())
        for name in list(self.created_dbs):
            self.drop_db(name)
        if not self.config.keep_logs:
            shutil.rmtree(self.scratch, ignore_errors=True)

    # -- results -------------------------------------------------------------------------

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Per system and metric: median/min/max of the values and of the ratios to floor."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for system in self.systems:
            for metric in METRICS:
                values, ratios = [], []
                for rnd in self.rounds:
                    value = rnd["results"].get(system.name, {}).get(metric)
                    if value is None:
                        continue
                    values.append(value)
                    floor = rnd["results"].get("floor", {}).get(metric)
                    if floor:
                        ratios.append(value / floor)
                if not values:
                    continue
                entry: dict[str, Any] = {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "n": len(values),
                    "unit": METRICS[metric][0],
                }
                if ratios:
                    entry.update(
                        ratio_median=statistics.median(ratios),
                        ratio_min=min(ratios),
                        ratio_max=max(ratios),
                        ratio_n=len(ratios),  # rounds with a floor to divide by
                    )
                out.setdefault(system.name, {})[metric] = entry
        return out

    def targets(self, summary: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
        """The issue's targets for ``ours``, met or missed, on the medians."""
        ours = summary.get("ours", {})
        verdicts = []
        for metric, kind, op, bound, text in TARGETS:
            entry = ours.get(metric)
            key = "ratio_median" if kind == "ratio" else "median"
            value = entry.get(key) if entry else None
            verdict: dict[str, Any] = {"target": text, "metric": metric, "compared": kind, "bound": f"{op} {bound}"}
            if value is None:
                verdict.update(value=None, met=None, detail="not measured")
                verdicts.append(verdict)
                continue
            assert entry is not None
            met: bool | None = value >= bound if op == ">=" else value <= bound
            detail = []
            if metric in ("drain_2x8_per_s", "latency_p99_ms"):
                higher = METRICS[metric][1]
                unmeasured = []
                # A peer that was asked for but skipped (its virtualenv or setup failed) counts as
                # unmeasured: "ahead of every peer" cannot be judged without it.
                for peer in [system.name for system in self.systems] + sorted(self.skipped):
                    if peer == "ours" or SYSTEMS[peer].reference:
                        continue  # the floors are references, not peers
                    if metric == "latency_p99_ms" and not SYSTEMS[peer].postgres:
                        continue
                    if metric not in summary.get(peer, {}):
                        unmeasured.append(peer)  # it ran, but failed this phase in every round
                        continue
                    theirs = summary[peer][metric]["median"]
                    mine = entry["median"]
                    ahead = mine > theirs if higher else mine < theirs
                    if not ahead:
                        met = False
                        detail.append(f"behind {peer} ({_fmt(mine)} vs {_fmt(theirs)})")
                if unmeasured:
                    detail.append(f"not compared with {', '.join(unmeasured)} (not measured)")
                    if met:
                        met = None  # "ahead of every peer" is unproven
            verdict.update(value=value, met=met, detail="; ".join(detail))
            verdicts.append(verdict)
        return verdicts

    def machine(self) -> dict[str, Any]:
        cpu = ""
        with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        mem_kb = 0
        with contextlib.suppress(OSError), open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
        try:
            pg = str(self.admin("SELECT version()")[0][0])
            settings = dict(
                (str(k), str(v))
                for k, v in self.admin(
                    "SELECT name, setting FROM pg_settings WHERE name IN ('max_connections', 'shared_buffers', "
                    "'synchronous_commit', 'fsync', 'max_locks_per_transaction', 'work_mem')"
                )
            )
        except psycopg2.Error:
            pg, settings = "unknown", {}
        return {
            "nproc": os.cpu_count(),
            "cpu_model": cpu,
            "memory_gb": round(mem_kb / 1024 / 1024, 1),
            "loadavg_at_start": os.getloadavg(),
            "kernel": platform.release(),
            "postgres": pg,
            "postgres_settings": settings,
            "python": platform.python_version(),
        }

    def write(self) -> None:
        summary = self.summary()
        machine = dict(getattr(self, "_machine", None) or self.machine())
        machine["loadavg_at_write"] = os.getloadavg()
        doc = {
            "run_id": self.run_id,
            "ours_source": self.ours_source,
            "started_at": self.started.isoformat(),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m", "bench", *sys.argv[1:]]),
            "git": self.git,
            "machine": machine,
            "versions": getattr(self, "_versions", {}),
            "config": {
                k: redact(v) if k == "admin_url" else str(v) if isinstance(v, Path) else v
                for k, v in asdict(self.config).items()
            },
            "systems": [s.name for s in self.systems],
            "skipped": self.skipped,
            "caps": {s.name: self.cap(s)[1] for s in self.systems if self.cap(s)[0] is not None},
            "rounds": self.rounds,
            "summary": summary,
            "targets": self.targets(summary),
        }
        self.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output.with_name(self.output.name + ".partial")
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        tmp.replace(self.output)

    def collect_versions(self) -> None:
        found = {"project": versions(Path(sys.executable), VERSION_PACKAGES["project"])}
        for system in self.systems:
            if system.venv is not None:
                found[system.name] = versions(system.python, VERSION_PACKAGES[system.venv])
        self._versions = found
        self._machine = self.machine()


def _git_state(root: Path) -> dict[str, Any]:
    """HEAD and whether the work tree has changes, at ``root``."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def source_digest(root: Path) -> dict[str, Any]:
    """What ``ours`` ran: a digest of tasks/, models/ and migrations/ under ``root``, and its commit if known.

    The commit is this checkout's HEAD (and whether it had changes) when ``root``
    is this checkout, else the first line of ``root/COMMIT`` if there is one (the
    documented snapshot command writes it).
    """
    digest = hashlib.sha256()
    for folder in ("tasks", "models", "migrations"):
        for path in sorted((root / folder).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    found: dict[str, Any] = {"root": str(root), "sha256": digest.hexdigest()}
    if root == ROOT:
        found.update(_git_state(root))
    elif (root / "COMMIT").is_file():
        found["commit"] = (root / "COMMIT").read_text().split("\n", 1)[0].strip()
    return found


# -- output ------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(doc: dict[str, Any]) -> str:
    """The summary as a Markdown table: one row per metric and system."""
    lines = [
        "| metric | system | median | min-max | x floor (median, min-max) |",
        "|---|---|---:|---:|---:|",
    ]
    for metric, (unit, higher) in METRICS.items():
        for system, entries in doc["summary"].items():
            entry = entries.get(metric)
            if entry is None:
                continue
            ratio = (
                f"{entry['ratio_median']:.2f} ({entry['ratio_min']:.2f}-{entry['ratio_max']:.2f})"
                if "ratio_median" in entry
                else "-"
            )
            arrow = "↑" if higher else "↓"
            lines.append(
                f"| {metric} ({unit}{arrow}) | {system} | {_fmt(entry['median'])} | "
                f"{_fmt(entry['min'])}-{_fmt(entry['max'])} | {ratio} |"
            )
    return "\n".join(lines)


def target_lines(doc: dict[str, Any]) -> str:
    lines = []
    for t in doc["targets"]:
        state = "not measured" if t["met"] is None else ("MET" if t["met"] else "MISSED")
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        extra = f" ({t['detail']})" if t.get("detail") and t["met"] is not None else ""
        lines.append(f"- {t['target']}: {state} ({t['compared']} {value}, wanted {t['bound']}){extra}")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------


def _pair(text: str) -> tuple[int, int]:
    a, b = (int(x) for x in text.split(","))
    if not 0 < a < b:
        raise argparse.ArgumentTypeError("want SMALL,BIG with 0 < SMALL < BIG")
    return a, b


def _shape(text: str) -> tuple[int, int]:
    try:
        processes, threads = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError("want PROCESSESxTHREADS, e.g. 2x8") from None
    if processes < 1 or threads < 1:
        raise argparse.ArgumentTypeError("want at least one process and one thread")
    return processes, threads


def _names(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(allowed)})")
    return names


def parse_config(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one round, small sizes, floor and ours only")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick: 1)")
    parser.add_argument(
        "--only",
        help=f"systems, comma-separated (default: {','.join(DEFAULT_SYSTEMS)}; "
        "floor_tuned, a reference, runs only when named)",
    )
    parser.add_argument("--phases", help=f"phases, comma-separated (default: {','.join(PHASES)})")
    parser.add_argument("--enqueue-n", type=int, help="jobs sent one per call (default 2000; quick 200)")
    parser.add_argument(
        "--drain-n", type=int, help="backlog drained, and jobs sent in batches (default 20000; quick 2000)"
    )
    parser.add_argument("--batch-size", type=int, default=500, help="jobs per batch call (default 500)")
    parser.add_argument("--latency-n", type=int, help="jobs sent for pickup latency (default 200; quick 50)")
    parser.add_argument("--latency-rate", type=float, default=50.0, help="latency jobs per second (default 50)")
    parser.add_argument("--growth-sizes", type=_pair, help="SMALL,BIG backlogs (default 2000,50000; quick 500,2000)")
    parser.add_argument(
        "--growth-repeats",
        type=int,
        help="drains of the smaller growth backlog per round, median taken (default 3; quick 1)",
    )
    parser.add_argument("--memory-sizes", type=_pair, help="SMALL,BIG jobs (default 1000,100000; quick 200,2000)")
    parser.add_argument("--provision-n", type=int, help="projects provisioned per system (default 20; quick 3)")
    parser.add_argument(
        "--provision-workers",
        type=_shape,
        default=(2, THREADS),
        help=f"ours' provisioning workers, PROCESSESxTHREADS (default 2x{THREADS})",
    )
    parser.add_argument(
        "--provision-serial",
        action="store_true",
        help="ours sends one project at a time, each after the last is done (default: all at once)",
    )
    parser.add_argument(
        "--provision-hand-threads",
        type=int,
        default=1,
        help="floor provisions this many projects at once (default 1: in sequence, the issue's reference)",
    )
    parser.add_argument(
        "--big-phases-for",
        help="systems that run growth and memory (default: floor,floor_batch,ours, and floor_tuned when run)",
    )
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help=f"Celery's Redis database, flushed (default {DEFAULT_REDIS_URL})"
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=60.0,
        help="give up a phase when no job ran for this many seconds (default 60)",
    )
    parser.add_argument(
        "--uncapped",
        action="store_true",
        help="lift the time caps on slow peers' backlogs (procrastinate, celery); dramatiq-pg's safety cap stays",
    )
    parser.add_argument(
        "--stop-grace",
        type=float,
        default=20.0,
        help="seconds workers get to stop after SIGTERM before SIGKILL (default 20)",
    )
    parser.add_argument("--output", type=Path, help="results file (default bench/results/<UTC time>.json)")
    parser.add_argument("--keep-logs", action="store_true", help="keep worker logs and record files")
    parser.add_argument(
        "--ours-root",
        type=Path,
        default=ROOT,
        help="the source tree whose tasks/, models/ and "
        "migrations/ ours runs (default: this checkout; e.g. a `git archive HEAD` snapshot)",
    )
    ns = parser.parse_args(argv)
    if ns.growth_repeats is not None and ns.growth_repeats < 1:
        parser.error("--growth-repeats must be at least 1")
    if ns.provision_hand_threads < 1:
        parser.error("--provision-hand-threads must be at least 1")
    quick = bool(ns.quick)
    systems = _names(ns.only, list(SYSTEMS), "system") if ns.only else list(QUICK_SYSTEMS if quick else DEFAULT_SYSTEMS)
    if "floor" not in systems:
        systems.insert(0, "floor")  # every number is a ratio to floor
    return Config(
        rounds=ns.rounds or (1 if quick else 3),
        systems=systems,
        phases=_names(ns.phases, PHASES, "phase") if ns.phases else list(PHASES),
        enqueue_n=ns.enqueue_n or (200 if quick else 2000),
        drain_n=ns.drain_n or (2000 if quick else 20000),
        batch_size=ns.batch_size,
        latency_n=ns.latency_n or (50 if quick else 200),
        latency_rate=ns.latency_rate,
        growth_sizes=ns.growth_sizes or ((500, 2000) if quick else (2000, 50000)),
        memory_sizes=ns.memory_sizes or ((200, 2000) if quick else (1000, 100000)),
        big_phases_for=_names(ns.big_phases_for, list(SYSTEMS), "system")
        if ns.big_phases_for
        else ["floor", "floor_batch", "ours"] + (["floor_tuned"] if "floor_tuned" in systems else []),
        admin_url="",  # run() sets it: bench.server.admin_url() (DATABASE_URL, the local server or the embedded one)
        redis_url=ns.redis_url,
        quick=quick,
        stall_timeout=ns.stall_timeout,
        keep_logs=ns.keep_logs,
        output=ns.output,
        ours_root=ns.ours_root.resolve(),
        provision_n=ns.provision_n or (3 if quick else 20),
        growth_repeats=ns.growth_repeats or (1 if quick else 3),
        provision_workers=ns.provision_workers,
        provision_serial=ns.provision_serial,
        provision_hand_threads=ns.provision_hand_threads,
        stop_grace=ns.stop_grace,
        uncapped=ns.uncapped,
    )


def size_notes(config: Config) -> list[str]:
    """Where this run's sizes depart from the issue's, said in the output and the results file."""
    notes = []
    if config.drain_n != 20000:
        notes.append(f"drain backlogs of {config.drain_n:,} jobs (the issue's: 20,000)")
    if config.growth_sizes != (2000, 200000) and "growth" in config.phases:
        small, big = config.growth_sizes
        notes.append(
            f"growth measured {small:,} vs {big:,} jobs (the issue's: 2,000 vs 200,000; --growth-sizes 2000,200000)"
        )
    if config.memory_sizes != (1000, 100000) and "memory" in config.phases:
        small, big = config.memory_sizes
        notes.append(
            f"memory measured after {small:,} and {big:,} jobs (the issue's: 1,000 and 100,000; "
            "--memory-sizes 1000,100000)"
        )
    if config.provision_n != 20 and "provision" in config.phases:
        notes.append(f"provision measured with {config.provision_n} projects (the issue's: 20; --provision-n 20)")
    ignored = sorted(name for name in os.environ if name.startswith("CONTROLPLANE_"))
    if ignored:
        notes.append(f"not passed to the systems (every system runs at its defaults): {', '.join(ignored)}")
    if config.environment:
        shown = ", ".join(f"{name}={shlex.quote(value)}" for name, value in config.environment.items())
        notes.append(f"passed to every system from the caller's environment: {shown}")
    return notes


def passed_environ() -> dict[str, str]:
    """The caller's environment as every system's processes inherit it, before the harness's own settings.

    Every system at its defaults: no CONTROLPLANE_* setting of the caller's shell reaches ours
    (the harness passes the ones it means to; the run's notes name those it left out).
    """
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("CONTROLPLANE_")
    }


#: A variable whose name says its value is a secret (PGPASSWORD): recorded as REDACTED.
_SECRET_NAME = re.compile(r"password|passwd|pwd|secret|token", re.IGNORECASE)


def client_environment() -> dict[str, str]:
    """The caller's variables that reach the systems and change how their clients behave:
    libpq's ``PG*`` (PGOPTIONS, PGAPPNAME, ...; every Postgres client here is on libpq but
    asyncpg, which reads some of them too) and Dramatiq's ``dramatiq_*`` settings (names
    matched case-insensitively). A secret's value is masked, and a password in any other value
    (a DSN) redacted. PGDSN is left out: the harness sets its own for every Postgres system."""
    ours = set(SYSTEMS["floor"].worker_env("").keys())
    found = {}
    for name, value in sorted(passed_environ().items()):
        if not (name.upper().startswith("PG") or name.lower().startswith("dramatiq_")) or name in ours:
            continue
        found[name] = "[REDACTED]" if _SECRET_NAME.search(name) else redact(value)
    return found


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(argv: list[str]) -> int:
    """``python -m bench run ...``: measure, write the results file, print the summary."""
    config = parse_config(argv)
    config.environment = client_environment()
    config.notes = size_notes(config)
    for note in config.notes:
        print(f"note: {note}", flush=True)
    try:
        config.admin_url = server.admin_url()
    except Exception as exc:  # the embedded server did not start, or a CONTROLPLANE_* setting is bad
        print(f"bench: no PostgreSQL to measure on: {loggable_error(exc)}; set DATABASE_URL", file=sys.stderr)
        return 2
    problem = server.unusable(config.admin_url, roles="provision" in config.phases)
    if problem:
        print(f"bench: {problem}; set DATABASE_URL to the server to measure on", file=sys.stderr)
        return 2
    # A SIGTERM to the harness still stops the workers and drops the databases.
    signal.signal(signal.SIGTERM, _interrupt)
    bench_run = Run(config)
    began = time.monotonic()
    try:
        bench_run.prepare()
        bench_run.collect_versions()
        bench_run.run_rounds()
    finally:
        bench_run.cleanup()
    bench_run.write()
    doc = json.loads(bench_run.output.read_text())
    print()
    print(table(doc))
    print()
    print("targets for ours:")
    print(target_lines(doc))
    for name, reason in doc["skipped"].items():
        print(f"skipped {name}: {reason}")
    for name, reason in doc["caps"].items():
        print(f"note {name}: {reason}")
    for note in config.notes:
        print(f"note: {note}")
    shown = bench_run.output.relative_to(ROOT) if bench_run.output.is_relative_to(ROOT) else bench_run.output
    print(f"\nresults: {shown} ({time.monotonic() - began:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``python -m bench`` entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(
            "usage: python -m bench run [--quick] [--rounds N] [--only floor,ours,...] [options]\n"
            "       python -m bench run --help\n"
            "       python -m bench runs [FILE ...]   (ours against the targets, one row per full run)"
        )
        return 0 if args else 2
    if args[0] == "runs":
        from bench.runs import main as runs

        return runs(args[1:])
    if args[0] != "run":
        print(f"unknown command {args[0]!r}; try: python -m bench run --help", file=sys.stderr)
        return 2
    return run(args[1:])
