"""The chaos soak: the command line, the run, the table. See ``docs/reliability.md``.

``.venv/bin/python -m bench.soak [--jobs 100000] [--workers 4] [--provisions 20]
[--seconds-limit 1500] [--quick] [--output PATH] [--seed N]``

1. A PRIVATE embedded PostgreSQL in a temporary folder; the database ``soak`` migrated,
   plus the ``soak`` schema (:mod:`bench.soak.server`).
2. A TCP proxy on 127.0.0.1 in front of its Unix socket (:mod:`bench.soak.proxy`); the
   stand-in auth, realtime and storage services on 127.0.0.1, in this process.
3. ``--workers`` dramatiq CLIs (``bench.soak.actors`` and ``tasks.provision``), each with one
   worker process, connected through the proxy, with 5 s leases (:mod:`bench.soak.workers`).
4. 4 producer threads send ``--jobs`` messages, half inside transactions that roll back at
   random (:mod:`bench.soak.producers`), while the chaos loop kills, stops, cuts, stalls and
   restarts (:mod:`bench.soak.chaos`).
5. Chaos stops; the queue drains (bounded wait); the workers stop (SIGTERM); the checks run
   (:mod:`bench.soak.checks`); the table is printed and the JSON written to
   ``bench/results/soak-<timestamp>.json``.

Exit status: 0 when every must-be-zero row is zero and the queue drained, 1 otherwise.
Every process started is stopped and the temporary folder removed, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dramatiq
import psycopg2

import tasks
from bench.soak import checks
from bench.soak.actors import QUEUE
from bench.soak.chaos import Chaos, ChaosPlan
from bench.soak.producers import Producer, Sent, plan
from bench.soak.proxy import ProxyProcess
from bench.soak.server import PrivateServer
from bench.soak.workers import WORKER_ENV, MemorySampler, SoakWorker
from tasks.broker import PostgresBroker
from tasks.provision.standin import StandinService
from tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
API_KEY_COUNT = 2

#: Settings of the calling shell that must not reach the soak's workers.
INHERIT_NOT = frozenset({
    "BROKER_URL", "DATABASE_URL", "PROVISION_DATABASE_URL", "CONTROLPLANE_METRICS_PORT", "WORKER_MODULES",
    "CONTROLPLANE_POOL_SIZE", "CONTROLPLANE_MAX_ATTEMPTS",
})


@dataclass
class Config:
    """One soak's size, chaos and limits."""

    jobs: int
    workers: int
    provisions: int
    producers: int
    threads: int
    seconds_limit: float
    quick: bool
    seed: int
    output: Path | None
    send_seconds: float
    chaos_seconds: float
    chaos_events: int
    chaos_interval: tuple[float, float]
    pg_restart_at: float
    sigterm_at: float
    pause_at: float
    pause_seconds: float
    stall_seconds: float
    chaos_tail: float
    drain_timeout: float
    max_delay_ms: int
    unique_keys: int
    keep_logs: Path | None


