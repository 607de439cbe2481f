"""provision_project: the actors and the chain that runs the steps.

``provision_project.send(payload)`` validates the payload (invalid input fails
at once, never retried, naming the field) and claims the project; in the same
transaction it sends the first step. Each step is its own actor
(``provision_project.<step>``) with its own retries; when it succeeds it marks
itself done and sends the next step in one transaction, so the chain neither
skips nor forks. The steps:

    roles -> database -> schema -> services -> api_keys -> activate

When a step fails for good (permanent error or retries spent),
``provision_project.compensate`` undoes in reverse order everything that
could have been created (revoke keys, deregister, drop the database and roles
that carry the project's marker), then frees the name. If compensation itself
fails for good, the project is marked ``needs_operator`` and keeps its name.

The job the caller got is completed once the workflow is accepted; its
``result`` (mirror and results backend) becomes the full result when the project
is active, or it turns ``failed`` with the reason when the workflow failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable
from typing import Any

import dramatiq
import psycopg2
from dramatiq.middleware import CurrentMessage
from dramatiq.results import ResultFailure, ResultMissing
from psycopg2.extras import Json

import tasks
from models import project_queries as q
from tasks import db
from tasks.broker import PostgresBroker
from tasks.errors import PermanentError, TaskError
from tasks.periodic import schedule
from tasks.provision import payload as p
from tasks.provision.claim import claim
from tasks.provision.database import drop_database, ensure_database
from tasks.provision.keys import ensure_api_keys, list_api_keys, revoke_api_keys
from tasks.provision.register import deregister_services, register_services
from tasks.provision.roles import drop_roles, ensure_roles
from tasks.provision.schema import ensure_schema
from tasks.provision.state import ProjectState, control_transaction, load
from tasks.provision.target import target_url
from tasks.results import PostgresBackend
from tasks.settings import PROVISIONING_QUEUE, Settings

logger = logging.getLogger(__name__)

QUEUE = PROVISIONING_QUEUE  # limited per worker process by default: CONTROLPLANE_QUEUE_CONCURRENCY
ACTOR = "provision_project"
STEPS = ("roles", "database", "schema", "services", "api_keys", "activate")

_settings = tasks.settings
#: Step retries: transient failures (a 5xx, a lost connection, a busy template) back off exponentially.
STEP_OPTIONS: dict[str, Any] = {
    "queue_name": QUEUE,
    "max_attempts": 8,
    "min_backoff": min(_settings.min_backoff_ms, 1000),
    "max_backoff": min(_settings.max_backoff_ms, 60_000),
    "on_final_failure": f"{ACTOR}.compensate",
}

#: The provisioning queue's claim order (lower first, as Dramatiq's priorities go): a project's
#: later steps before its earlier ones, every step before a new request (``provision_project``,
#: priority 0), and undoing first of all (it gives back what a failed run holds). First in,
#: first out, a burst of 300 requests ran each step of all 300 before any project's next: the
#: first project was active 24 s into a 32 s run, the median one at its end.
STEP_PRIORITIES = {step: -(index + 1) for index, step in enumerate(STEPS)}
COMPENSATE_PRIORITY = -(len(STEPS) + 1)


def _current_message_id() -> str:
    message = CurrentMessage.get_current_message()
    if message is None:  # called directly, outside a worker
        raise RuntimeError("provision_project must run as a Dramatiq actor")
    return _canonical(str(message.message_id))


def _canonical(job_id: str) -> str:
    """A job id as PostgreSQL's uuid prints it (a message id may be sent in capitals, or braced)."""
    try:
        return str(uuid.UUID(job_id))
    except ValueError:
        return job_id


