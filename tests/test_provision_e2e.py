"""provision_project end to end: real worker processes, real databases and roles, real HTTP services.

One database, one worker and one set of stand-in services serve the whole
module; each test uses its own project ids (a per-module prefix), and the
tenant databases and roles are dropped at the end.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import psycopg2
import pytest
from dramatiq.results import ResultFailure

import tasks
from tasks import db
from tasks.provision import provision_project, reveal_secrets
from tasks.provision.standin import StandinService
from tasks.redaction import SECRET_PATTERN
from tasks.settings import Settings
from tests.support import Clones, WorkerProcess, job, query, wait_for

PEPPER = "test-pepper-" + uuid.uuid4().hex
PREFIX = "t" + uuid.uuid4().hex[:6]
TOKENS = {"auth": "auth-" + uuid.uuid4().hex, "realtime": "rt-" + uuid.uuid4().hex,
          "storage": "st-" + uuid.uuid4().hex}


def pid(name: str) -> str:
    return f"{PREFIX}_{name}"


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, StandinService]]:
    started = {name: StandinService(name, token) for name, token in TOKENS.items()}
    for s in started.values():
        s.start()
    try:
        yield started
    finally:
        for s in started.values():
            s.stop()


def service_env(services: dict[str, StandinService]) -> dict[str, str]:
    # 2 s: an answer a loaded machine delays past the client's timeout is retried, and the exact
    # attempt counts the tests assert would be off by one
    env = {"API_KEY_PEPPER": PEPPER, "SERVICE_TIMEOUT_SECONDS": "2"}
    for name, s in services.items():
        env[f"{name.upper()}_SERVICE_URL"] = s.url
        env[f"{name.upper()}_SERVICE_TOKEN"] = TOKENS[name]
    return env


@pytest.fixture(scope="module")
def pdb(server_url: str, clones: Clones, services: dict[str, StandinService],
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, WorkerProcess]]:
    name = clones.take()
    url = db.with_database(server_url, name)
    log = tmp_path_factory.mktemp("provision") / "worker.log"
    worker = WorkerProcess(url, processes=1, threads=4, module="tasks.provision", log_path=log,
                           extra_env=service_env(services))
    try:
        worker.wait_ready()
        yield url, worker
    finally:
        worker.terminate()
        tasks.broker.close()
        clones.give_back(name)
        drop_tenants(server_url)


def drop_tenants(server_url: str) -> None:
    for row in query(server_url, "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"p\\_{PREFIX}%",)):
        query(server_url, f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
    for row in query(server_url, "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (f"p\\_{PREFIX}%",)):
        query(server_url, f'DROP ROLE IF EXISTS "{row["rolname"]}"')


@pytest.fixture
def env(pdb: tuple[str, WorkerProcess], services: dict[str, StandinService]) -> Iterator[str]:
    """The module database, with the broker pointed at it and the services reset."""
    url, _ = pdb
    tasks.broker.reconfigure(url)
    for s in services.values():
        s.reset()
    yield url


def payload(name: str, **extra: Any) -> dict[str, Any]:
    return {"project_id": pid(name), "tenant_id": f"tenant-{name}", "region": "us-east-1", **extra}


def wait_project(url: str, project_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        rows = query(url, "SELECT * FROM control_plane.projects WHERE project_id = %s", (project_id,))
        return rows[0] if rows and rows[0]["status"] in statuses else None
    return wait_for(probe, timeout, f"project {project_id} to be {'/'.join(statuses)}")


def wait_entry_failed(url: str, job_id: str) -> dict[str, Any]:
    return wait_for(lambda: job(url, job_id)["status"] == "failed" and job(url, job_id), 60, "the job to fail")


def provisioned(url: str, body: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    message = provision_project.send(body)
    result = message.get_result(block=True, timeout=60_000)
    return message, result


def databases(url: str, project_id: str) -> list[str]:
    return [r["datname"] for r in query(url, "SELECT datname FROM pg_database WHERE datname = %s",
                                       (f"p_{project_id}",))]


def roles(url: str, project_id: str) -> list[str]:
    return sorted(r["rolname"] for r in query(url, "SELECT rolname FROM pg_roles WHERE rolname LIKE %s",
                                               (f"p\\_{project_id}\\_%",)))


# -- AC1, AC3, AC4, AC8, AC9: the lifecycle and what the result carries ---------------------------


def test_provisioning_creates_a_real_project_and_reports_it(env: str, services: dict[str, StandinService]) -> None:
    # Given a full payload
    body = payload("full", owner_id="user_1", organization_id="org_1", api_key_count=3,
                   services={"auth": True, "realtime": True, "storage": True})
    # When it is sent and its job's result awaited
    message, result = provisioned(env, body)
    # Then the job completed, with the result in control_plane.jobs too
    row = job(env, message.message_id)
    assert row["status"] == "completed"
    assert row["result"] == result
    assert row["payload"] == {"args": [body], "kwargs": {}}
    # And the result carries connection details, metadata and key hints (AC8, AC9)
    assert result["status"] == "active"
    assert result["database"]["database"] == f"p_{pid('full')}"
    assert result["database"]["user"] == f"p_{pid('full')}_app"
    assert result["database"]["schema_name"] == pid("full")
    assert result["database"]["host"] and result["database"]["port"]
    assert "password" not in str(result).lower()
    assert result["provisioned_at"] and result["region"] == "us-east-1"
    # (provisioned_at is the activation's instant as stored, to the microsecond and with its
    # offset; each key's created_at is its row's)
    (project_row,) = query(env, "SELECT provisioned_at FROM control_plane.projects WHERE project_id = %s",
                           (pid("full"),))  # fmt: skip
    assert datetime.fromisoformat(result["provisioned_at"]) == project_row["provisioned_at"]
    key_rows = query(env, "SELECT slot, created_at FROM control_plane.api_keys WHERE project_id = %s ORDER BY slot",
                     (pid("full"),))  # fmt: skip
    assert [(k["slot"], datetime.fromisoformat(k["created_at"])) for k in result["api_keys"]] == [
        (r["slot"], r["created_at"]) for r in key_rows
    ]
    assert result["owner_id"] == "user_1" and result["organization_id"] == "org_1"
    assert [k["slot"] for k in result["api_keys"]] == [1, 2, 3]
    assert all(k["created_at"] for k in result["api_keys"])
    # And every step ran as its own job, once, in order (AC3, AC4: query by type); each step's job is
    # sent by the one before, and the last one's outcome is written just after the result it delivered
    def steps() -> list[dict[str, Any]]:
        return query(env, "SELECT type, status, attempts FROM control_plane.jobs "
                          "WHERE type LIKE 'provision_project.%%' AND payload -> 'args' ->> 0 = %s "
                          "ORDER BY created_at", (pid("full"),))  # fmt: skip

    wait_for(lambda: [s["status"] for s in steps()] == ["completed"] * 6, what="every step's outcome")
    assert [s["type"] for s in steps()] == [f"provision_project.{s}" for s in
                                            ("roles", "database", "schema", "services", "api_keys", "activate")]
    assert all(s["attempts"] == 1 for s in steps())
    # And the project's record says when each step started and finished, in order, between its job's send
    # and its end
    marks = query(env, "SELECT s.key AS step, (s.value ->> 'started_at')::timestamptz AS started_at, "
                       "(s.value ->> 'done_at')::timestamptz AS done_at, j.created_at AS job_created_at, "
                       "j.completed_at AS job_completed_at FROM control_plane.projects p, jsonb_each(p.steps) s "
                       "JOIN control_plane.jobs j ON j.type = 'provision_project.' || s.key "
                       "AND j.payload -> 'args' ->> 0 = %s WHERE p.project_id = %s ORDER BY 2",
                  (pid("full"), pid("full")))  # fmt: skip
    assert [m["step"] for m in marks] == ["roles", "database", "schema", "services", "api_keys", "activate"]
    for m in marks:
        assert m["job_created_at"] <= m["started_at"] <= m["job_completed_at"], m
        assert m["step"] == "activate" or m["started_at"] <= m["done_at"] <= m["job_completed_at"], m
    # And the database, roles and registrations are real
    assert databases(env, pid("full")) == [f"p_{pid('full')}"]
    assert roles(env, pid("full")) == [f"p_{pid('full')}_app", f"p_{pid('full')}_owner"]
    for s in services.values():
        assert s.tenants[pid("full")]["tenant_id"] == "tenant-full"


def test_the_app_role_connects_to_its_database_and_not_to_anothers(env: str) -> None:
    # Given two provisioned projects and their secrets, read once
    provisioned(env, payload("conn_a"))
    provisioned(env, payload("conn_b"))
    settings = Settings.from_env({"API_KEY_PEPPER": PEPPER, "DATABASE_URL": env})
    a = reveal_secrets(settings, pid("conn_a"))
    # When the app role of A connects to its database
    params = psycopg2.extensions.parse_dsn(db.with_database(env, f"p_{pid('conn_a')}"))
    params.update(user=a["database_user"], password=a["database_password"])
    conn = psycopg2.connect(**params)
    with conn.cursor() as cur:
        cur.execute("SELECT current_user, current_schema()")
        assert cur.fetchone() == (f"p_{pid('conn_a')}_app", pid("conn_a"))
        # Then it may not create tables (least privilege: DDL belongs to the owner)
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            cur.execute("CREATE TABLE t (id int)")
    conn.close()
    # And it cannot connect to B's database
    params["dbname"] = f"p_{pid('conn_b')}"
    with pytest.raises(psycopg2.OperationalError, match=r"permission denied|not permitted|password"):
        psycopg2.connect(**params)
    # And it cannot connect to the control plane's database, on the same server (where it could
    # otherwise hold the broker's advisory locks and stall every send)
    params["dbname"] = psycopg2.extensions.parse_dsn(env)["dbname"]
    with pytest.raises(psycopg2.OperationalError, match="permission denied for database"):
        psycopg2.connect(**params)
    # And the secrets can be read only once
    with pytest.raises(Exception, match="already read"):
        reveal_secrets(settings, pid("conn_a"))


def test_several_projects_provision_concurrently(env: str) -> None:
    messages = [provision_project.send(payload(f"many{i}", api_key_count=2)) for i in range(3)]
    results = [m.get_result(block=True, timeout=90_000) for m in messages]
    assert sorted(r["project_id"] for r in results) == sorted(pid(f"many{i}") for i in range(3))
    for i in range(3):
        assert databases(env, pid(f"many{i}")) == [f"p_{pid(f'many{i}')}"]


# -- AC6: API keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "extra", "prefix", "count"), [
    ("keys_default", {}, None, 1),
    ("keys_custom", {"api_key_prefix": "acme", "api_key_count": 2}, "acme", 2),
    ("keys_max", {"api_key_count": 10}, None, 10),
])
def test_api_keys_are_generated_stored_hashed_and_revealed_once(
    env: str, name: str, extra: dict[str, Any], prefix: str | None, count: int
) -> None:
    _, result = provisioned(env, payload(name, **extra))
    expected_prefix = prefix or pid(name)
    assert result["api_key_prefix"] == expected_prefix
    stored = query(env, "SELECT slot, key_hash, hint, created_at FROM control_plane.api_keys WHERE project_id = %s "
                        "ORDER BY slot", (pid(name),))
    assert [r["slot"] for r in stored] == list(range(1, count + 1))
    assert all(r["created_at"] is not None and r["hint"].startswith(expected_prefix + "_") for r in stored)
    secrets = reveal_secrets(Settings.from_env({"API_KEY_PEPPER": PEPPER}), pid(name))
    keys = secrets["api_keys"]
    assert len(keys) == count == len(set(keys))
    assert all(k.startswith(expected_prefix + "_") and SECRET_PATTERN.fullmatch(k) for k in keys)
    # Only a keyed hash is stored, and it matches the revealed key
    from tasks.provision.apikeys import hash_key
    assert [hash_key(k, PEPPER.encode()) for k in keys] == [r["key_hash"] for r in stored]
    assert not any(k in str(stored) for k in keys)


# -- AC7: services ---------------------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [(), ("auth",), ("realtime",), ("storage",), ("auth", "storage")])
def test_only_enabled_services_are_registered_with_the_tenant_id(
    env: str, services: dict[str, StandinService], enabled: tuple[str, ...]
) -> None:
    name = "svc_" + ("_".join(enabled) or "none")
    provisioned(env, payload(name, services={s: True for s in enabled}))
    for service_name, s in services.items():
        tenants = s.tenants
        if service_name in enabled:
            assert tenants[pid(name)]["tenant_id"] == f"tenant-{name}"
            assert [(m, st) for m, path, st in s.request_log if pid(name) in path] == [("PUT", 201)]
        else:
            assert pid(name) not in tenants


# -- Edge cases --------------------------------------------------------------------------------------


@pytest.mark.parametrize("region", ["us-east-1", "eu-west", "ap-southeast-2", "local"])
def test_region_formats(env: str, region: str) -> None:
    name = "reg_" + region.replace("-", "_")
    _, result = provisioned(env, {**payload(name), "region": region})
    assert result["region"] == region


def test_minimal_payload(env: str) -> None:
    _, result = provisioned(env, {"project_id": pid("min"), "tenant_id": "t", "region": "us-east-1"})
    assert result["status"] == "active"
    assert len(result["api_keys"]) == 1
    assert result["owner_id"] is None and result["organization_id"] is None
    assert result["services"] == {"auth": False, "realtime": False, "storage": False}


# -- Bad input: invalid payloads fail at once and create nothing ----------------------------------


@pytest.mark.parametrize(("body", "field"), [
    ({"tenant_id": "t", "region": "us-east-1"}, "project_id"),
    ({"project_id": 'x"; DROP DATABASE postgres; --', "tenant_id": "t", "region": "us-east-1"}, "project_id"),
    ({"project_id": "Upper", "tenant_id": "t", "region": "us-east-1"}, "project_id"),
    ({"project_id": "a" * 60, "tenant_id": "t", "region": "us-east-1"}, "project_id"),
    # (past the 2,000 bytes a unique key may hold: send() raised InvalidUniqueKey, blaming the actor)
    ({"project_id": "a" * 3000, "tenant_id": "t", "region": "us-east-1"}, "project_id"),
    ({"project_id": "okname", "tenant_id": "t", "region": "us-east-1", "api_key_count": 11}, "api_key_count"),
    ({"project_id": "okname", "tenant_id": "t", "region": "us-east-1", "api_key_count": 0}, "api_key_count"),
    ({"project_id": "okname", "tenant_id": "t'; --", "region": "us-east-1"}, "tenant_id"),
    ({"project_id": "okname", "tenant_id": "t", "region": "US EAST"}, "region"),
    ({"project_id": "okname", "tenant_id": "t", "region": "us-east-1", "services": {"ftp": True}}, "services"),
])
def test_invalid_payload_fails_at_once_naming_the_field(env: str, body: dict[str, Any], field: str) -> None:
    message = provision_project.send(body)
    row = wait_entry_failed(env, message.message_id)
    assert row["attempts"] == 1
    assert row["last_error"].startswith(f"InvalidPayload: invalid {field}")
    assert query(env, "SELECT count(*) AS n FROM control_plane.projects WHERE project_id = 'okname'")[0]["n"] == 0
    assert databases(env, "okname") == []
    # and the caller waiting on its result hears why, at once
    with pytest.raises(ResultFailure, match=f"InvalidPayload: invalid {field}"):
        message.get_result(block=True, timeout=5_000)


# -- Idempotency, conflicts ------------------------------------------------------------------------


def test_the_same_payload_twice_makes_one_project(env: str, services: dict[str, StandinService]) -> None:
    body = payload("twice", api_key_count=2, services={"auth": True})
    _, first_result = provisioned(env, body)
    second = provision_project.send(body)
    # the second caller is told the project's result at once, as the first was
    assert second.get_result(block=True, timeout=60_000) == first_result
    # (and the result came with its job's outcome: the jobs row ended, the unique key free)
    row = job(env, second.message_id)
    assert (row["status"], row["result"]) == ("completed", first_result)
    assert databases(env, pid("twice")) == [f"p_{pid('twice')}"]
    assert query(env, "SELECT count(*) AS n FROM control_plane.api_keys WHERE project_id = %s",
                 (pid("twice"),))[0]["n"] == 2
    assert len(services["auth"].tenants) == 1


def test_a_second_send_while_the_first_provisions_hears_the_outcome_too(
    env: str, services: dict[str, StandinService]
) -> None:
    # Given a provisioning held up at its services step (auth hangs past the client's timeout)
    services["auth"].set_faults(hang_seconds=3.0)
    body = payload("waiting", services={"auth": True})
    first = provision_project.send(body)
    wait_for(lambda: job(env, first.message_id)["status"] == "completed", what="the first job to be accepted")
    # When the same payload is sent again (its first job is done, so this is a job of its own)
    second = provision_project.send(body)
    assert second.message_id != first.message_id
    wait_for(lambda: job(env, second.message_id)["status"] == "completed", what="the second job to be accepted")
    assert wait_project(env, pid("waiting"), "provisioning")["status"] == "provisioning"
    services["auth"].set_faults(hang_seconds=0.0)
    # Then both callers get the full result, in get_result and in control_plane.jobs
    result = first.get_result(block=True, timeout=60_000)
    assert result["status"] == "active"
    assert second.get_result(block=True, timeout=60_000) == result
    assert job(env, second.message_id)["result"] == job(env, first.message_id)["result"] == result


def test_the_same_project_id_with_a_different_payload_is_a_conflict(env: str) -> None:
    provisioned(env, payload("conflict"))
    message = provision_project.send({**payload("conflict"), "region": "eu-west"})
    row = wait_entry_failed(env, message.message_id)
    assert row["attempts"] == 1
    assert "already exists with a different payload" in row["last_error"]
    assert row["last_error"].startswith("Conflict:")
    with pytest.raises(ResultFailure, match=r"Conflict: .*already exists with a different payload"):
        message.get_result(block=True, timeout=5_000)
    # And the existing project is untouched
    assert wait_project(env, pid("conflict"), "active")["region"] == "us-east-1"


# -- Service faults --------------------------------------------------------------------------------


def test_a_service_failing_twice_with_500_is_retried_with_backoff(
    env: str, services: dict[str, StandinService]
) -> None:
    services["auth"].set_faults(fail_times=2)
    _, result = provisioned(env, payload("flaky", services={"auth": True}))
    assert result["status"] == "active"
    step = query(env, "SELECT * FROM control_plane.jobs WHERE type = 'provision_project.services' "
                      "AND payload -> 'args' ->> 0 = %s", (pid("flaky"),))[0]
    assert step["attempts"] == 3
    assert [e["attempt"] for e in step["errors"]] == [1, 2]
    assert all("TransientError" in e["error"] and "500" in e["error"] for e in step["errors"])
    assert step["last_error"] == step["errors"][-1]["error"]
    assert len(services["auth"].tenants) == 1
    # with a backoff that grows (seed AC5): Dramatiq's, min_backoff 200 ms in the tests, jittered
    # between half and all of 200 ms x 2^retries: the second attempt failed at least 100 ms after
    # the first, the third ran at least 200 ms after the second failed (a failure's time is its
    # settle's, which gives the retry its due time by the same clock)
    first, second = (datetime.fromisoformat(e["at"]) for e in step["errors"])
    waits = [(second - first).total_seconds(), (step["completed_at"] - second).total_seconds()]
    assert waits[0] >= 0.1 and waits[1] >= 0.2, waits


@pytest.mark.parametrize("fault", ["status_429_times", "hang", "drop_after_commit_times"])
def test_transient_service_faults_are_retried(env: str, services: dict[str, StandinService], fault: str) -> None:
    name = "fault_" + fault.split("_")[0]
    if fault == "hang":
        services["storage"].set_faults(hang_seconds=3.0)
    else:
        services["storage"].set_faults(**{fault: 1})
    message = provision_project.send(payload(name, services={"storage": True}))
    step = wait_for(lambda: (rows := query(env, "SELECT * FROM control_plane.jobs WHERE type = "
                                                "'provision_project.services' AND payload -> 'args' ->> 0 = %s "
                                                "AND attempts >= 1 AND last_error IS NOT NULL", (pid(name),)))
                    and rows[0], what="a failed services attempt")
    assert step["last_error"].startswith("TransientError")
    services["storage"].set_faults(hang_seconds=0.0)
    result = message.get_result(block=True, timeout=60_000)
    assert result["status"] == "active"
    assert list(services["storage"].tenants) == [pid(name)]


def test_a_rejected_token_is_permanent_and_everything_is_undone(
    env: str, services: dict[str, StandinService]
) -> None:
    # Given realtime rejects our token (after auth registered the tenant)
    services["realtime"].set_faults(reject_token=True)
    message = provision_project.send(payload("rejected", services={"auth": True, "realtime": True},
                                             api_key_count=2))
    # When the workflow fails for good
    row = wait_entry_failed(env, message.message_id)
    # Then the caller's job says why, and the result backend raises
    assert "provisioning failed and was undone" in row["last_error"]
    assert "401" in row["last_error"]
    with pytest.raises(Exception, match="provisioning failed"):
        message.get_result(block=True, timeout=10_000)
    # And everything was compensated: no database, no roles, no registration, no project row
    assert databases(env, pid("rejected")) == []
    assert roles(env, pid("rejected")) == []
    assert pid("rejected") not in services["auth"].tenants
    assert query(env, "SELECT * FROM control_plane.projects WHERE project_id = %s", (pid("rejected"),)) == []
    # And the services step failed once, without retry (its failure hook, which undid the project, ran
    # before its outcome was written)
    def step() -> dict[str, Any]:
        return query(env, "SELECT * FROM control_plane.jobs WHERE type = 'provision_project.services' "
                          "AND payload -> 'args' ->> 0 = %s", (pid("rejected"),))[0]  # fmt: skip

    wait_for(lambda: step()["status"] == "failed", what="the services step's outcome")
    assert step()["attempts"] == 1
    # And the name is free again
    services["realtime"].set_faults(reject_token=False)
    _, result = provisioned(env, payload("rejected", services={"auth": True, "realtime": True}, api_key_count=2))
    assert result["status"] == "active"


def test_a_failing_cleanup_leaves_the_project_for_an_operator(
    env: str, services: dict[str, StandinService]
) -> None:
    # Given auth answers 500 to everything: registration (maybe done, so touched) exhausts its
    # retries, and so does the cleanup's DELETE
    services["auth"].set_faults(fail_times=1_000_000)
    message = provision_project.send(payload("stuck", services={"auth": True}))
    project = wait_project(env, pid("stuck"), "needs_operator", timeout=120)
    # Then the name is kept (never freed over data) and the reason is recorded
    assert "cleanup failed" in project["last_error"]
    # And the caller is told: its job failed, naming the operator, and get_result raises it
    assert "needs an operator" in wait_entry_failed(env, message.message_id)["last_error"]
    with pytest.raises(Exception, match="needs an operator"):
        message.get_result(block=True, timeout=10_000)
    assert databases(env, pid("stuck")) == []  # what could be undone was undone
    # And a new send for the same project is refused clearly
    again = provision_project.send(payload("stuck", services={"auth": True}))
    assert "needs an operator" in wait_entry_failed(env, again.message_id)["last_error"]
    assert message.message_id != again.message_id
    # And the services step used its whole budget before giving up: 8 attempts, each one's error kept
    step = query(env, "SELECT * FROM control_plane.jobs WHERE type = 'provision_project.services' "
                      "AND payload -> 'args' ->> 0 = %s", (pid("stuck"),))[0]
    assert (step["status"], step["attempts"], step["max_attempts"]) == ("failed", 8, 8)
    assert [e["attempt"] for e in step["errors"]] == list(range(1, 9))


# -- The secrets scan --------------------------------------------------------------------------------


def test_no_secret_anywhere_after_a_full_run_and_a_failing_run(
    env: str, pdb: tuple[str, WorkerProcess], services: dict[str, StandinService]
) -> None:
    # Given a successful provisioning whose secrets the caller read, and a failing one
    provisioned(env, payload("scan_ok", api_key_count=3, services={"auth": True}))
    revealed = reveal_secrets(Settings.from_env({"API_KEY_PEPPER": PEPPER}), pid("scan_ok"))
    services["storage"].set_faults(reject_token=True)
    failing = provision_project.send(payload("scan_bad", services={"storage": True}))
    wait_entry_failed(env, failing.message_id)
    known = [*revealed["api_keys"], revealed["database_password"], PEPPER, *TOKENS.values()]
    # When every place a secret could leak is read
    _, worker = pdb
    places = {
        "worker log": worker.log_path.read_text() if worker.log_path else "",
        "jobs": str(query(env, "SELECT j::text FROM control_plane.jobs j")),
        "messages": str(query(env, "SELECT convert_from(body, 'UTF8') FROM control_plane.messages")),
        "results": str(query(env, "SELECT convert_from(value, 'UTF8') FROM control_plane.results")),
        "projects": str(query(env, "SELECT p::text FROM control_plane.projects p")),
        "api_keys": str(query(env, "SELECT k::text FROM control_plane.api_keys k")),
        "stand-in requests": str([s.request_log for s in services.values()]),
    }
    # Then no known secret, no API key and no password verifier appears anywhere
    for where, text in places.items():
        for secret in known:
            assert secret not in text, f"a secret leaked into {where}"
        assert not SECRET_PATTERN.search(text), f"an API key leaked into {where}"
        assert not re.search(r"SCRAM-SHA-256\$", text), f"a password verifier leaked into {where}"


def test_worker_log_lines_carry_message_id_and_actor(pdb: tuple[str, WorkerProcess], env: str) -> None:
    message, _ = provisioned(env, payload("logs"))
    _, worker = pdb
    text = worker.log_path.read_text() if worker.log_path else ""
    assert f"[provision_project {message.message_id}]" in text


def test_a_worker_process_provisions_two_projects_at_once_and_no_more(
    db_url: str, services: dict[str, StandinService], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker of its own (4 threads; provisioning limited to 2 at once per process) whose
    # service calls may wait long, and an auth service that holds every PUT until a second one is
    # in flight (or 8 s pass)
    auth = services["auth"]
    auth.reset()
    lock, overlapped, third = threading.Lock(), threading.Event(), threading.Event()
    seen = {"now": 0, "max": 0}
    original = auth._tenant_request

    def held(method: str, path: str, project_id: str, authorization: str, body: bytes) -> Any:
        with lock:
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
            if seen["now"] >= 2:
                overlapped.set()
            if seen["now"] >= 3:
                third.set()
        try:
            # alone: wait for a second; with a second: wait (3 s at most) for a third the limit must keep out
            if overlapped.wait(8):
                third.wait(3)
            return original(method, path, project_id, authorization, body)
        finally:
            with lock:
                seen["now"] -= 1

    monkeypatch.setattr(auth, "_tenant_request", held)  # (the stand-in runs in this process)
    worker = WorkerProcess(db_url, processes=1, threads=4, module="tasks.provision",
                           extra_env={**service_env(services), "SERVICE_TIMEOUT_SECONDS": "10"})
    try:
        worker.wait_ready()
        # When three projects registering with auth are sent at once
        messages = [provision_project.send(payload(f"par{i}", services={"auth": True})) for i in range(3)]
        results = [m.get_result(block=True, timeout=90_000) for m in messages]
    finally:
        worker.terminate()
        for i in range(3):
            query(db_url, f'DROP DATABASE IF EXISTS "p_{pid(f"par{i}")}" WITH (FORCE)')
            query(db_url, f'DROP ROLE IF EXISTS "p_{pid(f"par{i}")}_app", "p_{pid(f"par{i}")}_owner"')
    # Then all are active, two of them were at the service at the same time, and never three
    assert [r["status"] for r in results] == ["active"] * 3
    assert overlapped.is_set() and seen["max"] == 2, seen


def test_every_step_has_the_documented_retry_budget() -> None:
    from tasks.provision import STEPS

    # Given the default settings, Then every step is tried 8 times, backing off from 1 s to 60 s
    # (docs/provisioning.md): a service down for a minute does not undo the project
    for step in STEPS:
        options = tasks.broker.actors[f"provision_project.{step}"].options
        assert (options["max_attempts"], options["min_backoff"], options["max_backoff"]) == (8, 1000, 60_000), step