def parse_config(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description="Chaos soak of the Postgres task system (see docs/reliability.md).",
    )
    parser.add_argument("--jobs", type=int, help="messages the producers send (default 100000; --quick 3000)")
    parser.add_argument("--workers", type=int, help="worker processes (default 4; --quick 2)")
    parser.add_argument("--provisions", type=int, help="provision_project jobs that commit (default 20; --quick 2)")
    parser.add_argument("--producers", type=int, default=4, help="producer threads (default 4)")
    parser.add_argument("--threads", type=int, default=8, help="worker threads per worker process (default 8)")
    parser.add_argument("--seconds-limit", type=float,
                        help="wall-time cap of the whole soak (default 1500; --quick 100)")
    parser.add_argument("--chaos-seconds", type=float,
                        help="how long the chaos lasts at most (default 900; --quick 30); it also stops "
                             "20 s (--quick 10 s) after the last send")
    parser.add_argument("--chaos-events", type=int, help="chaos events at most (default 250; --quick 10)")
    parser.add_argument("--quick", action="store_true",
                        help="a few thousand jobs, 2 workers, 2 provisions, light chaos, about a minute")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    parser.add_argument("--output", type=Path, default=None,
                        help="where to write the JSON (default bench/results/soak-<timestamp>.json)")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the worker and server logs here")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    config = Config(
        jobs=args.jobs if args.jobs is not None else (3000 if quick else 100_000),
        workers=args.workers if args.workers is not None else (2 if quick else 4),
        provisions=args.provisions if args.provisions is not None else (2 if quick else 20),
        producers=args.producers,
        threads=args.threads,
        seconds_limit=args.seconds_limit if args.seconds_limit is not None else (100.0 if quick else 1500.0),
        quick=quick,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31),
        output=args.output,
        send_seconds=20.0 if quick else 0.0,
        chaos_seconds=args.chaos_seconds if args.chaos_seconds is not None else (30.0 if quick else 900.0),
        chaos_events=args.chaos_events if args.chaos_events is not None else (10 if quick else 250),
        chaos_interval=(2.0, 4.0) if quick else (2.0, 5.0),
        pg_restart_at=8.0 if quick else 40.0,
        sigterm_at=14.0 if quick else 90.0,
        pause_at=18.0 if quick else 120.0,
        pause_seconds=3.0 if quick else 8.0,
        stall_seconds=8.0,
        chaos_tail=10.0 if quick else 20.0,
        drain_timeout=60.0 if quick else 900.0,
        max_delay_ms=3000 if quick else 5000,
        unique_keys=20 if quick else 500,
        keep_logs=args.keep_logs,
    )
    if config.jobs < config.provisions or config.workers < 1 or config.producers < 1:
        parser.error("--jobs must be at least --provisions, and --workers and --producers at least 1")
    return config


def _say(message: str, clock_zero: float) -> None:
    print(f"[{time.monotonic() - clock_zero:7.1f}s] {message}", flush=True)


def _machine(server: PrivateServer) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": server.version(),
        "dramatiq": dramatiq.__version__,
        "git_commit": commit,
    }