def _project_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """One live provisioning job per project and payload: a second send of the same returns the first.

    The payload's digest is in the key, so that a different payload for the same project
    is a job of its own, which fails with a Conflict when it runs (instead of returning
    the first payload's job, whose outcome its caller would take for its own).
    """
    payload = args[0] if args else kwargs.get("payload")
    project_id = payload.get("project_id") if isinstance(payload, dict) else None
    if not isinstance(project_id, str) or not p.is_project_id(project_id):
        return None  # no project to keep to one job: the job fails at once, naming the field
    try:
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return None  # the send fails anyway, naming what JSON cannot hold
    return f"{ACTOR}:{project_id}:{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


@dramatiq.actor(actor_name=ACTOR, queue_name=QUEUE, max_attempts=8, min_backoff=STEP_OPTIONS["min_backoff"],
                max_backoff=STEP_OPTIONS["max_backoff"], store_results=False,
                # one live provisioning job per project and payload: a second send returns the first
                unique_key_from=_project_key)
def provision_project(payload: dict[str, Any]) -> dict[str, Any]:
    """Validate and claim a project, then start its steps. Returns the workflow's handle."""
    settings = Settings.from_env()
    job_id = _current_message_id()
    try:
        valid = p.validate(payload)
        return _claim_and_start(settings, valid, job_id)
    except PermanentError as exc:
        # Failed at once, never retried (an invalid payload, a conflict): the caller's get_result
        # hears why, as it hears the workflow's outcome, instead of waiting out its timeout.
        try:
            _tell_this_caller(settings, job_id, exc)
        except Exception as store_error:  # the job's own failure is what it ends with
            logger.warning("project %s: could not store its failure for its caller: %s",
                           payload.get("project_id") if isinstance(payload, dict) else None,
                           db.loggable_error(store_error))
        raise


def _claim_and_start(settings: Settings, valid: p.ProvisionPayload, job_id: str) -> dict[str, Any]:
    with control_transaction() as conn:
        state, created = claim(conn, valid, job_id, settings)
        if created:
            with tasks.enqueue_in(conn):
                _STEP_ACTORS[STEPS[0]].send(valid.project_id, state.job_id)  # (the run: see claim)
    logger.info("project %s %s", valid.project_id, "claimed" if created else f"already {state.status}")
    if state.status == "active" and state.result is not None:
        # Provisioned already, with this payload: this caller gets the result now.
        _tell_this_caller(settings, job_id, state.result)
        return state.result
    return {"project_id": valid.project_id, "status": state.status, "job_id": state.job_id}


def _server_address(url: str) -> tuple[str, int]:
    """The first host of a libpq URL and its port, with libpq's defaults for what is left out.

    libpq's own parser, not SQLAlchemy's (no SQLAlchemy in the workers). In a list of hosts
    each may have its port or none (``h1,h2:5433`` gives the ports ``,5433``).
    """
    server = psycopg2.extensions.parse_dsn(url)
    host = (server.get("host") or "").split(",")[0] or "localhost"
    port = (server.get("port") or "").split(",")[0]
    return host, int(port) if port else 5432


def _result(settings: Settings, conn: Any, state: ProjectState, provisioned_at: Any = None) -> dict[str, Any]:
    """Everything the caller needs except secrets."""
    payload = state.payload
    host, port = _server_address(target_url(settings))
    return {
        "project_id": payload.project_id,
        "tenant_id": payload.tenant_id,
        "status": "active",
        "region": payload.region,
        "owner_id": payload.owner_id,
        "organization_id": payload.organization_id,
        "provisioned_at": provisioned_at.isoformat() if provisioned_at else None,
        "database": {
            "host": host,
            "port": port,
            "database": p.database_name(payload),
            "user": p.app_role(payload),
            "schema_name": p.schema_name(payload),
            "owner_role": p.owner_role(payload),
        },
        "services": {name: (name in payload.services.enabled()) for name in ("auth", "realtime", "storage")},
        "api_key_prefix": payload.api_key_prefix,
        "api_keys": list_api_keys(conn, payload.project_id),
        "job_id": state.job_id,
    }


