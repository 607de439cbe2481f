"""Step 5, services: register the tenant with auth, then realtime, then storage (those enabled).

``PUT /tenants/{project_id}`` is an upsert, so a retry or a re-run registers
once. Before each PUT the service is recorded as *touched*: a PUT whose answer
was lost may still have registered the tenant. A PUT refused outright (a
4xx) on the first try created nothing, so it is untouched again; any other
failure (a 2xx whose body is not JSON, a 1xx) may have come after the tenant
was registered, and stays touched; so does a 302 or 303 (a 301, 307 or 308 says
the request belongs elsewhere: refused).
Compensation deletes the touched services in reverse order, each one even when
another fails; 404 counts as done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from models import project_queries as q
from tasks.errors import PermanentError, TaskError
from tasks.provision import payload as p
from tasks.provision.services import ServiceClient
from tasks.provision.state import ProjectState, control_transaction, stays_open
from tasks.settings import Settings


def client(settings: Settings, name: str) -> ServiceClient | None:
    """The admin API client of service ``name``, or None when it is not configured."""
    url = settings.service_urls.get(name)
    if url is None:
        return None
    try:
        return ServiceClient(name, url, settings.service_tokens.get(name, ""), settings.service_timeout)
    except ValueError as exc:
        # A setting no retry mends (a URL without its token, a token http.client cannot send, a
        # bad port): the step fails at once, and a compensation still undoes the rest. The client's
        # messages name what is wrong, never a value.
        raise PermanentError(f"{exc} ({name.upper()}_SERVICE_URL, {name.upper()}_SERVICE_TOKEN)") from None


def _touch(state: ProjectState, service: str, touched: bool) -> bool:
    """Record on this run's row that ``service`` may hold a registration (or not); False: the row is another run's."""
    with control_transaction() as conn, conn.cursor() as cur:
        cur.execute(q.TOUCH_SERVICE if touched else q.UNTOUCH_SERVICE,
                    {"project_id": state.project_id, "service": service, "run": state.job_id})
        return bool(cur.rowcount)


#: How much longer than ``SERVICE_TIMEOUT_SECONDS`` the PUT's transaction may sit idle (its name's
#: lookup, which the request's own timeout does not bound).
_PUT_MARGIN_SECONDS = 30.0


@contextlib.contextmanager
def _run_held(state: ProjectState, service: ServiceClient) -> Iterator[bool]:
    """This run's row locked (touched again) until the block ends; False: the row is another run's."""
    with control_transaction() as conn, conn.cursor() as cur:
        stays_open(conn, service.timeout + _PUT_MARGIN_SECONDS)  # (idle during the PUT)
        cur.execute(q.TOUCH_SERVICE, {"project_id": state.project_id, "service": service.name, "run": state.job_id})
        yield bool(cur.rowcount)


def register_services(settings: Settings, state: ProjectState) -> dict[str, object]:
    """Register the project with every enabled service; idempotent."""
    payload = state.payload
    registered: list[str] = []
    for name in payload.services.enabled():
        service = client(settings, name)
        if service is None:
            raise PermanentError(
                f"the {name} service is enabled in the payload but {name.upper()}_SERVICE_URL is not set"
            )
        # Touched first, committed: a worker lost during the PUT leaves it for compensation to undo.
        if not _touch(state, name, True) or not _put(state, service):
            # A late step of a run undone or being undone: a registration nobody would know to
            # undo. Not made. (Looked at before every PUT, touched before or not.)
            return {"services": registered, "skipped": "superseded"}
        registered.append(name)
    return {"services": registered}


def _put(state: ProjectState, service: ServiceClient) -> bool:
    """Register the project with ``service`` while this run's row is locked; False: the run is no
    longer the project's (nothing sent).

    The lock keeps the undoing from beginning during the PUT (``BEGIN_COMPENSATION`` updates the
    row): it begins before, and this PUT is not sent, or after, and deregisters what the PUT made.
    (Without it, an undoing that began during the PUT deregistered before the PUT landed, and the
    step's own DELETE was all that took the registration back: one that failed left the tenant
    registered for good, the step's retry finding its run gone.) Held for one request, up to
    ``SERVICE_TIMEOUT_SECONDS``; the project's other writers wait that long at most."""
    payload, name = state.payload, service.name
    try:
        with _run_held(state, service) as current:
            if not current:
                return False
            service.put_tenant(
                payload.project_id,
                {"tenant_id": payload.tenant_id, "project_id": payload.project_id, "region": payload.region},
            )
    except PermanentError as exc:
        # Untouched again only when the service refused it (a 4xx): an answer it gave after
        # applying the PUT (a 2xx body it could not read, say) leaves it for compensation.
        if name not in set(state.steps.get("touched_services") or []) and getattr(exc, "refused", False):
            _touch(state, name, False)
        raise
    return True


def deregister_services(settings: Settings, payload: p.ProvisionPayload, touched: list[str]) -> list[str]:
    """Delete the project from every touched service, in reverse order; idempotent.

    A service that fails does not keep the others registered: each is tried, then the first
    transient failure is raised (a retry may mend it), else the first one."""
    removed = []
    failures: list[TaskError] = []
    for name in reversed(payload.services.enabled()):
        if name not in touched:
            continue  # nothing could have been registered there
        try:
            service = client(settings, name)
            if service is None:
                # Registered (or maybe), and no way to undo it now: freeing the name would leave the
                # tenant registered there. Compensation fails, and the project waits for an operator.
                raise PermanentError(
                    f"the project may be registered with the {name} service, but {name.upper()}_SERVICE_URL "
                    "is no longer set: cannot deregister it"
                )
            service.delete_tenant(payload.project_id)
        except TaskError as exc:
            failures.append(exc)
            continue
        removed.append(name)
    if failures:
        raise next((f for f in failures if not isinstance(f, PermanentError)), failures[0])
    return removed