class Soak:
    """One soak run; :meth:`run` returns the result document."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.clock_zero = time.monotonic()
        self.deadline = self.clock_zero + config.seconds_limit
        self.run_id = "s" + uuid.uuid4().hex[:6]
        self.pepper = "soak-pepper-" + secrets.token_hex(16)
        self.tokens = {name: f"{name}-token-{secrets.token_hex(12)}" for name in ("auth", "realtime", "storage")}
        self.server = PrivateServer()
        self.proxy: ProxyProcess | None = None
        self.services: dict[str, StandinService] = {}
        self.workers: list[SoakWorker] = []
        self.workers_lock = threading.Lock()
        self.memory = MemorySampler()
        self.body_texts: list[tuple[str, str]] = []
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.soak_url = ""

    def say(self, message: str) -> None:
        _say(message, self.clock_zero)

    def elapsed(self) -> float:
        return round(time.monotonic() - self.clock_zero, 1)

    # -- setup -------------------------------------------------------------------------

    def _setup(self) -> None:
        self.server.start()
        self.soak_url = self.server.create_soak_database("soak")
        self.proxy = ProxyProcess(self.server.socket_path(), ROOT)
        proxy_url = f"postgresql://postgres@127.0.0.1:{self.proxy.port}"
        for name, token in self.tokens.items():
            service = StandinService(name, token)
            service.start()
            self.services[name] = service
        # The workers' world is the soak's: none of this shell's broker, database or metrics settings.
        inherited = {k: v for k, v in os.environ.items() if k not in INHERIT_NOT}
        env = {
            **inherited,
            **WORKER_ENV,
            "DATABASE_URL": f"{proxy_url}/soak",
            "PROVISION_DATABASE_URL": f"{proxy_url}/postgres",
            "API_KEY_PEPPER": self.pepper,
            "SERVICE_TIMEOUT_SECONDS": "2",
            "CONTROLPLANE_HOME": str(self.server.root / "home"),
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        }
        for name, service in self.services.items():
            env[f"{name.upper()}_SERVICE_URL"] = service.url
            env[f"{name.upper()}_SERVICE_TOKEN"] = self.tokens[name]
        log_dir = self.server.root / "logs"
        log_dir.mkdir()
        self.workers = [SoakWorker(slot, env, log_dir, self.config.threads) for slot in range(self.config.workers)]
        broker = tasks.broker
        if not isinstance(broker, PostgresBroker):
            raise RuntimeError("the soak tests the Postgres broker: unset BROKER_URL")
        broker.reconfigure(self.soak_url)
        self.timings["setup_s"] = self.elapsed()
        self.say(f"private PostgreSQL {self.server.version()} up, soak database migrated, proxy on "
                 f"127.0.0.1:{self.proxy.port}, stand-ins up; run {self.run_id}, seed {self.config.seed}")

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = psycopg2.connect(self.soak_url, connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return list(cur.fetchall())
        finally:
            conn.close()

    def _try_count(self, sql: str) -> int | None:
        try:
            return int(self._query(sql)[0][0])
        except psycopg2.Error:
            return None  # the server is restarting

    def _start_workers(self) -> None:
        for worker in self.workers:
            worker.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live = self._try_count("SELECT count(*) FROM control_plane.worker_heartbeats")
            if live is not None and live >= len(self.workers):
                self.say(f"{len(self.workers)} workers heartbeating")
                return
            for worker in self.workers:
                if not worker.alive():
                    raise RuntimeError(f"worker {worker.slot} exited at start: see {worker.log_path}")
            time.sleep(0.2)
        raise RuntimeError("the workers did not heartbeat within 60 s")

    # -- while it runs -----------------------------------------------------------------

    def _tick(self, restarts: list[dict[str, Any]]) -> None:
        """Once a second: sample memory, restart a worker that died on its own."""
        with self.workers_lock:
            self.memory.sample(self.workers)
            for worker in self.workers:
                if worker.check():
                    restarts.append({"t": self.elapsed(), "slot": worker.slot,
                                     "exit_code": worker.unexpected_exits[-1]})
                    self.say(f"worker {worker.slot} exited on its own ({worker.unexpected_exits[-1]}); restarted")

    def _sample_bodies(self) -> None:
        """Keep message bodies seen in flight, for the secrets scan (the queue is empty at the end)."""
        with contextlib.suppress(psycopg2.Error):
            rows = self._query(
                "(SELECT convert_from(body, 'UTF8') FROM control_plane.messages WHERE queue = 'provisioning') "
                "UNION ALL (SELECT convert_from(body, 'UTF8') FROM control_plane.messages "
                "WHERE queue <> 'provisioning' LIMIT 500)"
            )
            self.body_texts.extend(("message bodies (sampled in flight)", str(r[0])) for r in rows)

    def _outstanding(self) -> int | None:
        return self._try_count(
            "SELECT (SELECT count(*) FROM control_plane.messages) + "
            "(SELECT count(*) FROM control_plane.projects WHERE status = 'provisioning')"
        )

    # -- the run -----------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            self._setup()
            self._start_workers()
            return self._run()
        finally:
            self._teardown()

    def _run(self) -> dict[str, Any]:
        config = self.config
        assert self.proxy is not None
        stop = threading.Event()
        plans = plan(config.jobs, config.provisions, config.producers, config.seed)
        producers = [
            Producer(i, items, url=self.soak_url, run_id=self.run_id, seed=config.seed,
                     deadline_at=self.deadline - (30 if config.quick else 240), send_seconds=config.send_seconds,
                     unique_keys=config.unique_keys, max_delay_ms=config.max_delay_ms, stop=stop)
            for i, items in enumerate(plans)
        ]
        chaos_seconds = min(config.chaos_seconds, max(config.seconds_limit * 0.6, 5.0))
        chaos = Chaos(
            ChaosPlan(seconds=chaos_seconds, max_events=config.chaos_events, interval=config.chaos_interval,
                      # the one-off events happen inside the chaos window, however short
                      pg_restart_at=min(config.pg_restart_at, chaos_seconds * 0.3),
                      sigterm_at=min(config.sigterm_at, chaos_seconds * 0.5),
                      pause_at=min(config.pause_at, chaos_seconds * 0.6), pause_seconds=config.pause_seconds,
                      stall_seconds=config.stall_seconds),
            workers=self.workers, workers_lock=self.workers_lock, proxy=self.proxy, server=self.server,
            seed=config.seed, clock_zero=self.clock_zero, pause_url=self.soak_url, queue=QUEUE,
        )
        restarts: list[dict[str, Any]] = []
        started = time.monotonic()
        self.say(f"sending {config.jobs} messages from {config.producers} producers; chaos for at most "
                 f"{chaos.plan.seconds:.0f} s / {chaos.plan.max_events} events")
        for p in producers:
            p.start()
        chaos.start()
        last_sample = 0.0
        last_report = time.monotonic()
        try:
            while any(p.is_alive() for p in producers) or chaos.is_alive():
                time.sleep(1.0)
                self._tick(restarts)
                now = time.monotonic()
                if now - last_sample > 10:
                    self._sample_bodies()
                    last_sample = now
                if now - last_report > 15:
                    sent = sum(len(p.sent) for p in producers)
                    self.say(f"sent {sent}, outstanding {self._outstanding()}, chaos events {len(chaos.events)}")
                    last_report = now
                if now > self.deadline - (20 if config.quick else 180):
                    self.notes.append("the time limit stopped the producers and the chaos early")
                    stop.set()
                    chaos.stop()
                if not any(p.is_alive() for p in producers):
                    if "sending_s" not in self.timings:
                        self.timings["sending_s"] = round(now - started, 1)
                        self.say(f"producers done in {self.timings['sending_s']} s")
                    if now - started > self.timings["sending_s"] + config.chaos_tail:
                        chaos.stop()  # the chaos outlives the sends by chaos_tail seconds, no more
        finally:
            stop.set()
            chaos.stop()
            chaos.join(60)
            for p in producers:
                p.join(60)
        self.timings["chaos_s"] = round(chaos.ended_at - chaos.started_at, 1)
        self.say(f"chaos over: {chaos.counts()}")
        for failed in [p for p in producers if p.failure] + ([chaos] if chaos.failure else []):
            self.notes.append(f"{failed.name} failed: {failed.failure!r}")

        # the queue drains (bounded), the reaper's timeout included
        drain_started = time.monotonic()
        drain_deadline = min(drain_started + config.drain_timeout, self.deadline - (10 if config.quick else 60))
        drained = False
        outstanding = self._outstanding()
        while time.monotonic() < drain_deadline:
            self._tick(restarts)
            outstanding = self._outstanding()
            if outstanding == 0:
                drained = True
                break
            if time.monotonic() - last_report > 15:
                self.say(f"draining: {outstanding} messages or projects outstanding")
                last_report = time.monotonic()
            time.sleep(1.0)
        self.timings["drain_s"] = round(time.monotonic() - drain_started, 1)
        self.say(f"drained: {drained} ({outstanding} outstanding) after {self.timings['drain_s']} s")
        if not drained:
            self.notes.append(f"the queue did not drain within the bounded wait ({outstanding} outstanding)")

        # the workers stop gracefully; then nothing may be left running
        exit_codes: list[int | None] = []
        with self.workers_lock:
            for worker in self.workers:
                worker.request_stop()
            for worker in self.workers:
                exit_codes.append(worker.terminate(timeout=30))
        self.timings["run_s"] = self.elapsed()
        return self._verdict(producers, chaos, restarts, drained, exit_codes)

    # -- the verdict -----------------------------------------------------------------------

    def _reveal(self, projects: list[str]) -> dict[str, str]:
        """Read each active project's secrets once (as a caller would), to look for them everywhere."""
        from tasks.provision import reveal_secrets

        settings = Settings.from_env({"API_KEY_PEPPER": self.pepper, "DATABASE_URL": self.soak_url})
        known: dict[str, str] = {"pepper": self.pepper}
        known.update({f"{name} service token": token for name, token in self.tokens.items()})
        for project in projects:
            try:
                revealed = reveal_secrets(settings, project)
            except Exception as exc:  # reported, not fatal: the scan still runs on the patterns
                self.notes.append(f"could not reveal the secrets of {project}: {exc}")
                continue
            keys: list[Any] = list(revealed["api_keys"])  # type: ignore[call-overload]
            for slot, key in enumerate(keys, start=1):
                known[f"api key {project}/{slot}"] = str(key)
            known[f"app password {project}"] = str(revealed["database_password"])
        return known

    def _verdict(self, producers: list[Producer], chaos: Chaos, restarts: list[dict[str, Any]], drained: bool,
                 exit_codes: list[int | None]) -> dict[str, Any]:
        config = self.config
        sent: list[Sent] = [s for p in producers for s in p.sent]
        provisions = [s for s in sent if s.kind == "provision"]
        committed_projects = [s.project_id for s in provisions if s.fate == "committed" and s.project_id]
        rolled_back_projects = [s.project_id for s in provisions if s.fate == "rolled_back" and s.project_id]
        tenants = {name: set(service.tenants) for name, service in self.services.items()}
        conn = psycopg2.connect(self.soak_url)
        try:
            checks.load_ledger(conn, sent)
            found = checks.analyse(conn, url=self.soak_url, run_id=self.run_id, tenants=tenants,
                                   api_key_count=API_KEY_COUNT, rolled_back_projects=rolled_back_projects,
                                   committed_projects=committed_projects)
            known = self._reveal(found["active_projects"])
            logs = [w.log_path for w in self.workers]
            tables = list(checks.table_texts(conn))
            conn.commit()
            secret_hits = checks.scan(
                [*checks.file_texts(logs, "worker log"), *tables, *self.body_texts], known)
            server_log_hits = checks.scan(checks.file_texts([self.server.log_path()], "server log"), known)
        finally:
            conn.close()
        if config.keep_logs is not None:
            config.keep_logs.mkdir(parents=True, exist_ok=True)
            for path in [*logs, self.server.log_path()]:
                if path.exists():
                    shutil.copy(path, config.keep_logs / f"{path.name}")
        stats = [asdict(p.stats) for p in producers]
        totals: dict[str, Any] = {}
        for s in stats:
            for key, value in s.items():
                if isinstance(value, int):
                    totals[key] = totals.get(key, 0) + value
                else:
                    for name, n in value.items():
                        totals.setdefault(key, {})
                        totals[key][name] = totals[key].get(name, 0) + n
        secrets_found = sum(sum(v.values()) for v in secret_hits.values())
        rows = {
            "sent": found["sent"],
            "rolled_back": found["rolled_back"],
            "deduplicated": found["deduplicated"],
            "in_doubt": found["fates"].get("in_doubt_committed", 0) + found["fates"].get("in_doubt_absent", 0),
            "committed": found["committed"],
            "completed": found["completed"],
            "failed_as_designed": found["failed_as_designed"],
            "lost": found["lost"],
            "ran_from_rolled_back": found["ran_from_rolled_back"],
            "failed_not_by_design": found["failed_not_by_design"],
            "completed_twice": found["completed_twice"],
            "stuck": found["stuck"],
            "disagreements": found["disagreements"],
            "delayed_ran_early": found["delayed_ran_early"],
            "projects_active": found["projects"]["active"],
            "projects_committed": found["projects"]["committed"],
            "orphans": found["orphans"],
            "provision_forks": len(found["provision_forks"]),
            "peak_worker_rss_mb": round(self.memory.peak_process_kb / 1024, 1),
            "peak_all_workers_rss_mb": round(self.memory.peak_total_kb / 1024, 1),
            "secrets_found": secrets_found,
            "secrets_in_server_log": sum(sum(v.values()) for v in server_log_hits.values()),
        }
        failing = [name for name in checks.MUST_BE_ZERO if rows[name] != 0]
        passed = not failing and drained
        return {
            "kind": "soak",
            "passed": passed,
            "failing_rows": failing,
            "drained": drained,
            "run_id": self.run_id,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
            "machine": _machine(self.server),
            "timings": self.timings,
            "rows": rows,
            "details": found,
            "producers": totals,
            "chaos": {"counts": chaos.counts(), "events": chaos.events},
            "worker_restarts_unexpected": restarts,
            "worker_starts": [w.starts for w in self.workers],
            "worker_final_exit_codes": exit_codes,
            "proxy": self._proxy_stats(),
            "memory": {"samples": self.memory.samples, "peak_process_kb": self.memory.peak_process_kb,
                       "peak_total_kb": self.memory.peak_total_kb},
            "secrets": {"hits": secret_hits, "server_log_hits": server_log_hits,
                        "known_secrets_checked": len(known),
                        "message_bodies_sampled": len(self.body_texts)},
            "notes": self.notes,
        }

    def _proxy_stats(self) -> dict[str, Any]:
        if self.proxy is None:
            return {}
        try:
            return self.proxy.stats()
        except (OSError, RuntimeError, ValueError):
            return {}

    def _teardown(self) -> None:
        for worker in self.workers:
            with contextlib.suppress(Exception):
                worker.kill()
        if self.proxy is not None:
            with contextlib.suppress(Exception):
                self.proxy.stop()
        for service in self.services.values():
            with contextlib.suppress(Exception):
                service.stop()
        with contextlib.suppress(Exception):
            tasks.broker.close()
        self.server.stop()