def _tell_this_caller(settings: Settings, job_id: str, outcome: Any) -> None:
    """This job's caller's result, known before any step runs (a project already active, a payload
    refused): stored with this job's outcome (``tasks.results``), so that its ``get_result`` answers
    once ``control_plane.jobs`` shows the job ended, its unique key free."""
    message = CurrentMessage.get_current_message() or _entry_message(job_id)
    backend = tasks.broker.get_results_backend()
    if isinstance(outcome, Exception):
        backend.store_exception(message, outcome, settings.result_ttl_ms)
    else:
        backend.store_result(message, outcome, settings.result_ttl_ms)


def _entry_message(job_id: str) -> dramatiq.Message[Any]:
    return dramatiq.Message(queue_name=QUEUE, actor_name=ACTOR, args=(), kwargs={}, options={},
                            message_id=job_id)


def _deliver(settings: Settings, conn: Any, job_ids: list[str], *, result: dict[str, Any] | None = None,
             error: str | None = None) -> None:
    """Tell the callers' jobs the workflow's outcome, in ``conn``'s transaction.

    Each job's ``control_plane.jobs`` row gets the result (or turns failed with the error),
    and so does its entry in the results backend (``get_result``): both appear when the
    transaction that decided the outcome commits, or neither does.
    """
    if not job_ids:
        return
    _record_on_entry_jobs(conn, job_ids, result=result, error=error)
    backend = tasks.broker.get_results_backend()
    if not isinstance(backend, PostgresBackend):
        raise RuntimeError(f"provision_project delivers results to PostgresBackend, not {type(backend).__name__}")
    outcome: Any = result if error is None else PermanentError(error)
    for job_id in job_ids:
        backend.store_in(conn, _entry_message(job_id), outcome, settings.result_ttl_ms)


def _record_on_entry_jobs(conn: Any, job_ids: list[str], *, result: Any = None, error: str | None = None) -> None:
    """The outcome onto the callers' ``control_plane.jobs`` rows (a result, or failed with the error)."""
    with conn.cursor() as cur:
        cur.execute(q.RECORD_ON_ENTRY_JOBS, {"job_ids": job_ids, "result": Json(result) if result is not None else None,
                                             "error": error})


def _lock_project(conn: Any, project_id: str) -> None:
    """Serialise with claims of the project (see ``claim``): a caller joins before the outcome or sees it."""
    with conn.cursor() as cur:
        cur.execute(q.LOCK_PROJECT, {"project_id": project_id})


def _callers(row: tuple[Any, ...]) -> list[str]:
    """The jobs to tell from a row of (job_id, waiting_job_ids)."""
    job_id, waiting = row
    return ([str(job_id)] if job_id is not None else []) + [str(w) for w in waiting or ()]


def activate(settings: Settings, state: ProjectState) -> dict[str, object]:
    """Step 7: mark the project active and deliver the result to the callers' jobs, in one transaction."""
    with control_transaction() as conn:
        _lock_project(conn, state.project_id)
        result = _result(settings, conn, state)
        with conn.cursor() as cur:
            cur.execute(q.ACTIVATE, {"project_id": state.project_id, "run": state.job_id, "result": Json(result),
                                     "secrets_ttl": settings.secrets_ttl_seconds})
            row = cur.fetchone()
            if row is None:
                return {"skipped": "not provisioning"}
            result["provisioned_at"] = row[0].isoformat()
            cur.execute(q.SET_PROJECT_RESULT, {"project_id": state.project_id, "result": Json(result)})
        _deliver(settings, conn, _callers(row[1:]), result=result)
    return result


_STEP_FUNCTIONS: dict[str, Callable[[Settings, ProjectState], dict[str, object]]] = {
    "roles": ensure_roles,
    "database": ensure_database,
    "schema": ensure_schema,
    "services": register_services,
    "api_keys": ensure_api_keys,
    "activate": activate,
}


def _mark(conn: Any, project_id: str, step: str, event: str, detail: dict[str, object] | None = None, *,
          run: str | None = None) -> bool:
    with conn.cursor() as cur:
        cur.execute(q.MARK_STEP, {"project_id": project_id, "step": step, "event": event, "run": run,
                                  "detail": Json(detail or {})})
        return cur.fetchone() is not None


