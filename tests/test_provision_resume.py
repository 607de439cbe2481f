"""provision_project steps re-run after a crash at every boundary: exactly one of everything.

The steps run in this process (no worker consumes the queue here), so each can
be run twice, or interrupted where a SIGKILL would have struck.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import dramatiq
import psycopg2
import psycopg2.errors
import pytest
from dramatiq.results import ResultFailure, ResultMissing
from psycopg2 import sql

import tasks
from tasks import db
from tasks.errors import Conflict, PermanentError, TransientError
from tasks.provision import STEPS, compensate_project, run_step, workflow
from tasks.provision.claim import claim
from tasks.provision.payload import validate
from tasks.provision.secrets import pepper as secrets_pepper
from tasks.provision.standin import StandinService
from tasks.provision.state import control_transaction, load
from tasks.provision.target import classify
from tasks.provision.workflow import QUEUE
from tasks.settings import Settings
from tests.support import at_once, claim_in_process, query, settle_in_process, wait_for

#: The pepper of these tests' processes (a new deployment's must be at least 32 bytes).
RESUME_PEPPER = "resume-pepper-" + "0123456789abcdef" * 2


@pytest.fixture
def services(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, StandinService]]:
    started = {name: StandinService(name, f"tok-{name}") for name in ("auth", "realtime", "storage")}
    for name, s in started.items():
        s.start()
        monkeypatch.setenv(f"{name.upper()}_SERVICE_URL", s.url)
        monkeypatch.setenv(f"{name.upper()}_SERVICE_TOKEN", f"tok-{name}")
    monkeypatch.setenv("API_KEY_PEPPER", RESUME_PEPPER)
    try:
        yield started
    finally:
        for s in started.values():
            s.stop()


@pytest.fixture
def project(db_url: str, monkeypatch: pytest.MonkeyPatch, server_url: str) -> Iterator[dict[str, Any]]:
    monkeypatch.setenv("DATABASE_URL", db_url)
    project_id = "r" + uuid.uuid4().hex[:8]
    body = {"project_id": project_id, "tenant_id": "tenant-r", "region": "eu-west", "api_key_count": 3,
            "services": {"auth": True, "realtime": True, "storage": True}}
    try:
        yield body
    finally:
        query(server_url, f'DROP DATABASE IF EXISTS "p_{project_id}" WITH (FORCE)')
        for role in (f"p_{project_id}_app", f"p_{project_id}_owner"):
            query(server_url, f'DROP ROLE IF EXISTS "{role}"')


def claimed(body: dict[str, Any]) -> str:
    """Claim the project as a provision_project job would; returns that job's id."""
    job_id = str(uuid.uuid4())
    with control_transaction() as conn:
        claim(conn, validate(body), job_id, Settings.from_env())
    return job_id


def told(job_id: str) -> Any:
    """What get_result gives the caller of provision_project job ``job_id`` (raises its failure)."""
    message = dramatiq.Message(queue_name=QUEUE, actor_name="provision_project", args=(), kwargs={}, options={},
                               message_id=job_id)
    return message.get_result(backend=tasks.broker.get_results_backend())


def census(url: str, project_id: str, services: dict[str, StandinService]) -> dict[str, Any]:
    return {
        "databases": query(url, "SELECT count(*) AS n FROM pg_database WHERE datname = %s",
                           (f"p_{project_id}",))[0]["n"],
        "roles": query(url, "SELECT count(*) AS n FROM pg_roles WHERE rolname LIKE %s",
                       (f"p\\_{project_id}\\_%",))[0]["n"],
        "registrations": {name: list(s.tenants) for name, s in services.items()},
        "keys": query(url, "SELECT count(*) AS n FROM control_plane.api_keys WHERE project_id = %s",
                      (project_id,))[0]["n"],
    }


def test_a_projects_later_steps_and_undoing_are_claimed_before_new_requests(db_url: str) -> None:
    # Given, in the provisioning queue, a new project's request, then (as the workflow sends
    # them) another project's first and fifth steps, and a third's undoing
    entry = workflow.provision_project.send({"project_id": "newcomer", "tenant_id": "t", "region": "us-east-1"})
    roles = workflow._STEP_ACTORS["roles"].send("started", None)
    api_keys = workflow._STEP_ACTORS["api_keys"].send("started", None)
    undo = workflow.compensate.send({"actor_name": "provision_project.schema", "args": ["failed", None]},
                                    {"message": "boom"})  # fmt: skip
    # When a worker takes them one by one
    order = []
    for _ in range(4):
        consumer, held = claim_in_process(QUEUE)
        order.append(held.message_id)
        settle_in_process(consumer, held, "ack")
    # Then the undoing comes first, then the started project's later step, then its earlier one,
    # and the new request last (first in, first out, a burst of requests ran each step of
    # every project before any project's next one)
    assert order == [m.message_id for m in (undo, api_keys, roles, entry)]


