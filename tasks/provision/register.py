"""Step 5, services: register the tenant with auth, then realtime, then storage (those enabled).

``PUT /tenants/{project_id}`` is an upsert, so a retry or a re-run registers
once. Compensation deletes in reverse order; 404 counts as done.
"""

from __future__ import annotations

from tasks.errors import PermanentError
from tasks.provision import payload as p
from tasks.provision.services import ServiceClient
from tasks.provision.state import ProjectState
from tasks.settings import Settings


def client(settings: Settings, name: str) -> ServiceClient | None:
    """The admin API client of service ``name``, or None when it is not configured."""
    url = settings.service_urls.get(name)
    if url is None:
        return None
    return ServiceClient(name, url, settings.service_tokens.get(name, ""), settings.service_timeout)


def register_services(settings: Settings, state: ProjectState) -> dict[str, object]:
    """Register the project with every enabled service; idempotent."""
    payload = state.payload
    registered = []
    for name in payload.services.enabled():
        service = client(settings, name)
        if service is None:
            raise PermanentError(
                f"the {name} service is enabled in the payload but {name.upper()}_SERVICE_URL is not set"
            )
        service.put_tenant(
            payload.project_id,
            {"tenant_id": payload.tenant_id, "project_id": payload.project_id, "region": payload.region},
        )
        registered.append(name)
    return {"services": registered}


def deregister_services(settings: Settings, payload: p.ProvisionPayload) -> list[str]:
    """Delete the project from every enabled service, in reverse order; idempotent."""
    removed = []
    for name in reversed(payload.services.enabled()):
        service = client(settings, name)
        if service is None:
            continue  # never configured, so nothing was registered
        service.delete_tenant(payload.project_id)
        removed.append(name)
    return removed