def _superseded(state: ProjectState | None, run: str | None) -> bool:
    """Whether the project row is another run of the project id than the message's (``run``: its claim's job id).

    A project undone frees its id, and a later provision_project claims it again: a message of
    the earlier run delivered again must not act on the later one. ``run`` is None in messages
    sent before steps carried it; they match any run, as they did.
    """
    return state is not None and run is not None and state.job_id != run


def run_step(step: str, project_id: str, run: str | None = None) -> dict[str, object]:
    """Run one step of a project's workflow, then hand over to the next step."""
    settings = Settings.from_env()
    run = _canonical(run) if run is not None else None
    with control_transaction() as conn:
        # Wait for a claim (or another holder of the project's lock) still committing: with a
        # broker that cannot join the claim's transaction (RabbitMQ) this step may be delivered
        # before it commits, and would find the project gone, or an older run's.
        _lock_project(conn, project_id)
        state = load(conn, project_id)
        superseded = _superseded(state, run)
        if state is None or state.status != "provisioning" or superseded:
            status = "superseded" if superseded else state.status if state else "gone"
            logger.info("project %s is %s; step %s has nothing to do", project_id, status, step)
            return {"skipped": status}
        run = state.job_id  # every write below is to this run's row only
        index = STEPS.index(step)
        if index > 0 and not (state.steps.get(STEPS[index - 1]) or {}).get("done_at"):
            # Each step is sent by the one before when it is done: this one came early, a step
            # job of an earlier run of the project id retried by hand (a retried job keeps its
            # id, and the run is the claiming job's id, which a retried entry job keeps too).
            # Run now, it would go ahead of this run's steps, and activate a project with no
            # database.
            logger.warning("project %s: step %s came before %s was done in this run (a step job of an earlier "
                           "run retried by hand?); nothing done", project_id, step, STEPS[index - 1])
            return {"skipped": f"out of order: {STEPS[index - 1]} is not done"}
        _mark(conn, project_id, step, "started_at", run=run)
    detail = _STEP_FUNCTIONS[step](settings, state)
    with control_transaction() as conn:
        if step != "activate":
            # Under the project's lock, as the claim: with a broker that cannot join this
            # transaction (RabbitMQ) the next step is delivered before it commits, and waits for
            # it instead of finding this step not done (and doing nothing, for good).
            _lock_project(conn, project_id)
            with conn.cursor() as cur:
                cur.execute(q.MARK_STEP_DONE, {"project_id": project_id, "step": step, "run": run,
                                               "detail": Json({k: v for k, v in detail.items() if k != "api_keys"})})
                first_time = cur.fetchone() is not None
            # Hand over only the first time this step finishes: a redelivered step
            # (its worker died after this transaction committed) must not fork the chain.
            if first_time and index + 1 < len(STEPS):
                with tasks.enqueue_in(conn):
                    _STEP_ACTORS[STEPS[index + 1]].send(project_id, run)
    return {"project_id": project_id, "step": step, **({} if step == "activate" else detail)}


def _make_step_actor(step: str) -> dramatiq.Actor[[str, str | None], dict[str, object]]:
    def step_actor(project_id: str, run: str | None = None) -> dict[str, object]:
        return run_step(step, project_id, run)

    step_actor.__name__ = step_actor.__qualname__ = f"provision_{step}"
    step_actor.__doc__ = f"provision_project step {step!r}."
    decorate = dramatiq.actor(actor_name=f"{ACTOR}.{step}", priority=STEP_PRIORITIES[step], **STEP_OPTIONS)
    return decorate(step_actor)


_STEP_ACTORS = {step: _make_step_actor(step) for step in STEPS}