# -- the table ----------------------------------------------------------------------------------

TABLE = (
    ("sent", "messages sent by the producers", "-"),
    ("rolled_back", "  of which rolled back with their transaction", "-"),
    ("deduplicated", "  of which unique sends that found their key held (no job)", "-"),
    ("in_doubt", "  of which in doubt (COMMIT's answer lost; resolved by looking)", "-"),
    ("committed", "jobs committed", "-"),
    ("completed", "completed", "-"),
    ("failed_as_designed", "failed as designed (PermanentError)", "-"),
    ("lost", "lost", "0"),
    ("ran_from_rolled_back", "run from a rolled-back transaction", "0"),
    ("failed_not_by_design", "failed or cancelled not by design", "0"),
    ("completed_twice", "completed twice in the history (at-least-once)", "recorded"),
    ("stuck", "left running or stuck after the reaper's timeout", "0"),
    ("disagreements", "rows where control_plane.jobs disagrees with the broker", "0"),
    ("delayed_ran_early", "delayed jobs started before their eta", "0"),
    ("projects_active", "provisioned projects active (of committed)", "all"),
    ("orphans", "orphaned databases, roles, registrations", "0"),
    ("provision_forks", "provision steps that ran as two jobs (chain forks)", "recorded"),
    ("peak_worker_rss_mb", "peak worker RSS, one process (MB)", "recorded"),
    ("peak_all_workers_rss_mb", "peak worker RSS, all processes (MB)", "recorded"),
    ("secrets_found", "secrets in worker logs, control_plane, bodies, results", "0"),
    ("secrets_in_server_log", "secrets in the PostgreSQL server log (extra)", "recorded"),
)


