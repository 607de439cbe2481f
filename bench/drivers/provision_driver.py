"""The ``provision`` phase: ``provision_project`` end to end, and the same SQL run by hand.

``python -m bench.drivers.provision_driver COMMAND --url CONTROL_DB --prefix P --n N``

* ``hand`` (the ``floor`` row): provisions N projects one after another in this
  process (``--threads K``: K at a time, for reference), calling the project's
  own building blocks directly, each project's in this order:
  the ``control_plane.projects`` row (``INSERT_PROJECT``), then
  :func:`~tasks.provision.roles.ensure_roles`,
  :func:`~tasks.provision.database.ensure_database` (``CREATE DATABASE ...
  TEMPLATE template0``), :func:`~tasks.provision.schema.ensure_schema`,
  :func:`~tasks.provision.register.register_services` (the same HTTP calls to
  the same stand-in services), :func:`~tasks.provision.keys.ensure_api_keys`,
  and the ``ACTIVATE`` update with the result. No Dramatiq message, no jobs
  mirror, no step marks, no chaining: the same SQL, by hand.
* ``send`` (the ``ours`` row): sends N ``provision_project`` jobs to workers
  the harness started (``dramatiq tasks tasks.provision``), then polls
  ``control_plane.jobs`` until every project's last step
  (``provision_project.activate``) is completed, looking at the projects by
  their primary key until all are active so that the poll costs the server
  little. With ``--serial``, it sends
  one project, waits for it, then sends the next: ours in sequence too.

Both time from the first project's first statement (or send) to the last
project's end, with ``time.perf_counter``; imports, connecting and warming the
pool happen before the clock starts. The last output line is a JSON object:
``seconds``, ``n``, ``per_project_s`` (each project's own duration: by hand,
its turn in the sequence; sent, from its send to its ``activate`` job's
``completed_at``), ``steps`` (median milliseconds per step, for profiles:
see :func:`_steps_breakdown`) and ``cpu_s``, the CPU seconds used while the clock
ran, by role (:func:`bench.procfs.cpu_by_role`: the machine, PostgreSQL, the
driver, the harness with the stand-ins, ours' workers).

The settings (``PROVISION_DATABASE_URL``, the service URLs and tokens,
``API_KEY_PEPPER``) come from the environment the harness sets.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench import procfs

#: The step names, in order, as both commands report them.
STEPS = ("claim", "roles", "database", "schema", "services", "api_keys", "activate")


def project_ids(prefix: str, n: int) -> list[str]:
    """The N project ids of one run of one system (``prefix`` is unique per run, round and system)."""
    return [f"{prefix}_{i:03d}" for i in range(n)]


def payload(project_id: str, i: int) -> dict[str, Any]:
    """A full payload: every service, two API keys, owner and organisation."""
    return {
        "project_id": project_id,
        "tenant_id": f"tenant-{project_id}",
        "region": "eu-west-1",
        "owner_id": f"user_{i}",
        "organization_id": f"org_{i % 4}",
        "api_key_count": 2,
        "services": {"auth": True, "realtime": True, "storage": True},
    }


@functools.cache
def _postmaster() -> int | None:
    """The postmaster of the server in ``DATABASE_URL`` when it runs here: its CPU is counted
    alone (another PostgreSQL on the machine, started or stopped meanwhile, is not)."""
    return procfs.postmaster_at(os.environ["DATABASE_URL"])


def _cpu_by_role() -> dict[str, float]:
    """CPU seconds so far by role (see :func:`bench.procfs.cpu_by_role`)."""
    return procfs.cpu_by_role(os.getpid(), os.getppid(), _postmaster())


def _cpu_since(before: dict[str, float]) -> dict[str, float]:
    """CPU seconds by role since ``before``."""
    now = _cpu_by_role()
    return {role: round(now[role] - before[role], 3) for role in now}


def _median_ms(values: list[float]) -> float | None:
    return round(statistics.median(values) * 1000, 2) if values else None


# -- hand: the same SQL, in sequence (or K at a time) -------------------------------------------------


def hand(prefix: str, n: int, threads: int = 1) -> dict[str, Any]:
    """Provision ``n`` projects with the project's own functions, without Dramatiq.

    One after another (the issue's reference), or ``threads`` at a time: what
    running the same SQL concurrently, with nothing else, allows on this machine.
    """
    from psycopg2.extras import Json

    import tasks
    from models import project_queries as q
    from tasks.provision import payload as p
    from tasks.provision import secrets
    from tasks.provision.database import ensure_database
    from tasks.provision.keys import ensure_api_keys, list_api_keys
    from tasks.provision.register import register_services
    from tasks.provision.roles import ensure_roles
    from tasks.provision.schema import ensure_schema
    from tasks.provision.state import ProjectState, control_transaction
    from tasks.settings import Settings

    settings = Settings.from_env()
    with contextlib.ExitStack() as opening:
        for _ in range(threads):  # open the pooled control-plane connections before the clock starts
            opening.enter_context(tasks.connection())
    secrets.pepper(settings)

    def claim(valid: p.ProvisionPayload) -> ProjectState:
        # A tree before 3f76e32 (an A/B against an older --ours-root) takes the nonce as a
        # parameter and returns nothing; since, the server makes it and the INSERT returns it.
        given = os.urandom(32)
        with control_transaction() as conn, conn.cursor() as cur:
            cur.execute(
                q.INSERT_PROJECT,
                {
                    "project_id": valid.project_id,
                    "tenant_id": valid.tenant_id,
                    "payload": Json(valid.to_json()),
                    "payload_hash": p.payload_hash(valid),
                    "region": valid.region,
                    "owner_id": valid.owner_id,
                    "organization_id": valid.organization_id,
                    "secret_nonce": given,
                    "secrets_ttl": settings.secrets_ttl_seconds,
                    "job_id": None,
                    "waiting": [],  # (a tree before 7499f11 takes none)
                },
            )
            nonce = bytes(cur.fetchone()[0]) if cur.description else given
        return ProjectState(payload=valid, status="provisioning", steps={}, secret_nonce=nonce, job_id=None)

    def activate(state: ProjectState) -> None:
        valid = state.payload
        with control_transaction() as conn, conn.cursor() as cur:
            result = {
                "project_id": valid.project_id,
                "tenant_id": valid.tenant_id,
                "status": "active",
                "region": valid.region,
                "database": {
                    "database": p.database_name(valid),
                    "user": p.app_role(valid),
                    "schema_name": p.schema_name(valid),
                    "owner_role": p.owner_role(valid),
                },
                "services": {name: name in valid.services.enabled() for name in ("auth", "realtime", "storage")},
                "api_key_prefix": valid.api_key_prefix,
                "api_keys": list_api_keys(conn, valid.project_id),
            }
            cur.execute(q.ACTIVATE, {"project_id": valid.project_id, "run": None, "result": Json(result),
                                     "secrets_ttl": settings.secrets_ttl_seconds})
            if cur.fetchone() is None:
                raise RuntimeError(f"project {valid.project_id} was not provisioning")

    work = {
        "roles": ensure_roles,
        "database": ensure_database,
        "schema": ensure_schema,
        "services": register_services,
        "api_keys": ensure_api_keys,
    }
    per_project: list[float] = []
    per_step: dict[str, list[float]] = {step: [] for step in STEPS}

    def one(i: int, project_id: str) -> None:
        t0 = time.perf_counter()
        state = claim(p.validate(payload(project_id, i)))
        t1 = time.perf_counter()
        per_step["claim"].append(t1 - t0)
        for step, function in work.items():
            function(settings, state)
            t2 = time.perf_counter()
            per_step[step].append(t2 - t1)
            t1 = t2
        activate(state)
        t2 = time.perf_counter()
        per_step["activate"].append(t2 - t1)
        per_project.append(t2 - t0)

    cpu = _cpu_by_role()
    started = time.perf_counter()
    if threads == 1:
        for i, project_id in enumerate(project_ids(prefix, n)):
            one(i, project_id)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(one, i, pid) for i, pid in enumerate(project_ids(prefix, n))]:
                future.result()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "n": n,
        "threads": threads,
        "cpu_s": _cpu_since(cpu),
        "per_project_s": per_project,
        "steps": {"work_ms": {step: _median_ms(v) for step, v in per_step.items()}},
    }


# -- send: provision_project through the workers ---------------------------------------------

#: Per project: its entry job, and each step job's created/started/completed times (seconds since epoch).
_TIMELINE = """
SELECT p.project_id, j.type,
       extract(epoch FROM j.created_at), extract(epoch FROM j.started_at), extract(epoch FROM j.completed_at),
       j.attempts
FROM control_plane.projects p
JOIN control_plane.jobs j
  ON j.id = p.job_id
  OR (j.type LIKE 'provision\\_project.%%' AND j.payload #>> '{args,0}' = p.project_id)
WHERE p.project_id = ANY(%(ids)s)
"""

#: Each step's marks as the workflow recorded them (``run_step``: started_at, and done_at but for activate).
_MARKS = """
SELECT project_id, s.key,
       extract(epoch FROM (s.value ->> 'started_at')::timestamptz),
       extract(epoch FROM (s.value ->> 'done_at')::timestamptz)
FROM control_plane.projects, jsonb_each(steps) AS s
WHERE project_id = ANY(%(ids)s) AND jsonb_typeof(s.value) = 'object' AND s.value ? 'started_at'
"""

#: How far the projects are, read by their primary key on every poll: the poll must cost the
#: server little, as it runs beside the system it measures (three scans of the jobs table on
#: every poll cost PostgreSQL about 10 ms of CPU per project in sequence;
#: bench/results/provision-cpu-20261204-*.json).
_PROJECTS = """
SELECT count(*) FILTER (WHERE status = 'active'),
       string_agg(project_id || ' ' || status, ', ') FILTER (WHERE status IN ('compensating', 'needs_operator'))
FROM control_plane.projects
WHERE project_id = ANY(%(ids)s)
"""

#: The end of the clock: each project's activate job completed (read once every project is active).
_ACTIVATED = """
SELECT count(*) FROM control_plane.jobs
WHERE type = 'provision_project.activate' AND status = 'completed' AND payload #>> '{args,0}' = ANY(%(ids)s)
"""

#: Jobs that failed for good, for the error message (read a few times a second, not on every poll).
_FAILED = """
SELECT string_agg(type || ': ' || coalesce(last_error, status), '; ') FROM control_plane.jobs
WHERE status IN ('failed', 'cancelled') AND type LIKE 'provision\\_project%'
"""


def _steps_breakdown(
    rows: list[tuple[Any, ...]], marks: list[tuple[Any, ...]], sent_at: dict[str, float]
) -> dict[str, Any]:
    """Where ours' time went, as medians over the projects, in milliseconds.

    * ``wait_ms``: a step's job from its send to its claim (``started_at - created_at``);
    * ``job_ms``: from its claim to its settle (``completed_at - started_at``; this includes
      the time the message waits in the worker's prefetch and the settle's own delay);
    * ``work_ms``: the step's own work, from the workflow's marks (``done_at - started_at``);
    * ``gap_ms``: from the previous step's done mark to this step's start mark: the chain's
      hand-over (the done transaction with the next send, NOTIFY, claim, dispatch, the start
      mark); for ``roles``, from the send of ``provision_project`` (the entry job included);
    * ``tail_ms``: from activate's start mark to its job's ``completed_at``;
    * ``overhead_ms``: a project's end-to-end time minus the sum of its steps' ``work_ms``;
    * ``handovers``: every ``gap_ms`` of every project: how many, their p90 and maximum, and
      how many took a quarter of a second or more (medians hide a few long stalls).
    """
    order = ["provision_project", *(f"provision_project.{s}" for s in STEPS[1:])]
    short = {t: t.removeprefix("provision_project.") if "." in t else "claim" for t in order}
    wait: dict[str, list[float]] = {short[t]: [] for t in order}
    run: dict[str, list[float]] = {short[t]: [] for t in order}
    jobs: dict[str, dict[str, tuple[float, float, float]]] = {}
    retries = 0
    for project_id, kind, created, started, completed, attempts in rows:
        if kind not in short or started is None or completed is None:
            continue
        step = short[kind]
        times = (float(created), float(started), float(completed))
        wait[step].append(times[1] - times[0])
        run[step].append(times[2] - times[1])
        jobs.setdefault(project_id, {})[step] = times
        retries += max(int(attempts) - 1, 0)
    by_project: dict[str, dict[str, tuple[float, float | None]]] = {}
    for project_id, step, started, done in marks:
        by_project.setdefault(project_id, {})[str(step)] = (float(started), None if done is None else float(done))
    work: dict[str, list[float]] = {s: [] for s in STEPS[1:-1]}
    gap: dict[str, list[float]] = {s: [] for s in STEPS[1:]}
    tail: list[float] = []
    overhead: list[float] = []
    for project_id, steps in by_project.items():
        total_work = 0.0
        for before, step in itertools.pairwise(STEPS):
            if step not in steps:
                continue
            started, done = steps[step]
            if done is not None and step in work:
                work[step].append(done - started)
                total_work += done - started
            previous = sent_at.get(project_id) if before == "claim" else steps.get(before, (0.0, None))[1]
            if previous is not None:
                gap[step].append(started - previous)
        if "activate" in steps and "activate" in jobs.get(project_id, {}):
            finished = jobs[project_id]["activate"][2]
            tail.append(finished - steps["activate"][0])
            if project_id in sent_at:
                overhead.append(finished - sent_at[project_id] - total_work)
    gaps = sorted(g for values in gap.values() for g in values)
    handovers = {
        "n": len(gaps),
        "p90_ms": round(gaps[max(math.ceil(0.9 * len(gaps)) - 1, 0)] * 1000, 2) if gaps else None,
        "max_ms": round(gaps[-1] * 1000, 2) if gaps else None,
        "over_250ms": sum(1 for g in gaps if g >= 0.25),
    }
    return {
        "wait_ms": {s: _median_ms(v) for s, v in wait.items()},
        "job_ms": {s: _median_ms(v) for s, v in run.items()},
        "work_ms": {s: _median_ms(v) for s, v in work.items()},
        "gap_ms": {s: _median_ms(v) for s, v in gap.items()},
        "tail_ms": _median_ms(tail),
        "overhead_ms": _median_ms(overhead),
        "handovers": handovers,
        "retries": retries,
    }


def send(prefix: str, n: int, stall_timeout: float, serial: bool = False) -> dict[str, Any]:
    """Send ``n`` provision_project jobs; wait until every project's activate job is completed.

    ``serial``: send one project, wait for it, then the next (ours in sequence, like the hand-run SQL).
    """
    import tasks
    from tasks.provision import provision_project

    ids = project_ids(prefix, n)
    bodies = [payload(project_id, i) for i, project_id in enumerate(ids)]
    with tasks.connection():
        pass  # open the pooled connection before the clock starts, as the other drivers do
    sent_at: dict[str, float] = {}

    def wait_until(count: int) -> None:
        last_change, last_seen = time.monotonic(), (-1, -1)
        next_failure_check = last_change + 0.5
        while True:
            done = 0
            with tasks.connection() as conn, conn.cursor() as cur:
                cur.execute(_PROJECTS, {"ids": ids})
                active, stuck = cur.fetchone()
                if active >= count:
                    cur.execute(_ACTIVATED, {"ids": ids})
                    (done,) = cur.fetchone()
                    if done >= count:
                        return
                now = time.monotonic()
                failed = None
                if stuck or now >= next_failure_check:
                    cur.execute(_FAILED)
                    (failed,) = cur.fetchone()
                    next_failure_check = now + 0.5
            if failed or stuck:
                raise SystemExit(f"provisioning failed: {failed or ''} {stuck or ''}".strip())
            if (active, done) != last_seen:
                last_seen, last_change = (active, done), now
            elif now - last_change > stall_timeout:
                raise SystemExit(f"stalled: {active}/{n} projects active, none more in the last {stall_timeout:.0f} s")
            # One project at a time: look often, the wait is part of each project's time.
            time.sleep(0.002 if serial else 0.01)

    cpu = _cpu_by_role()
    started = time.perf_counter()
    for i, body in enumerate(bodies):
        sent_at[body["project_id"]] = time.time()
        provision_project.send(body)
        if serial:
            wait_until(i + 1)
    wait_until(n)
    seconds = time.perf_counter() - started
    cpu_s = _cpu_since(cpu)
    with tasks.connection() as conn, conn.cursor() as cur:
        cur.execute(_TIMELINE, {"ids": ids})
        rows = cur.fetchall()
        cur.execute(_MARKS, {"ids": ids})
        marks = cur.fetchall()
    finished = {r[0]: float(r[4]) for r in rows if r[1] == "provision_project.activate" and r[4] is not None}
    per_project = [finished[pid] - sent_at[pid] for pid in ids if pid in finished]
    return {
        "seconds": seconds,
        "n": n,
        "serial": serial,
        "cpu_s": cpu_s,
        "per_project_s": per_project,
        "steps": _steps_breakdown(rows, marks, sent_at),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["hand", "send"])
    parser.add_argument("--url", required=True, help="the control plane's database (migrated)")
    parser.add_argument("--prefix", required=True, help="project id prefix, unique per run (^[a-z][a-z0-9_]*$)")
    parser.add_argument("--n", type=int, default=20, help="projects to provision")
    parser.add_argument("--stall-timeout", type=float, default=60.0, help="send: give up after no progress (s)")
    parser.add_argument("--serial", action="store_true", help="send: one project at a time, each after the last")
    parser.add_argument("--threads", type=int, default=1, help="hand: projects provisioned at once (default 1)")
    args = parser.parse_args(argv)
    # The broker and control_transaction read DATABASE_URL when ``tasks`` is imported.
    os.environ["DATABASE_URL"] = args.url
    if args.threads > 1:
        # A control-plane connection per thread, as the sequence has for its one: the pool's
        # default (2) would queue the threads' claim, services, api_keys and activate
        # transactions behind each other, and count the wait as those steps' work.
        pool = max(args.threads, int(os.environ.get("CONTROLPLANE_POOL_SIZE") or 2))
        os.environ["CONTROLPLANE_POOL_SIZE"] = str(pool)
    if args.command == "hand":
        result = hand(args.prefix, args.n, args.threads)
    else:
        result = send(args.prefix, args.n, args.stall_timeout, args.serial)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