def compensate_project(settings: Settings, project_id: str, error: str, run: str | None = None) -> dict[str, object]:
    """Undo, in reverse order, everything a failed workflow may have created; then free the name.

    ``run``: the claim's job id of the run that failed (None: whichever run holds the id).
    """
    with control_transaction() as conn, conn.cursor() as cur:
        cur.execute(q.BEGIN_COMPENSATION, {"project_id": project_id, "run": run, "error": error})
        row = cur.fetchone()
    if row is None:
        return {"skipped": "nothing to compensate (active, gone, another run, or waiting for an operator)"}
    payload, run, touched = p.validate(row[0]), row[1], list(row[2])
    # Undo in reverse order, as much as possible: a failing part does not stop the
    # others (each is idempotent, so a retry redoes only what is left).
    failures: list[Exception] = []

    def attempt(undo: Callable[[], Any], default: Any) -> Any:
        try:
            return undo()
        except (TaskError, psycopg2.Error) as exc:
            failures.append(exc)
            return default

    def revoke() -> None:
        with control_transaction() as conn:
            revoke_api_keys(conn, project_id)

    attempt(revoke, None)
    services = attempt(lambda: deregister_services(settings, payload, touched), [])
    dropped_db = attempt(lambda: drop_database(settings, payload), False)
    roles = attempt(lambda: drop_roles(settings, payload), [])
    if failures:
        # Transient first: the retry may succeed; permanent only when nothing else failed.
        transient = [f for f in failures if not isinstance(f, PermanentError)]
        raise (transient or failures)[0]
    with control_transaction() as conn:
        _lock_project(conn, project_id)
        with conn.cursor() as cur:
            cur.execute(q.DELETE_PROJECT, {"project_id": project_id, "run": run})
            deleted = cur.fetchone()
        if deleted is not None:
            _deliver(settings, conn, _callers(deleted), error=f"provisioning failed and was undone: {error}")
    return {"project_id": project_id, "deregistered": services, "dropped_database": dropped_db,
            "dropped_roles": roles}


@dramatiq.actor(actor_name=f"{ACTOR}.compensate", queue_name=QUEUE, max_attempts=8,
                min_backoff=STEP_OPTIONS["min_backoff"], max_backoff=STEP_OPTIONS["max_backoff"],
                on_final_failure=f"{ACTOR}.compensation_failed", priority=COMPENSATE_PRIORITY)
def compensate(failed: dict[str, Any], error: dict[str, Any]) -> dict[str, object]:
    """Undo a project whose step failed for good."""
    project_id, run = _project_and_run(failed["args"])
    reason = f"step {failed['actor_name']} failed: {error.get('message')}"
    return compensate_project(Settings.from_env(), project_id, reason, run)


def _project_and_run(args: list[Any]) -> tuple[str, str | None]:
    """A step message's arguments: the project id, and the run (absent from messages sent before steps carried it)."""
    return str(args[0]), (_canonical(str(args[1])) if len(args) > 1 and args[1] is not None else None)


@dramatiq.actor(actor_name=f"{ACTOR}.compensation_failed", queue_name=QUEUE, max_attempts=20,
                priority=COMPENSATE_PRIORITY)
def compensation_failed(failed: dict[str, Any], error: dict[str, Any]) -> None:
    """Compensation failed for good: keep the name and flag the project for an operator."""
    # failed is the compensate message: its first argument is the failed step's message.
    project_id, run = _project_and_run(failed["args"][0]["args"])
    with control_transaction() as conn:
        _lock_project(conn, project_id)
        with conn.cursor() as cur:
            cur.execute(q.MARK_NEEDS_OPERATOR, {"project_id": project_id, "run": run,
                                                "error": f"cleanup failed: {error.get('message')}"})
            marked = cur.fetchone()
        if marked is not None:
            _deliver(Settings.from_env(), conn, _callers(marked),
                     error=f"provisioning failed and so did its cleanup; project {project_id!r} needs an operator "
                           f"(control_plane.projects.last_error): {error.get('message')}")
    logger.error("project %s needs an operator: cleanup failed: %s", project_id, error.get("message"))