def table(doc: dict[str, Any]) -> str:
    """The result table, as Markdown."""
    rows = doc["rows"]
    lines = ["| row | measured | must be |", "|---|---:|---|"]
    for key, label, expect in TABLE:
        value = rows[key]
        if key == "projects_active":
            value = f"{rows['projects_active']} / {rows['projects_committed']}"
        lines.append(f"| {label} | {value} | {expect} |")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    # SIGTERM (a CI timeout, a test giving up) unwinds like ^C: every process is stopped, the folder removed.
    signal.signal(signal.SIGTERM, _interrupt)
    soak = Soak(config)
    try:
        doc = soak.run()
    except KeyboardInterrupt:
        print("interrupted; everything was stopped and removed", file=sys.stderr)
        return 130
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = config.output or RESULTS / f"soak-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    doc["written_at"] = stamp
    output.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print()
    print(table(doc))
    print()
    print(f"chaos: {doc['chaos']['counts']}; completed twice by cause: {doc['details']['completed_twice_causes']}")
    print(f"timings: {doc['timings']}")
    for note in doc["notes"]:
        print(f"note: {note}")
    verdict = "PASSED" if doc["passed"] else f"FAILED: {', '.join(doc['failing_rows']) or 'the queue did not drain'}"
    print(f"soak {verdict}; results in {output}")
    return 0 if doc["passed"] else 1


__all__ = ["Config", "Soak", "main", "parse_config", "table"]