def test_every_step_run_twice_leaves_exactly_one_of_everything(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    # Given a claimed project
    claimed(project)
    pid = project["project_id"]
    # When every step runs, and runs again as if its worker died before recording it
    for step in STEPS:
        run_step(step, pid)
        if step != "activate":
            query(db_url, "UPDATE control_plane.projects SET steps = steps - %s WHERE project_id = %s",
                  (step, pid))
            run_step(step, pid)
    # Then there is one database, two roles, one registration per service and 3 keys
    assert census(db_url, pid, services) == {
        "databases": 1, "roles": 2, "registrations": {n: [pid] for n in services}, "keys": 3,
    }
    assert query(db_url, "SELECT status FROM control_plane.projects WHERE project_id = %s",
                 (pid,))[0]["status"] == "active"


def test_a_worker_killed_after_create_database_resumes_cleanly(
    db_url: str, server_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    # Given the roles exist and CREATE DATABASE ran, but the worker died before anything else
    claimed(project)
    pid = project["project_id"]
    run_step("roles", pid)
    query(db_url, f'CREATE DATABASE "p_{pid}" OWNER "p_{pid}_owner" TEMPLATE template0')
    # When the database step runs again
    run_step("database", pid)
    # Then the database is recognised as ours, not duplicated, and locked down
    rows = query(db_url, "SELECT shobj_description(oid, 'pg_database') AS marker, datacl::text AS acl "
                         "FROM pg_database WHERE datname = %s", (f"p_{pid}",))
    assert len(rows) == 1
    assert rows[0]["marker"] == f"controlplane:project={pid}"
    entries = rows[0]["acl"].strip("{}").split(",")
    assert f"p_{pid}_app=Tc" in rows[0]["acl"]
    assert not [e for e in entries if e.startswith("=")]  # nothing granted to PUBLIC


def test_a_step_that_comes_before_the_one_ahead_of_it_is_done_does_nothing(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    # Given a run whose first step has not finished, and a services step of an earlier run of
    # the project id retried by hand (it carries the same run: the retried entry job kept its id)
    job_id = claimed(project)
    pid = project["project_id"]
    # When it runs
    result = run_step("services", pid, job_id)
    # Then it did nothing (no registration, no next step), and the run goes on from its first step
    assert result == {"skipped": "out of order: schema is not done"}
    assert all(not s.tenants for s in services.values())
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type LIKE 'provision_project.%'"
                         " AND type <> 'provision_project.roles'")[0]["n"] == 0  # fmt: skip
    for step in STEPS:
        run_step(step, pid, job_id)
    assert query(db_url, "SELECT status FROM control_plane.projects WHERE project_id = %s", (pid,))[0]["status"] == (
        "active"
    )


def test_a_compensation_that_meets_a_database_made_meanwhile_is_retried_not_given_up(
    db_url: str, server_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    from tasks.provision.roles import drop_roles

    # Given a project's roles, and its database committed by a database step still running
    # when a compensation racing it dropped the (then missing) database
    claimed(project)
    pid = project["project_id"]
    run_step("roles", pid)
    query(server_url, f'CREATE DATABASE "p_{pid}" OWNER "p_{pid}_owner" TEMPLATE template0')
    # When the compensation drops the roles
    # Then it is retried (its next attempt drops the database first), not failed for good,
    # which left the project needing an operator
    with pytest.raises(TransientError, match="still owns objects"):
        drop_roles(Settings.from_env(), validate(project))


def test_a_new_database_admits_no_one_until_it_is_locked_down(
    db_url: str, server_url: str, project: dict[str, Any], services: dict[str, StandinService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tasks.provision import database

    # Given a database step whose worker dies right after CREATE DATABASE (before the REVOKE
    # that takes CONNECT away from PUBLIC, which every role has on a new database)
    claimed(project)
    pid = project["project_id"]
    run_step("roles", pid)

    def killed(project_id: str) -> str:
        raise RuntimeError("worker killed")

    with monkeypatch.context() as patched, pytest.raises(RuntimeError, match="worker killed"):
        patched.setattr(database, "marker", killed)
        run_step("database", pid)
    # Then no role, another tenant's included, can connect to it meanwhile
    name = f"p_{pid}"
    assert query(server_url, "SELECT datallowconn FROM pg_database WHERE datname = %s", (name,)) == [
        {"datallowconn": False}
    ]
    with pytest.raises(psycopg2.OperationalError, match="not currently accepting connections"):
        psycopg2.connect(db.with_database(server_url, name)).close()
    # And the next run locks it down, then opens it to its app role alone
    run_step("database", pid)
    row = query(server_url, "SELECT datallowconn, datacl::text AS acl FROM pg_database WHERE datname = %s",
                (name,))[0]  # fmt: skip
    assert row["datallowconn"] is True
    assert f"p_{pid}_app=Tc" in row["acl"] and not any(e.startswith("=") for e in row["acl"].strip("{}").split(","))


def test_a_tenant_cannot_hold_up_another_projects_roles_step(
    db_url: str, server_url: str, project: dict[str, Any], services: dict[str, StandinService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from tasks.provision.secrets import lock_key

    # Given a roles step's lock key, which only holders of the pepper can compute
    pid = project["project_id"]
    assert lock_key(RESUME_PEPPER.encode(), "roles-step", pid) != lock_key(b"a-guessed-pepper", "roles-step", pid)
    # And projects provisioned on a tenant server whose maintenance database every role may
    # connect to, and a tenant there holding the advisory locks a roles step of the next project
    # would take if its key were computed without the pepper (this repository's code, a guessed
    # pepper) or spelled as it once was
    monkeypatch.setenv("PROVISION_DATABASE_URL", server_url)
    claimed(project)
    tenant = psycopg2.connect(server_url)
    failures: list[BaseException] = []

    def roles_step() -> None:
        try:
            run_step("roles", pid)
        except BaseException as exc:
            failures.append(exc)

    step = threading.Thread(target=roles_step)
    try:
        with tenant.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (lock_key(b"a-guessed-pepper", "roles-step", pid),))
            cur.execute("SELECT pg_advisory_lock(hashtext('controlplane:provision:roles:' || %s))", (pid,))
        # When the project's roles step runs (in a thread: if the tenant held its lock, it would wait)
        step.start()
        blocked = "SELECT count(*) AS n FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))"
        wait_for(lambda: not step.is_alive() or query(server_url, blocked, (tenant.info.backend_pid,))[0]["n"],
                 what="the roles step to finish or wait for the tenant")  # fmt: skip
        waited_for_the_tenant = step.is_alive()
    finally:
        tenant.close()  # lets a waiting step go on
        step.join()
    # Then it did not wait for the tenant: the lock it takes is one the tenant cannot name
    assert not waited_for_the_tenant
    # And it made the roles
    assert failures == []
    assert query(server_url, "SELECT count(*) AS n FROM pg_roles WHERE rolname IN (%s, %s)",
                 (f"p_{pid}_owner", f"p_{pid}_app"))[0]["n"] == 2  # fmt: skip


def test_a_tenant_reading_pg_locks_cannot_hold_up_a_roles_step_delivered_again(
    db_url: str, server_url: str, project: dict[str, Any], services: dict[str, StandinService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    from tasks.provision.roles import ensure_roles

    # Given a tenant server whose maintenance database (PROVISION_DATABASE_URL's) every role may
    # connect to, as PostgreSQL makes a database, and a tenant there: a login role with no privilege
    suffix = uuid.uuid4().hex[:8]
    maintenance, tenant_role = f"cp_t_maint_{suffix}", f"cp_t_tenant_{suffix}"
    query(server_url, f'CREATE DATABASE "{maintenance}"')
    query(server_url, f'CREATE ROLE "{tenant_role}" LOGIN')
    target = db.with_database(server_url, maintenance)
    monkeypatch.setenv("PROVISION_DATABASE_URL", target)
    pid = project["project_id"]
    claimed(project)
    tenant = psycopg2.connect(target, user=tenant_role)
    tenant.autocommit = True
    holder = psycopg2.connect(db_url)
    holder.autocommit = True
    failures: list[BaseException] = []
    threads: list[threading.Thread] = []

    def in_thread(step: Any) -> threading.Thread:
        def run() -> None:
            try:
                step()
            except BaseException as exc:
                failures.append(exc)
        thread = threading.Thread(target=run)
        thread.start()
        threads.append(thread)
        return thread

    def waits_for(pid_: int) -> Any:
        return query(server_url, "SELECT count(*) AS n FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                     (pid_,))[0]["n"]  # fmt: skip

    try:
        # And the project's roles step running, held a moment before its commit (the claim of
        # another caller holds the project's lock)
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(hashtext('controlplane:project:' || %s))", (pid,))
        with control_transaction() as conn:
            state = load(conn, pid)
        first = in_thread(lambda: ensure_roles(Settings.from_env(), state))
        wait_for(lambda: waits_for(holder.info.backend_pid), what="the roles step to wait for the project's lock")
        # When the tenant reads pg_locks (which every role may) for the advisory locks taken in
        # the database it is connected to, and the step goes on
        with tenant.cursor() as cur:
            cur.execute("SELECT classid::bigint, objid::bigint FROM pg_locks WHERE locktype = 'advisory' "
                        "AND objsubid = 1 AND granted AND pid <> pg_backend_pid() "
                        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
            seen = [(c << 32 | o) - (1 << 64 if c >= 1 << 31 else 0) for c, o in cur.fetchall()]
        holder.close()
        first.join()
        assert failures == []
        # and holds every key it saw, and the roles step is delivered again (its worker was lost
        # after the step's work, or it failed after it for a reason that passes)
        with tenant.cursor() as cur:
            for key in seen:
                cur.execute("SELECT pg_advisory_lock(%s)", (key,))
        again = in_thread(lambda: ensure_roles(Settings.from_env(), state))
        wait_for(lambda: not again.is_alive() or waits_for(tenant.info.backend_pid),
                 what="the roles step to finish or wait for the tenant")  # fmt: skip
        held_up = again.is_alive()
    finally:
        holder.close()
        tenant.close()  # lets a waiting step go on
        for thread in threads:
            thread.join()
        query(server_url, f'DROP DATABASE IF EXISTS "{maintenance}" WITH (FORCE)')
        query(server_url, f'DROP ROLE IF EXISTS "{tenant_role}"')
    # Then the step did not wait for the tenant: a key it can read is none it can take
    assert not held_up, f"the roles step waited for a tenant holding the keys it read from pg_locks: {seen}"
    assert failures == []


def test_a_process_with_another_pepper_derives_nothing_and_reveals_nothing(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService],
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from tasks.errors import ConfigurationError
    from tasks.provision import secrets
    from tasks.provision.keys import reveal_secrets

    monkeypatch.setattr(secrets, "_checked", set())  # (this process's memory of earlier tests' databases)
    # Given a project provisioned by workers with one pepper
    claimed(project)
    pid = project["project_id"]
    for step in STEPS:
        run_step(step, pid)
    # When a process without API_KEY_PEPPER, started in another directory, reveals its secrets
    monkeypatch.delenv("API_KEY_PEPPER")
    elsewhere = Settings.from_env({"DATABASE_URL": db_url, "CONTROLPLANE_HOME": str(tmp_path / "elsewhere")})
    with pytest.raises(ConfigurationError, match=r"api-key-pepper, made just now\) is not the one this deployment"):
        reveal_secrets(elsewhere, pid)
    # Then it left no pepper of its own behind, nor took the secrets: the workers' pepper reveals them
    assert not (tmp_path / "elsewhere" / "api-key-pepper").exists()
    monkeypatch.setenv("API_KEY_PEPPER", RESUME_PEPPER)
    revealed = reveal_secrets(Settings.from_env(), pid)
    assert len(revealed["api_keys"]) == 3
    # And a worker given another pepper outright refuses its steps the same way
    with pytest.raises(ConfigurationError, match=r"\(API_KEY_PEPPER\) is not the one"):
        secrets_pepper(Settings.from_env({"DATABASE_URL": db_url, "API_KEY_PEPPER": "another"}))


def test_a_deployment_upgraded_to_the_pepper_check_is_not_given_a_wrong_pepper(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService],
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    from tasks.errors import ConfigurationError
    from tasks.provision import secrets
    from tasks.provision.keys import reveal_secrets

    monkeypatch.setattr(secrets, "_checked", set())
    # Given a project provisioned before migration 0013 (no pepper recorded)
    claimed(project)
    pid = project["project_id"]
    for step in STEPS:
        run_step(step, pid)
    query(db_url, "DELETE FROM control_plane.deployment")
    monkeypatch.delenv("API_KEY_PEPPER")
    # When the first process to use a pepper since is a reveal with another one, or a process
    # started in another directory (a pepper file made just now)
    for home in ("reveal", "worker"):
        monkeypatch.setattr(secrets, "_checked", set())
        other = Settings.from_env({"DATABASE_URL": db_url, "CONTROLPLANE_HOME": str(tmp_path / home)})
        with pytest.raises(ConfigurationError, match="pepper"):
            if home == "reveal":
                reveal_secrets(other, pid)
            else:
                secrets_pepper(other)
    # Then neither was recorded as the deployment's, the secrets are still there, and the
    # workers' pepper reveals them (and becomes the deployment's at its next step)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.deployment")[0]["n"] == 0
    monkeypatch.setenv("API_KEY_PEPPER", RESUME_PEPPER)
    assert len(reveal_secrets(Settings.from_env(), pid)["api_keys"]) == 3


def test_a_new_deployment_refuses_a_short_pepper_and_one_with_keys_keeps_its_own(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from tasks.errors import ConfigurationError
    from tasks.provision import secrets

    monkeypatch.setattr(secrets, "_checked", set())
    deployment = "SELECT count(*) AS n FROM control_plane.deployment"
    # Given a new deployment (no pepper recorded, no API key yet)
    assert query(db_url, deployment)[0]["n"] == 0
    # When its first step runs with a guessable pepper
    short = Settings.from_env({"DATABASE_URL": db_url, "API_KEY_PEPPER": "changeme"})
    with pytest.raises(ConfigurationError, match=r"\(API_KEY_PEPPER\) is 8 bytes: a new deployment's must be at "
                                                 r"least 32 random bytes"):  # fmt: skip
        secrets_pepper(short)
    # Then it derives nothing and records nothing: the deployment is still free to take a good one
    assert query(db_url, deployment)[0]["n"] == 0
    # And a deployment whose keys were made before this check, with no pepper recorded (upgraded
    # from before migration 0013), keeps the pepper it has, short or not (another would void every
    # key), with a warning in the log
    claimed(project)
    for step in STEPS:
        run_step(step, project["project_id"])
    query(db_url, "DELETE FROM control_plane.deployment")
    monkeypatch.setattr(secrets, "_checked", set())
    with caplog.at_level(logging.WARNING, logger="tasks.provision.secrets"):
        assert secrets_pepper(short) == b"changeme"
    assert query(db_url, deployment)[0]["n"] == 1
    assert "(API_KEY_PEPPER) is 8 bytes: a copy of the control plane's tables is enough to guess" in caplog.text


def test_someone_elses_database_of_that_name_is_a_conflict_and_survives_compensation(
    db_url: str, server_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    # Given a database named like the project's, owned by someone else
    claimed(project)
    pid = project["project_id"]
    run_step("roles", pid)
    query(db_url, f'CREATE DATABASE "p_{pid}"')
    # When the database step runs, it refuses to touch it
    with pytest.raises(Conflict, match="does not belong"):
        run_step("database", pid)
    # And compensation removes our roles but leaves that database alone
    compensate_project(Settings.from_env(), pid, "test")
    assert query(db_url, "SELECT count(*) AS n FROM pg_database WHERE datname = %s", (f"p_{pid}",))[0]["n"] == 1
    assert query(db_url, "SELECT count(*) AS n FROM pg_roles WHERE rolname LIKE %s", (f"p\\_{pid}\\_%",))[0]["n"] == 0


def test_a_message_of_an_undone_run_does_not_touch_the_next_run_of_the_same_project_id(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    # Given a first run of the project, failed and undone (its id freed)
    first = claimed(project)
    pid = project["project_id"]
    run_step("roles", pid, first)
    compensate_project(Settings.from_env(), pid, "step provision_project.database failed: boom", first)
    # And a second run of the same id, with the same payload, through its schema step
    second = claimed(project)
    for step in ("roles", "database", "schema"):
        run_step(step, pid, second)
    before = census(db_url, pid, services)
    steps_before = load_steps(pid)
    # When the first run's compensate message is delivered again, and so is one of its steps
    again = compensate_project(Settings.from_env(), pid, "step provision_project.database failed: boom", first)
    late = run_step("services", pid, first)
    # Then neither acts on the second run: its database and roles stay, no step is marked or sent
    assert "skipped" in again and late == {"skipped": "superseded"}
    assert census(db_url, pid, services) == before and before["databases"] == 1 and before["roles"] == 2
    assert load_steps(pid) == steps_before
    with control_transaction() as conn:
        state = load(conn, pid)
    assert state is not None and state.status == "provisioning" and state.job_id == second
    # And the second run's own compensation still undoes it
    compensate_project(Settings.from_env(), pid, "step provision_project.services failed: boom", second)
    assert census(db_url, pid, services)["databases"] == 0


def test_a_retried_entry_job_starts_a_run_that_the_undone_runs_late_messages_leave_alone(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    from tasks.provision.roles import ensure_roles

    # Given a provision_project job that claimed a run, which failed and was undone (its caller's
    # job failed with the reason), while that run's roles step, which had read the project, went on
    pid = project["project_id"]
    entry = str(uuid.uuid4())
    query(db_url, "INSERT INTO control_plane.jobs (id, type, queue, status, attempts, payload) "
                  "VALUES (%s, 'provision_project', 'provisioning', 'running', 1, %s)",
          (entry, json.dumps({"args": [project], "kwargs": {}})))  # fmt: skip
    workflow._claim_and_start(Settings.from_env(), validate(project), entry)
    query(db_url, "UPDATE control_plane.jobs SET status = 'completed' WHERE id = %s", (entry,))
    with control_transaction() as conn:
        straggler = load(conn, pid)
    assert straggler is not None and straggler.job_id == entry
    run_step("roles", pid, entry)
    compensate_project(Settings.from_env(), pid, "step provision_project.database failed: boom", entry)
    assert query(db_url, "SELECT status FROM control_plane.jobs WHERE id = %s", (entry,))[0]["status"] == "failed"
    # When an operator retries that job, as docs/provisioning.md says to (it keeps its id), and
    # the new run goes through its schema step
    assert query(db_url, "SELECT control_plane.retry_job(%s) AS ok", (entry,))[0]["ok"]
    workflow._claim_and_start(Settings.from_env(), validate(project), entry)
    query(db_url, "UPDATE control_plane.jobs SET status = 'completed' WHERE id = %s", (entry,))
    with control_transaction() as conn:
        second = load(conn, pid)
    assert second is not None and second.status == "provisioning"
    for step in ("roles", "database", "schema"):
        run_step(step, pid, second.job_id)
    before = census(db_url, pid, services)
    # And the undone run's late roles step lands, and its compensate message is delivered again
    late_roles = ensure_roles(Settings.from_env(), straggler)
    again = compensate_project(Settings.from_env(), pid, "step provision_project.database failed: boom", entry)
    # Then neither touched the new run: it is still provisioning, its database and roles are there
    assert "skipped" in again, f"the undone run's compensation undid the new run: {again}"
    assert census(db_url, pid, services) == before and before["databases"] == 1 and before["roles"] == 2
    assert late_roles.get("skipped") == "superseded", late_roles
    with control_transaction() as conn:
        state = load(conn, pid)
    assert state is not None and state.status == "provisioning"
    # And the new run goes on to the end, and the retried job's caller is told its result
    for step in STEPS[3:]:
        run_step(step, pid, second.job_id)
    result = told(entry)
    assert result["status"] == "active" and result["project_id"] == pid
    # with the password its app role has
    from tasks.provision import reveal_secrets

    revealed = reveal_secrets(Settings.from_env(), pid)
    assert scram_matches(app_verifier(db_url, pid), revealed["database_password"])


def undone_run(project: dict[str, Any]) -> Any:
    """Claim a run of ``project``, undo it, and return its state as its late steps still hold it."""
    first = claimed(project)
    with control_transaction() as conn:
        state = load(conn, project["project_id"])
    assert state is not None
    compensate_project(Settings.from_env(), project["project_id"], "step provision_project.roles failed: lease lost",
                       first)  # fmt: skip
    return state


def test_the_secrets_nonce_is_in_no_statement_the_claim_sends(db_url: str, project: dict[str, Any]) -> None:
    from psycopg2.extras import LoggingConnection

    # Given a connection that keeps the text of every statement it sends, as a server logging
    # statements (log_statement = 'mod', a slow or a failed one) or pg_stat_activity would show it
    sent = io.StringIO()
    conn = psycopg2.connect(db_url, connection_factory=LoggingConnection)
    conn.initialize(sent)
    try:
        # When a project is claimed on it
        with conn:
            state, created = claim(conn, validate(project), str(uuid.uuid4()), Settings.from_env())
    finally:
        conn.close()
    # Then the project has a nonce of its own (32 bytes, none like another project's)
    assert created and state.secret_nonce is not None and len(state.secret_nonce) == 32
    (stored,) = query(db_url, "SELECT secret_nonce FROM control_plane.projects WHERE project_id = %s",
                      (project["project_id"],))  # fmt: skip
    assert bytes(stored["secret_nonce"]) == state.secret_nonce
    # And no statement sent carried it (with the pepper it would give every secret of the project,
    # even after reveal_secrets erased it from the row)
    text = sent.getvalue()
    assert "INSERT INTO control_plane.projects" in text
    assert state.secret_nonce.hex() not in text.lower()


def test_roles_an_undone_run_left_behind_get_the_next_runs_password(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    from tasks.provision import reveal_secrets
    from tasks.provision.roles import _create_roles
    from tasks.provision.secrets import database_password, pepper
    from tasks.provision.target import session

    # Given a first run undone while its roles step was still running: that step had found the
    # project its own before the undoing began, and its roles land after they were dropped
    straggler = undone_run(project)
    pid = project["project_id"]
    assert straggler.secret_nonce is not None
    old_password = database_password(pepper(Settings.from_env()), pid, straggler.secret_nonce)
    with session(Settings.from_env(), autocommit=False) as conn:
        _create_roles(Settings.from_env(), straggler, conn, f"p_{pid}_owner", f"p_{pid}_app", old_password)
    # When the project id is provisioned again, to the end
    second = claimed(project)
    for step in STEPS:
        run_step(step, pid, second)
    # Then the password its caller reads is the app role's (checked against the stored SCRAM
    # verifier: this server trusts loopback connections, so a login would prove nothing)
    revealed = reveal_secrets(Settings.from_env(), pid)
    assert scram_matches(app_verifier(db_url, pid), revealed["database_password"])


def test_a_late_step_of_an_undone_run_leaves_the_next_runs_secrets_alone(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    from tasks.provision import reveal_secrets
    from tasks.provision.apikeys import hash_key
    from tasks.provision.keys import ensure_api_keys
    from tasks.provision.register import register_services
    from tasks.provision.roles import ensure_roles
    from tasks.provision.secrets import pepper

    # Given a first run undone, and a second run of the id through its roles step (still provisioning)
    straggler = undone_run(project)
    pid = project["project_id"]
    second = claimed(project)
    run_step("roles", pid, second)
    # When the first run's roles and api_keys steps come late, with the first run's secrets
    puts_before = sum(len(s.request_log) for s in services.values())
    late = [ensure_roles(Settings.from_env(), straggler), ensure_api_keys(Settings.from_env(), straggler),
            register_services(Settings.from_env(), straggler)]  # fmt: skip
    puts_after = sum(len(s.request_log) for s in services.values())
    # and the second run goes on to the end
    for step in STEPS[1:]:
        run_step(step, pid, second)
    # Then the late steps did nothing, and the secrets the second run's caller reads are the stored ones
    assert [r.get("skipped") for r in late] == ["superseded", "superseded", "superseded"]
    assert puts_after == puts_before  # no registration that nobody would know to undo
    revealed = reveal_secrets(Settings.from_env(), pid)
    assert scram_matches(app_verifier(db_url, pid), revealed["database_password"])
    stored = {r["key_hash"] for r in query(db_url, "SELECT key_hash FROM control_plane.api_keys WHERE project_id = %s",
                                             (pid,))}  # fmt: skip
    key = pepper(Settings.from_env())
    assert {hash_key(k, key) for k in revealed["api_keys"]} == stored


def through_schema(project: dict[str, Any]) -> Any:
    """Claim a run of ``project`` and run its steps up to the services step; its state as that step gets it."""
    run = claimed(project)
    for step in ("roles", "database", "schema"):
        run_step(step, project["project_id"], run)
    with control_transaction() as conn:
        state = load(conn, project["project_id"])
    assert state is not None
    return state


def test_a_services_step_that_comes_while_its_run_is_undone_registers_nothing(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    from tasks.provision.register import register_services

    # Given a run through its schema step, whose compensation has begun (it read the services touched)
    late = through_schema(project)
    pid = project["project_id"]
    query(db_url, "UPDATE control_plane.projects SET status = 'compensating' WHERE project_id = %s", (pid,))
    # When the run's services step comes now (it was past its own check when the undoing began)
    done = register_services(Settings.from_env(), late)
    # Then it registers with no service: nothing would deregister it
    assert done.get("skipped") == "superseded"
    assert [s.request_log for s in services.values()] == [[], [], []]


def test_a_registration_whose_run_is_undone_during_its_put_is_deregistered_even_if_a_delete_fails(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from tasks.provision import register

    # Given a run at its services step, whose step fails elsewhere while its PUT to auth is in
    # flight (its compensation begins), and an auth service whose next answer after the PUT is a 500
    project = {**project, "services": {"auth": True, "realtime": False, "storage": False}}
    state = through_schema(project)
    pid, run = project["project_id"], state.job_id
    put = register.ServiceClient.put_tenant
    outcomes: dict[str, Any] = {}

    def compensation() -> None:
        try:
            outcomes["compensation"] = compensate_project(Settings.from_env(), pid, "another step failed", run)
        except Exception as exc:
            outcomes["compensation"] = exc

    undoing = threading.Thread(target=compensation)

    def put_while_the_undoing_begins(self: Any, project_id: str, body: dict[str, Any]) -> Any:
        undoing.start()
        wait_for(lambda: not undoing.is_alive() or query(
            db_url, "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            ("%compensating%",))[0]["n"], what="the compensation to begin, or to wait for the PUT")  # fmt: skip
        answer = put(self, project_id, body)
        services["auth"].set_faults(fail_times=1)
        return answer

    monkeypatch.setattr(register.ServiceClient, "put_tenant", put_while_the_undoing_begins)
    # When the step and the compensation run, and each that fails is retried as the queue would
    try:
        outcomes["step"] = register.register_services(Settings.from_env(), state)
    except Exception as exc:
        outcomes["step"] = exc
        outcomes["step retried"] = run_step("services", pid, run)
    undoing.join()
    if isinstance(outcomes["compensation"], Exception):
        outcomes["compensation retried"] = compensate_project(Settings.from_env(), pid, "another step failed", run)
    # Then the project is undone and no tenant is left registered at auth that nobody would remove
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.projects WHERE project_id = %s", (pid,)) == [{"n": 0}]
    assert services["auth"].tenants == {}, (outcomes, services["auth"].request_log)


def test_a_run_sent_in_capitals_is_the_same_run(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    # Given a project claimed by a job whose id a client sent in capitals
    run = claimed(project)
    # When its first step carries the id as the client wrote it
    done = run_step("roles", project["project_id"], run.upper())
    # Then it is the same run: the step ran
    assert done.get("skipped") is None and done["step"] == "roles"


def app_verifier(url: str, project_id: str) -> str:
    rows = query(url, "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (f"p_{project_id}_app",))
    return str(rows[0]["rolpassword"])


def scram_matches(verifier: str, password: str) -> bool:
    """Whether ``password`` made a ``SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey`` verifier."""
    import base64
    import hashlib
    import hmac

    scheme, rest = verifier.split("$", 1)
    counts, keys = rest.split("$")
    iterations, salt = counts.split(":")
    stored_key = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    return scheme == "SCRAM-SHA-256" and hashlib.sha256(client_key).digest() == base64.b64decode(stored_key)


def load_steps(project_id: str) -> Any:
    with control_transaction() as conn:
        state = load(conn, project_id)
    return state.steps if state is not None else None


def test_compensation_is_idempotent(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    claimed(project)
    pid = project["project_id"]
    for step in STEPS[:-1]:
        run_step(step, pid)
    compensate_project(Settings.from_env(), pid, "first")
    again = compensate_project(Settings.from_env(), pid, "second")
    assert "skipped" in again
    assert census(db_url, pid, services) == {
        "databases": 0, "roles": 0, "registrations": {n: [] for n in services}, "keys": 0,
    }


@pytest.mark.parametrize(("code", "kind"), [
    ("55006", TransientError),  # template1 is being accessed by other users
    ("55P03", TransientError),  # lock_timeout
    ("57014", TransientError),  # statement_timeout
    ("42501", PermanentError),  # insufficient privilege
    ("XX000", PermanentError),  # internal_error, unless it is the catalog race below
])
def test_postgres_errors_are_classified(db_url: str, code: str, kind: type[Exception]) -> None:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.Error) as caught:
            cur.execute(sql.SQL("DO $$ BEGIN RAISE EXCEPTION 'x' USING ERRCODE = {}; END $$").format(
                sql.Literal(code)))
    finally:
        conn.close()
    assert type(classify(caught.value, "testing")) is kind


def test_a_catalog_row_updated_by_two_sessions_at_once_is_transient(db_url: str) -> None:
    conn = psycopg2.connect(db_url)
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.Error) as caught:
            cur.execute("DO $$ BEGIN RAISE EXCEPTION 'tuple concurrently updated' USING ERRCODE = 'XX000'; END $$")
    finally:
        conn.close()
    assert type(classify(caught.value, "testing")) is TransientError


def test_every_step_is_an_actor_with_a_stable_name_on_its_queue() -> None:
    import tasks

    names = {"provision_project", *(f"provision_project.{s}" for s in STEPS),
             "provision_project.compensate", "provision_project.compensation_failed"}
    assert names <= set(tasks.broker.actors)
    assert {tasks.broker.actors[n].queue_name for n in names} == {"provisioning"}


def test_a_control_role_without_superuser_provisions_and_undoes(
    db_url: str, server_url: str, project: dict[str, Any], services: dict[str, StandinService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given the provisioning server is reached as a role with only CREATEDB and CREATEROLE
    role = "cp_min_" + uuid.uuid4().hex[:8]
    query(server_url, f'CREATE ROLE "{role}" LOGIN CREATEDB CREATEROLE NOSUPERUSER')
    from sqlalchemy.engine import make_url

    target = make_url(server_url).set(username=role).render_as_string(hide_password=False)
    monkeypatch.setenv("PROVISION_DATABASE_URL", target)
    pid = project["project_id"]
    try:
        claimed(project)
        # When every step runs
        for step in STEPS:
            run_step(step, pid)
        # Then the project is real, and owned by the project's roles, not by the control role
        rows = query(db_url, "SELECT pg_get_userbyid(datdba) AS owner FROM pg_database WHERE datname = %s",
                     (f"p_{pid}",))
        assert rows == [{"owner": f"p_{pid}_owner"}]
        assert query(db_url, "SELECT status FROM control_plane.projects WHERE project_id = %s",
                     (pid,))[0]["status"] == "active"
        # And the same role can undo all of it
        query(db_url, "UPDATE control_plane.projects SET status = 'provisioning' WHERE project_id = %s", (pid,))
        compensate_project(Settings.from_env(), pid, "test")
        assert census(db_url, pid, services)["databases"] == 0
        assert census(db_url, pid, services)["roles"] == 0
    finally:
        query(server_url, f'DROP DATABASE IF EXISTS "p_{pid}" WITH (FORCE)')
        for r in (f"p_{pid}_app", f"p_{pid}_owner"):
            query(server_url, f'DROP ROLE IF EXISTS "{r}"')
        query(server_url, f'DROP ROLE IF EXISTS "{role}"')


def test_two_sends_for_one_project_make_one_live_job(db_url: str) -> None:
    # Given no worker has picked up a provisioning yet
    from tasks.provision import provision_project

    body = {"project_id": "uniq_" + uuid.uuid4().hex[:6], "tenant_id": "t", "region": "eu-west"}
    # When the same project is sent twice (a double-clicked button), keys in another order the second time
    first = provision_project.send(body)
    second = provision_project.send(dict(reversed(body.items())))
    # Then the second send returns the first job: one job, keyed by the project and its payload
    assert second.message_id == first.message_id
    rows = query(db_url, "SELECT unique_key FROM control_plane.jobs")
    assert len(rows) == 1 and rows[0]["unique_key"].startswith(f"provision_project:{body['project_id']}:")


def test_a_different_payload_for_a_project_being_provisioned_is_a_conflict_not_the_first_job(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    from tasks.provision import provision_project

    # Given a provisioning sent and not yet picked up
    first = provision_project.send(project)
    # When the same project id is sent with another payload
    other = {**project, "region": "us-east-1", "api_key_count": 1}
    second = provision_project.send(other)
    # Then that send is a job of its own, not the first one (whose outcome it would take for its own)
    assert second.message_id != first.message_id
    # And when both run, the first claims the project and the second is refused with a Conflict
    claimed(project)
    with pytest.raises(Conflict, match="different payload"):
        claimed(other)


def test_a_project_whose_pending_step_was_cancelled_is_swept_into_compensation(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    from tasks.provision import sweep_orphans

    # Given a project half provisioned whose next step an operator cancelled while it was pending
    claimed(project)
    pid = project["project_id"]
    run_step("roles", pid)
    run_step("database", pid)
    # (steps ran in this process, so the messages they sent are all still pending: cancel them all)
    pending = query(db_url, "SELECT id FROM control_plane.jobs WHERE status = 'pending'")
    assert {r["r"] for r in query(db_url, "SELECT control_plane.cancel_job(id) AS r FROM control_plane.jobs "
                                          "WHERE status = 'pending'")} == {"cancelled"}
    assert pending
    # When the sweeper runs
    swept = sweep_orphans(Settings.from_env(), older_than_seconds=0)
    # Then it hands the project to compensation (once), and compensation undoes it
    assert swept == [pid]
    assert sweep_orphans(Settings.from_env(), older_than_seconds=0) == []  # the compensate job is live now
    compensate_project(Settings.from_env(), pid, "swept")
    assert census(db_url, pid, services) == {
        "databases": 0, "roles": 0, "registrations": {n: [] for n in services}, "keys": 0,
    }


def test_a_step_delivered_again_after_it_finished_does_not_fork_the_chain(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    # Given the roles step finished and handed over to the database step
    claimed(project)
    pid = project["project_id"]
    run_step("roles", pid)
    # When the roles step is delivered again (its worker died after the step's last commit)
    run_step("roles", pid)
    # Then there is still exactly one database step
    rows = query(db_url, "SELECT count(*) AS n FROM control_plane.jobs WHERE type = 'provision_project.database'")
    assert rows[0]["n"] == 1


def test_every_caller_of_a_project_hears_its_outcome(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    # Given a project claimed by a first job, and the same payload sent again while it provisions
    first = claimed(project)
    pid = project["project_id"]
    run_step("roles", pid)
    second = claimed(project)
    claimed_again = claimed(project)  # (a third, and a retry of it must not count twice)
    with control_transaction() as conn:
        claim(conn, validate(project), claimed_again, Settings.from_env())
    assert query(db_url, "SELECT cardinality(waiting_job_ids) AS n FROM control_plane.projects "
                         "WHERE project_id = %s", (pid,))[0]["n"] == 2
    # When the rest of the steps run
    for step in STEPS[1:]:
        run_step(step, pid)
    # Then every caller gets the full result, the first as before
    results = [told(job_id) for job_id in (first, second, claimed_again)]
    assert results[0]["status"] == "active" and results[0]["project_id"] == pid
    assert results[1] == results[0] and results[2] == results[0]


def test_every_caller_of_a_failed_project_hears_the_failure(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    # Given a project half provisioned, sent twice
    first = claimed(project)
    pid = project["project_id"]
    run_step("roles", pid)
    second = claimed(project)
    # When its workflow fails for good and is undone
    compensate_project(Settings.from_env(), pid, "step provision_project.database failed: boom")
    # Then both callers' get_result raise the reason
    for job_id in (first, second):
        with pytest.raises(ResultFailure, match=r"provisioning failed and was undone: step .*boom"):
            told(job_id)


def test_an_activation_that_cannot_deliver_its_result_is_undone_and_its_retry_delivers(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.results import PostgresBackend

    # Given a project whose steps all ran but the last
    first = claimed(project)
    pid = project["project_id"]
    for step in STEPS[:-1]:
        run_step(step, pid)
    # When activation fails while delivering the result (a lost connection, say)
    store_in = PostgresBackend.store_in

    def broken(*args: Any, **kwargs: Any) -> None:
        raise psycopg2.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(PostgresBackend, "store_in", broken)
    with pytest.raises(psycopg2.OperationalError):
        run_step("activate", pid)
    # Then nothing of it stays: the project is not active, so the step's retry is not skipped
    assert query(db_url, "SELECT status FROM control_plane.projects WHERE project_id = %s",
                 (pid,))[0]["status"] == "provisioning"
    with pytest.raises(ResultMissing):
        told(first)
    # And the retry activates and delivers
    monkeypatch.setattr(PostgresBackend, "store_in", store_in)
    run_step("activate", pid)
    assert told(first)["status"] == "active"


def test_a_compensation_that_cannot_deliver_its_failure_is_undone_and_its_retry_delivers(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.results import PostgresBackend

    first = claimed(project)
    pid = project["project_id"]
    run_step("roles", pid)
    store_in = PostgresBackend.store_in

    def broken(*args: Any, **kwargs: Any) -> None:
        raise psycopg2.OperationalError("server closed the connection unexpectedly")

    # When compensation fails while delivering the failure
    monkeypatch.setattr(PostgresBackend, "store_in", broken)
    with pytest.raises(psycopg2.OperationalError):
        compensate_project(Settings.from_env(), pid, "first")
    # Then the project row (and so the callers to tell) is still there, and the retry tells them
    assert query(db_url, "SELECT status FROM control_plane.projects WHERE project_id = %s",
                 (pid,))[0]["status"] == "compensating"
    monkeypatch.setattr(PostgresBackend, "store_in", store_in)
    compensate_project(Settings.from_env(), pid, "second")
    with pytest.raises(ResultFailure, match="provisioning failed and was undone"):
        told(first)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.projects WHERE project_id = %s",
                 (pid,))[0]["n"] == 0


def test_secrets_expired_unread_are_erased_by_a_late_reveal_and_by_the_sweep(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    from tasks.provision import forget_expired_secrets, reveal_secrets

    # Given two active projects whose secrets expired unread, and a third still provisioning
    late = project
    never = {**project, "project_id": project["project_id"] + "n"}
    busy = {**project, "project_id": project["project_id"] + "b"}
    try:
        for body in (late, never, busy):
            claimed(body)
        for body in (late, never):
            for step in STEPS:
                run_step(step, body["project_id"])
        query(db_url, "UPDATE control_plane.projects SET secrets_expire_at = now() - interval '1 second'")

        def nonce(body: dict[str, Any]) -> bool:
            return bool(query(db_url, "SELECT secret_nonce IS NOT NULL AS has FROM control_plane.projects "
                                      "WHERE project_id = %s", (body["project_id"],))[0]["has"])

        # When the caller of one comes too late
        with pytest.raises(PermanentError, match="expired unread"):
            reveal_secrets(Settings.from_env(), late["project_id"])
        # Then its nonce is gone with the refusal (nobody can derive its keys any more)
        assert not nonce(late)
        with pytest.raises(PermanentError, match="already read"):
            reveal_secrets(Settings.from_env(), late["project_id"])
        # And the sweep erases the one nobody came for, and leaves the one whose steps still need it
        assert forget_expired_secrets() == [never["project_id"]]
        assert not nonce(never) and nonce(busy)
    finally:
        for body in (never, busy):
            query(db_url, f'DROP DATABASE IF EXISTS "p_{body["project_id"]}" WITH (FORCE)')
            for role in (f'p_{body["project_id"]}_app', f'p_{body["project_id"]}_owner'):
                query(db_url, f'DROP ROLE IF EXISTS "{role}"')


def test_a_provision_that_took_longer_than_the_secrets_ttl_reveals_its_secrets_once_active(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    from tasks.provision import reveal_secrets

    # Given a project whose provisioning took longer than PROVISION_SECRETS_TTL_SECONDS from
    # its claim (a service out for a day, provisioning paused meanwhile)
    pid = project["project_id"]
    claimed(project)
    for step in STEPS[:-1]:
        run_step(step, pid)
    query(db_url, "UPDATE control_plane.projects SET secrets_expire_at = now() - interval '1 second'")
    # When it goes active
    run_step(STEPS[-1], pid)
    # Then its caller can read its secrets for the TTL from then, once
    left = query(db_url, "SELECT extract(epoch FROM secrets_expire_at - now()) AS s FROM control_plane.projects "
                         "WHERE project_id = %s", (pid,))[0]["s"]  # fmt: skip
    assert 0 < left <= Settings.from_env().secrets_ttl_seconds
    revealed = reveal_secrets(Settings.from_env(), pid)
    assert len(revealed["api_keys"]) == project.get("api_key_count", len(revealed["api_keys"])) > 0
    with pytest.raises(PermanentError, match="already read"):
        reveal_secrets(Settings.from_env(), pid)


def test_a_step_delivered_twice_at_once_succeeds_in_both(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    from tasks.provision.roles import ensure_roles
    from tasks.provision.schema import ensure_schema

    # Given a claimed project, and a step running twice at the same time (its first worker was
    # cut off until its lease ran out, and another took the step while the first went on)
    claimed(project)
    pid = project["project_id"]

    def four_at_once(step: Any) -> list[Any]:
        with control_transaction() as conn:
            state = load(conn, pid)
        assert state is not None

        def run() -> str:
            step(Settings.from_env(), state)
            return "ok"

        return at_once(run, 4)

    # When the roles step and the schema step each run four times at once
    assert four_at_once(ensure_roles) == ["ok"] * 4
    run_step("roles", pid)  # (recorded done, as its worker would, before the next step runs)
    run_step("database", pid)
    assert four_at_once(ensure_schema) == ["ok"] * 4
    # Then each made its objects once, and none failed the workflow (which would undo it)
    assert census(db_url, pid, services)["roles"] == 2


@pytest.mark.parametrize(("removed", "reason"), [
    ("AUTH_SERVICE_URL", "AUTH_SERVICE_URL is no longer set"),
    # (a client refused for a missing token raised ValueError, which stopped the compensation
    # before it dropped the database and roles)
    ("AUTH_SERVICE_TOKEN", "auth: service token must be .*AUTH_SERVICE_TOKEN"),
])  # fmt: skip
def test_compensation_that_cannot_reach_a_service_it_registered_with_keeps_the_project_for_an_operator(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService], monkeypatch: pytest.MonkeyPatch,
    removed: str, reason: str,
) -> None:
    # Given a project registered with its services, whose auth URL or token was then removed from the settings
    claimed(project)
    pid = project["project_id"]
    for step in ("roles", "database", "schema", "services"):
        run_step(step, pid)
    value = os.environ[removed]
    monkeypatch.delenv(removed)
    # When it is compensated
    with pytest.raises(PermanentError, match=reason):
        compensate_project(Settings.from_env(), pid, "test")
    # Then the name is not freed over the registration left behind (an operator will look),
    # and what could be undone was
    assert query(db_url, "SELECT status FROM control_plane.projects WHERE project_id = %s",
                 (pid,))[0]["status"] == "compensating"
    assert census(db_url, pid, services) == {
        "databases": 0, "roles": 0, "registrations": {"auth": [pid], "realtime": [], "storage": []}, "keys": 0,
    }
    # When, marked for an operator (as compensation_failed does), an operator mends the setting
    # and follows docs/provisioning.md's recipe
    query(db_url, "UPDATE control_plane.projects SET status = 'needs_operator' WHERE project_id = %s", (pid,))
    monkeypatch.setenv(removed, value)
    query(db_url, "UPDATE control_plane.projects SET status = 'compensating' "
                  "WHERE project_id = %s AND status = 'needs_operator'", (pid,))  # fmt: skip
    compensate_project(Settings.from_env(), pid, "operator cleanup")
    # Then the registration is gone too, and so is the project: its name is free
    assert census(db_url, pid, services)["registrations"] == {"auth": [], "realtime": [], "storage": []}
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.projects WHERE project_id = %s", (pid,))[0]["n"] == 0


def test_a_service_url_without_its_token_fails_for_good_and_everything_else_is_undone(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a project whose auth token was removed from the settings before its services step
    claimed(project)
    pid = project["project_id"]
    for step in ("roles", "database", "schema"):
        run_step(step, pid)
    monkeypatch.delenv("AUTH_SERVICE_TOKEN")
    # When the step runs, Then it fails for good (a ValueError was retried, 8 attempts), naming the
    # settings and not their values
    with pytest.raises(PermanentError, match=r"auth: service token must be .*AUTH_SERVICE_TOKEN"):
        run_step("services", pid)
    # And its compensation undoes the rest, registering nothing
    compensate_project(Settings.from_env(), pid, "test")
    assert census(db_url, pid, services) == {
        "databases": 0, "roles": 0, "registrations": {"auth": [], "realtime": [], "storage": []}, "keys": 0,
    }


def test_an_app_role_found_again_gets_the_attributes_a_new_one_gets(
    db_url: str, server_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    # Given a project's app role as an older release or another connection limit left it
    claimed(project)
    pid = project["project_id"]
    run_step("roles", pid)
    app = f"p_{pid}_app"
    query(server_url, f'ALTER ROLE "{app}" INHERIT CONNECTION LIMIT -1')
    # When the roles step runs again (a redelivery, or a new run adopting the roles)
    query(db_url, "UPDATE control_plane.projects SET steps = steps - 'roles' WHERE project_id = %s", (pid,))
    run_step("roles", pid)
    # Then the role has what a new one gets: NOINHERIT and PROVISION_APP_CONNECTION_LIMIT (20)
    role = query(server_url, "SELECT rolinherit, rolconnlimit, rolcanlogin FROM pg_roles WHERE rolname = %s", (app,))
    assert role == [{"rolinherit": False, "rolconnlimit": 20, "rolcanlogin": True}]


@pytest.mark.parametrize("outcome", ["active", "undone"])
def test_a_caller_whose_completion_is_written_after_the_outcome_gets_it_from_the_sweep(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService], outcome: str
) -> None:
    from tasks.provision import reconcile_entry_jobs

    # Given a project provisioning, and a second caller's job that joined it and is still running
    claimed(project)
    pid = project["project_id"]
    run_step("roles", pid)
    second = str(uuid.uuid4())
    query(db_url, "INSERT INTO control_plane.jobs (id, type, queue, status) "
                  "VALUES (%s, 'provision_project', 'provisioning', 'running')", (second,))
    with control_transaction() as conn:
        claim(conn, validate(project), second, Settings.from_env())
    # When the outcome is delivered before that job's completion is written (which then writes
    # the accepted handle over nothing)
    if outcome == "active":
        for step in STEPS[1:]:
            run_step(step, pid)
    else:
        compensate_project(Settings.from_env(), pid, "step provision_project.database failed: boom")
    handle = json.dumps({"project_id": pid, "status": "provisioning", "job_id": None})
    query(db_url, "UPDATE control_plane.jobs SET status = 'completed', result = %s WHERE id = %s", (handle, second))
    # Then the sweep copies the outcome onto it, once
    assert reconcile_entry_jobs(Settings.from_env()) == [second]
    assert reconcile_entry_jobs(Settings.from_env()) == []
    row = query(db_url, "SELECT status, result, last_error FROM control_plane.jobs WHERE id = %s", (second,))[0]
    if outcome == "active":
        assert (row["status"], row["result"]) == ("completed", told(second))
    else:
        assert (row["status"], row["result"]) == ("failed", None)  # (not the handle it had completed with)
        assert row["last_error"] == "provisioning failed and was undone: step provision_project.database failed: boom"


def test_a_provision_url_keeps_its_own_libpq_options(db_url: str) -> None:
    from tasks.provision.target import session

    # Given PROVISION_DATABASE_URL with options of its own (as "-c role=..." would be)
    url = db_url + ("&" if "?" in db_url else "?") + "options=-c%20search_path%3Dcp_custom&application_name=ops"
    settings = Settings.from_env({"DATABASE_URL": db_url, "PROVISION_DATABASE_URL": url})
    # When a provisioning session opens
    with session(settings) as conn, conn.cursor() as cur:
        cur.execute("SELECT current_setting('search_path'), current_setting('statement_timeout'), "
                    "current_setting('application_name')")
        search_path, statement_timeout, application_name = cur.fetchone()
    # Then the URL's options hold, beside the provisioning's own timeouts
    assert (search_path, application_name) == ("cp_custom", "ops")
    assert statement_timeout == f"{Settings.from_env({}).provision_statement_timeout_ms // 1000}s"


def test_a_step_delivered_before_the_one_ahead_of_it_commits_waits_for_it(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService], monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from tasks.provision import workflow

    # Given a broker that delivers the next step before the transaction that sent it commits
    # (RabbitMQ publishes at once): the database step, sent by the roles step, runs at once
    job_id = claimed(project)
    pid = project["project_id"]
    outcome: list[dict[str, object]] = []
    early: list[threading.Thread] = []
    waiting = ("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
               "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")

    def delivered_at_once(project_id: str, run: str | None = None) -> None:
        thread = threading.Thread(target=lambda: outcome.append(run_step("database", project_id, run)))
        thread.start()
        early.append(thread)
        wait_for(lambda: not thread.is_alive() or query(db_url, waiting)[0]["n"] > 0,
                 what="the early step to finish or to wait for the one before it")  # fmt: skip

    monkeypatch.setattr(workflow._STEP_ACTORS["database"], "send", delivered_at_once)
    # When the roles step finishes and commits
    run_step("roles", pid, job_id)
    early[0].join(60)
    # Then the early database step ran (after the commit), instead of finding roles not done
    assert outcome and outcome[0].get("step") == "database", outcome


def test_a_step_delivered_before_its_claim_commits_waits_for_it(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService]
) -> None:
    import threading

    # Given a claim not yet committed (its transaction still open), and its first step
    # delivered meanwhile (a broker that cannot join the claim's transaction: RabbitMQ)
    job_id = str(uuid.uuid4())
    pid = project["project_id"]
    outcome: list[dict[str, object]] = []
    with control_transaction() as conn:
        claim(conn, validate(project), job_id, Settings.from_env())
        step = threading.Thread(target=lambda: outcome.append(run_step("roles", pid, job_id)))
        step.start()
        waiting = ("SELECT count(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
               "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
        wait_for(lambda: not step.is_alive() or query(db_url, waiting)[0]["n"] > 0,
                 what="the step to finish or to wait for the claim")  # fmt: skip
    # When the claim commits
    step.join(60)
    # Then the step ran for the claimed run, instead of finding the project gone
    assert outcome and outcome[0].get("skipped") is None, outcome
    assert outcome[0]["step"] == "roles"


def test_a_compensation_that_stops_half_way_has_revoked_the_projects_keys(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a project whose keys were issued (every step but activate ran), and whose compensation
    # will stop on a service it can no longer reach
    claimed(project)
    pid = project["project_id"]
    for step in ("roles", "database", "schema", "services", "api_keys"):
        run_step(step, pid)
    assert query(db_url, "SELECT count(*) AS n FROM control_plane.api_keys WHERE project_id = %s AND "
                         "revoked_at IS NULL", (pid,))[0]["n"] == 3
    monkeypatch.delenv("AUTH_SERVICE_URL")
    # When it is compensated, and fails
    with pytest.raises(PermanentError):
        compensate_project(Settings.from_env(), pid, "test")
    # Then the project keeps its row for an operator, but none of its keys is still valid
    keys = query(db_url, "SELECT slot, revoked_at FROM control_plane.api_keys WHERE project_id = %s ORDER BY slot",
                 (pid,))
    assert [k["slot"] for k in keys] == [1, 2, 3]
    assert all(k["revoked_at"] is not None for k in keys), keys


def test_a_claim_whose_first_step_cannot_be_sent_leaves_no_project(
    db_url: str, project: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the first step's send fails (the database refuses it, the connection drops)
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("send refused")

    monkeypatch.setattr(workflow._STEP_ACTORS["roles"], "send", refuse)
    # When provision_project claims the project
    with pytest.raises(RuntimeError, match="send refused"):
        workflow._claim_and_start(Settings.from_env(), validate(project), str(uuid.uuid4()))
    # Then the claim was rolled back with it: no project stuck 'provisioning' with no step to move it
    assert query(db_url, "SELECT status FROM control_plane.projects WHERE project_id = %s",
                 (project["project_id"],)) == []


def test_the_result_names_the_tenant_server_and_its_credentials_log_in_there(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.provision import reveal_secrets

    # Given a tenant server spelled differently from the control plane's URL (the same server here:
    # 127.0.0.1 as localhost, or the embedded server's socket directory with a trailing slash)
    target = psycopg2.extensions.parse_dsn(db_url)
    other = target["host"] + "/" if target["host"].startswith("/") else "localhost"
    assert target["host"] in ("127.0.0.1", other[:-1])
    port = int(target.get("port") or 5432)
    monkeypatch.setenv("PROVISION_DATABASE_URL", f"postgresql://{quote(target['user'])}@/{quote(target['dbname'])}"
                                                 f"?host={quote(other, safe='')}&port={port}")  # fmt: skip
    claimed(project)
    pid = project["project_id"]
    # When every step runs
    for step in STEPS:
        run_step(step, pid)
    result = query(db_url, "SELECT result FROM control_plane.projects WHERE project_id = %s", (pid,))[0]["result"]
    # Then the result names the tenant server, and the revealed password logs in with what it says
    database = result["database"]
    assert (database["host"], database["port"]) == (other, port)
    secrets = reveal_secrets(Settings.from_env(), pid)
    conn = psycopg2.connect(host=database["host"], port=database["port"], dbname=database["database"],
                            user=database["user"], password=secrets["database_password"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, current_schema()")
            assert cur.fetchone() == (database["user"], database["schema_name"])
    finally:
        conn.close()


#: A DBA's idle_in_transaction_session_timeout (docs/operations.md: "never touches a worker,
#: which never sits idle inside a transaction").
IDLE_MS = 1000


def _with_idle_timeout(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The workers' connections from now on run with the DBA's idle_in_transaction_session_timeout."""
    url = f"{db_url}{'&' if '?' in db_url else '?'}options=-c%20idle_in_transaction_session_timeout%3D{IDLE_MS}"
    monkeypatch.setenv("DATABASE_URL", url)
    tasks.broker.reconfigure(url)
    return url


def test_a_services_step_whose_put_outlasts_idle_in_transaction_session_timeout_still_registers(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a database whose sessions end after 1 s idle in a transaction, and a run at its
    # services step, whose auth service takes 2 s to answer (within SERVICE_TIMEOUT_SECONDS, 5 s)
    project = {**project, "services": {"auth": True, "realtime": False, "storage": False}}
    _with_idle_timeout(db_url, monkeypatch)
    pid = project["project_id"]
    run = claimed(project)
    for step in ("roles", "database", "schema"):
        run_step(step, pid, run)
    services["auth"].set_faults(hang_seconds=2 * IDLE_MS / 1000)
    # When the step runs (once, and once more as its retry would)
    errors = []
    for _ in range(2):
        try:
            run_step("services", pid, run)
            break
        except Exception as exc:
            errors.append(exc)
    # Then it is done: the PUT did not leave the run's row lock idle in a transaction the server ends
    with control_transaction() as conn:
        state = load(conn, pid)
    assert state is not None and (state.steps.get("services") or {}).get("done_at"), errors
    assert pid in services["auth"].tenants


def test_a_roles_step_whose_tenant_ddl_outlasts_idle_in_transaction_session_timeout_still_makes_the_roles(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tasks.provision.roles import ensure_roles

    # Given a database whose sessions end after 1 s idle in a transaction, a claimed run, and on
    # the tenant server another session making a role of the project's name, not yet committed
    # (the step's CREATE ROLE waits for it, within PROVISION_LOCK_TIMEOUT_MS, 5 s)
    url = _with_idle_timeout(db_url, monkeypatch)
    pid = project["project_id"]
    claimed(project)
    with control_transaction() as conn:
        state = load(conn, pid)
    blocker = psycopg2.connect(db_url)
    outcome: dict[str, Any] = {}

    def roles() -> None:
        try:
            outcome["done"] = ensure_roles(Settings.from_env(), state)
        except Exception as exc:
            outcome["error"] = exc

    def control_idle() -> list[dict[str, Any]]:
        return query(url, "SELECT pid, now() - state_change > make_interval(secs => %s) AS long FROM pg_stat_activity "
                          "WHERE datname = current_database() AND query LIKE '%%lock_timeout TO DEFAULT%%' "
                          "AND state = 'idle in transaction'", (2 * IDLE_MS / 1000,))  # fmt: skip

    try:
        with blocker.cursor() as cur:
            cur.execute(f'CREATE ROLE "p_{pid}_owner" NOLOGIN')
        step = threading.Thread(target=roles)
        step.start()
        # When the step waits on the tenant server, its control transaction (the roles step's lock)
        # idle meanwhile, until the server ends it or it has been idle twice the timeout
        wait_for(control_idle, what="the roles step's control transaction to sit idle")
        wait_for(lambda: not control_idle() or control_idle()[0]["long"], what="the server to end it, or not")
        blocker.rollback()
        step.join()
    finally:
        blocker.close()
    # Then the roles are made
    assert "error" not in outcome, outcome
    assert query(db_url, "SELECT count(*) AS n FROM pg_roles WHERE rolname IN (%s, %s)",
                 (f"p_{pid}_owner", f"p_{pid}_app"))[0]["n"] == 2  # fmt: skip


def test_a_roles_step_waits_for_another_delivery_of_it_no_longer_than_a_tenant_side_lock(
    db_url: str, project: dict[str, Any], services: dict[str, StandinService], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.provision.roles import ensure_roles
    from tasks.provision.secrets import lock_key

    # Given a claimed run whose roles step another delivery holds (its worker frozen mid-step: its
    # session lives on), and lock waits bounded at 200 ms (PROVISION_LOCK_TIMEOUT_MS)
    monkeypatch.setenv("PROVISION_LOCK_TIMEOUT_MS", "200")
    settings = Settings.from_env()
    pid = project["project_id"]
    claimed(project)
    with control_transaction() as conn:
        state = load(conn, pid)
    holder = psycopg2.connect(db_url)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (lock_key(secrets_pepper(settings), "roles-step", pid),))
        # When this delivery runs / Then it fails for now, to be retried, as a tenant-side lock wait did
        with pytest.raises(TransientError, match="waiting for another delivery of the roles step"):
            ensure_roles(settings, state)
    finally:
        holder.close()
    # And once the other lets go, it makes the roles
    assert ensure_roles(settings, state).get("skipped") is None