def sweep_orphans(settings: Settings, older_than_seconds: float = 600.0) -> list[str]:
    """Send compensation for projects stuck mid-workflow with no live job; returns their ids."""
    with control_transaction() as conn:
        with conn.cursor() as cur:
            # Our broker's message table holds exactly the live jobs: look there, not at the whole history.
            via_messages = isinstance(tasks.broker, PostgresBroker)
            orphaned = q.ORPHANED_PROJECTS_VIA_MESSAGES if via_messages else q.ORPHANED_PROJECTS
            cur.execute(orphaned, {"older_than": older_than_seconds})
            found = [(row[0], str(row[1]) if row[1] is not None else None) for row in cur.fetchall()]
            orphans = [project_id for project_id, _ in found]
        with tasks.enqueue_in(conn):
            for project_id, run in found:
                compensate.send(
                    {"message_id": None, "actor_name": f"{ACTOR}.sweep", "args": [project_id, run], "kwargs": {}},
                    {"type": "Orphaned", "message": "no step of its workflow was pending or running"},
                )
    for project_id in orphans:
        logger.warning("project %s was stuck mid-workflow with no live job; compensating it", project_id)
    return orphans


def reconcile_entry_jobs(settings: Settings) -> list[str]:
    """Write onto callers' jobs rows the outcome ``get_result`` already gives; returns their ids.

    A later caller's job joins the waiting list in its own transaction, and its completion
    (the accepted handle) is written after it returns: an outcome delivered in between finds
    the row still running and leaves it, and the handle then lands over nothing. The results
    backend has the outcome all the same; this copies it onto such rows.
    """
    backend = tasks.broker.get_results_backend()
    fixed = []
    with control_transaction() as conn:
        with conn.cursor() as cur:
            cur.execute(q.STALE_ENTRY_JOBS, {"within": settings.result_ttl_ms / 1000})
            candidates = [row[0] for row in cur.fetchall()]
        for job_id in candidates:
            try:
                outcome = backend.get_result(_entry_message(job_id))
            except ResultMissing:
                continue  # not decided yet
            except ResultFailure as exc:
                _record_on_entry_jobs(conn, [job_id], error=exc.orig_exc_msg or str(exc))
            else:
                _record_on_entry_jobs(conn, [job_id], result=outcome)
            fixed.append(job_id)
    if fixed:
        logger.info("wrote the outcome onto %d caller job(s) whose completion had come after it", len(fixed))
    return fixed


def forget_expired_secrets() -> list[str]:
    """Erase the secrets' nonce of projects whose secrets expired unread; returns their ids.

    Only projects no step needs the nonce for (active, being undone, waiting for an
    operator): once erased, nobody can derive their API keys or app password again.
    """
    with control_transaction() as conn, conn.cursor() as cur:
        cur.execute(q.FORGET_EXPIRED_SECRETS)
        forgotten = [row[0] for row in cur.fetchall()]
    if forgotten:
        logger.info("secrets of %d project(s) expired unread and were erased: %s", len(forgotten),
                    ", ".join(forgotten))
    return forgotten


@dramatiq.actor(actor_name=f"{ACTOR}.sweep", queue_name=QUEUE, max_attempts=3,
                # one sweep at a time: a second send while one is pending or running returns it
                unique_key_from=lambda args, kwargs: f"{ACTOR}.sweep")
def sweep(older_than_seconds: float = 600.0) -> dict[str, list[str]]:
    """Periodic (PROVISION_SWEEP_SCHEDULE): stuck projects to compensation, expired secrets erased,
    callers' jobs rows brought up to their outcome."""
    settings = Settings.from_env()
    return {"compensating": sweep_orphans(settings, older_than_seconds),
            "secrets_erased": forget_expired_secrets(),
            "caller_jobs_updated": reconcile_entry_jobs(settings)}


if _settings.provision_sweep_schedule is not None:
    schedule(_settings.provision_sweep_schedule, sweep, name=f"{ACTOR}.sweep")
