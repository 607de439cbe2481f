"""The provision_project payload: validation, canonical form and derived names.

:func:`validate` turns untrusted JSON into a frozen :class:`ProvisionPayload` or raises
:class:`~tasks.errors.InvalidPayload` naming the offending field. Names derived from the
payload (roles, database, schema) are checked here, once, so later steps can pass them to
``psycopg2.sql.Identifier`` without further thought: a name that would not fit is rejected,
never truncated (Postgres silently truncates identifiers longer than 63 bytes, which would
let two projects share a role).

Rules, in one place:

* ``project_id``, ``api_key_prefix``: ``^[a-z][a-z0-9_]*$``, at most :data:`MAX_IDENTIFIER_LEN`
  characters, so that the longest derived name, ``p_<project_id>_owner``, fits in 63 bytes.
* ``tenant_id``, ``owner_id``, ``organization_id``: 1..128 characters of ``[A-Za-z0-9_.:-]``.
* ``region``: ``^[a-z][a-z0-9-]{1,31}$`` (lowercase letters, digits, hyphens; 2..32 characters).
* ``api_key_count``: an integer (not a boolean) in 1..10, default 1.
* ``services``: an object with boolean flags ``auth``, ``realtime``, ``storage`` (default false).
* Unknown fields are rejected, at the top level and inside ``services``.
* An optional field that is ``null`` is treated as absent (its default applies).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from tasks.errors import InvalidPayload

__all__ = [
    "MAX_API_KEYS",
    "MAX_IDENTIFIER_LEN",
    "PG_NAME_MAX_BYTES",
    "SERVICE_NAMES",
    "ProvisionPayload",
    "Services",
    "app_role",
    "database_name",
    "is_project_id",
    "owner_role",
    "payload_hash",
    "schema_name",
    "validate",
]

#: Postgres truncates identifiers beyond NAMEDATALEN - 1 bytes.
PG_NAME_MAX_BYTES = 63

_OWNER_ROLE = "p_{}_owner"
_APP_ROLE = "p_{}_app"
_DATABASE = "p_{}"

#: The longest ``project_id`` whose every derived name still fits in :data:`PG_NAME_MAX_BYTES`.
MAX_IDENTIFIER_LEN = PG_NAME_MAX_BYTES - max(
    len(template.format("")) for template in (_OWNER_ROLE, _APP_ROLE, _DATABASE)
)

MIN_API_KEYS = 1
MAX_API_KEYS = 10
_EXTERNAL_ID_MAX = 128
#: Schemas every database has; a project id is its schema's name, so these are refused (as is ``pg_*``).
_RESERVED_SCHEMAS = frozenset({"information_schema", "public"})

#: The services a project can be registered with, in registration order.
SERVICE_NAMES: tuple[str, ...] = ("auth", "realtime", "storage")

# fullmatch everywhere: with re.match, "$" also matches before a trailing newline.
_IDENTIFIER_RE = re.compile(r"[a-z][a-z0-9_]*")
_EXTERNAL_ID_RE = re.compile(r"[A-Za-z0-9_.:-]+")
_REGION_RE = re.compile(r"[a-z][a-z0-9-]{1,31}")
# Unknown keys that look like this are safe to use as the error's field name.
_IDENTIFIER_LIKE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_FIELDS = frozenset(
    {
        "project_id",
        "tenant_id",
        "region",
        "owner_id",
        "organization_id",
        "api_key_count",
        "api_key_prefix",
        "services",
    }
)

# Values echoed in error messages end up in logs and last_error; keep them short and inert.
_ECHO_MAX = 40
_PRINTABLE_ASCII = frozenset(chr(c) for c in range(0x20, 0x7F))


@dataclass(frozen=True)
class Services:
    """Which platform services the project is registered with."""

    auth: bool = False
    realtime: bool = False
    storage: bool = False

    def enabled(self) -> tuple[str, ...]:
        """The enabled service names, in registration order (auth, realtime, storage)."""
        return tuple(name for name in SERVICE_NAMES if getattr(self, name))

    def to_json(self) -> dict[str, bool]:
        """All three flags as a JSON object."""
        return {name: bool(getattr(self, name)) for name in SERVICE_NAMES}


@dataclass(frozen=True)
class ProvisionPayload:
    """A validated provision_project request; build it with :func:`validate`."""

    project_id: str
    tenant_id: str
    region: str
    owner_id: str | None = None
    organization_id: str | None = None
    api_key_count: int = MIN_API_KEYS
    # Empty means "not given": __post_init__ fills in project_id.
    api_key_prefix: str = ""
    services: Services = field(default_factory=Services)

    def __post_init__(self) -> None:
        if not self.api_key_prefix:
            # The documented way to set a field of a frozen dataclass during construction.
            object.__setattr__(self, "api_key_prefix", self.project_id)

    def to_json(self) -> dict[str, object]:
        """The canonical JSON form, every default filled in; ``validate`` accepts it back."""
        return {
            "project_id": self.project_id,
            "tenant_id": self.tenant_id,
            "region": self.region,
            "owner_id": self.owner_id,
            "organization_id": self.organization_id,
            "api_key_count": self.api_key_count,
            "api_key_prefix": self.api_key_prefix,
            "services": self.services.to_json(),
        }


def payload_hash(payload: ProvisionPayload) -> str:
    """SHA-256 hex digest of the canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(payload.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def owner_role(payload: ProvisionPayload) -> str:
    """The NOLOGIN role that owns the project's database and schema."""
    return _OWNER_ROLE.format(payload.project_id)


def app_role(payload: ProvisionPayload) -> str:
    """The LOGIN role the project's application connects as."""
    return _APP_ROLE.format(payload.project_id)


def database_name(payload: ProvisionPayload) -> str:
    """The project's database."""
    return _DATABASE.format(payload.project_id)


def schema_name(payload: ProvisionPayload) -> str:
    """The project's schema inside its database."""
    return payload.project_id


def is_project_id(value: str) -> bool:
    """Whether ``value`` has a project id's form (``validate`` says why not, and checks the rest)."""
    return len(value) <= MAX_IDENTIFIER_LEN and _IDENTIFIER_RE.fullmatch(value) is not None


def validate(raw: object) -> ProvisionPayload:
    """Check an untrusted provision_project payload and return it with defaults filled in.

    Raises :class:`~tasks.errors.InvalidPayload` for the first problem found, with ``field``
    set to the dotted field name (e.g. ``"services.auth"``).
    """
    if not isinstance(raw, Mapping):
        raise InvalidPayload("payload", f"must be a JSON object, got {_type_name(raw)}")
    _reject_unknown(raw, _FIELDS, prefix="")

    project_id = _identifier(raw, "project_id")
    if project_id.startswith("pg_") or project_id in _RESERVED_SCHEMAS:
        # The project id is its schema's name: PostgreSQL refuses "pg_" names, and the others
        # are schemas every database already has, which CREATE SCHEMA IF NOT EXISTS would reuse.
        raise InvalidPayload(
            "project_id",
            f"{project_id!r} is a name PostgreSQL reserves for its own schemas "
            "(pg_*, information_schema, public); choose another",
        )
    tenant_id = _external_id(raw, "tenant_id", required=True)
    region = _region(raw)
    owner_id = _external_id(raw, "owner_id", required=False)
    organization_id = _external_id(raw, "organization_id", required=False)
    api_key_count = _api_key_count(raw)
    api_key_prefix = project_id
    if raw.get("api_key_prefix") is not None:
        api_key_prefix = _identifier(raw, "api_key_prefix")
    services = _services(raw.get("services"))

    assert tenant_id is not None  # required=True never returns None
    return ProvisionPayload(
        project_id=project_id,
        tenant_id=tenant_id,
        region=region,
        owner_id=owner_id,
        organization_id=organization_id,
        api_key_count=api_key_count,
        api_key_prefix=api_key_prefix,
        services=services,
    )


def _identifier(raw: Mapping[object, object], name: str) -> str:
    value = _required_str(raw, name)
    if not _IDENTIFIER_RE.fullmatch(value):
        raise InvalidPayload(
            name,
            "must start with a lowercase letter and contain only lowercase letters, digits "
            f"and underscores; got {_describe(value)}",
        )
    if len(value) > MAX_IDENTIFIER_LEN:
        raise InvalidPayload(
            name,
            f"is {len(value)} characters long; at most {MAX_IDENTIFIER_LEN} fit, because "
            f"derived names such as {_OWNER_ROLE.format('<id>')} must fit in {PG_NAME_MAX_BYTES} bytes",
        )
    return value


def _external_id(raw: Mapping[object, object], name: str, *, required: bool) -> str | None:
    if raw.get(name) is None and not required:
        return None
    value = _required_str(raw, name)
    if len(value) > _EXTERNAL_ID_MAX:
        raise InvalidPayload(name, f"is {len(value)} characters long; at most {_EXTERNAL_ID_MAX} allowed")
    if not _EXTERNAL_ID_RE.fullmatch(value):
        raise InvalidPayload(
            name, f"may contain only ASCII letters, digits and _ . : -; got {_describe(value)}"
        )
    return value


def _region(raw: Mapping[object, object]) -> str:
    value = _required_str(raw, "region")
    if not _REGION_RE.fullmatch(value):
        raise InvalidPayload(
            "region",
            "must be 2 to 32 lowercase letters, digits or hyphens, starting with a letter "
            f"(e.g. us-east-1); got {_describe(value)}",
        )
    return value


def _api_key_count(raw: Mapping[object, object]) -> int:
    value = raw.get("api_key_count")
    if value is None:
        return MIN_API_KEYS
    # bool is a subclass of int in Python; true/false is not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload("api_key_count", f"must be an integer, got {_describe(value)}")
    if not MIN_API_KEYS <= value <= MAX_API_KEYS:
        raise InvalidPayload(
            "api_key_count", f"must be between {MIN_API_KEYS} and {MAX_API_KEYS}, got {_describe(value)}"
        )
    return value


def _services(value: object) -> Services:
    if value is None:
        return Services()
    if not isinstance(value, Mapping):
        raise InvalidPayload("services", f"must be a JSON object, got {_type_name(value)}")
    _reject_unknown(value, frozenset(SERVICE_NAMES), prefix="services")
    flags: dict[str, bool] = {}
    for name in SERVICE_NAMES:
        flag = value.get(name)
        if flag is None:
            continue
        if not isinstance(flag, bool):
            raise InvalidPayload(f"services.{name}", f"must be true or false, got {_describe(flag)}")
        flags[name] = flag
    return Services(**flags)


def _required_str(raw: Mapping[object, object], name: str) -> str:
    value = raw.get(name)
    if value is None:
        raise InvalidPayload(name, "is required")
    if not isinstance(value, str):
        raise InvalidPayload(name, f"must be a string, got {_type_name(value)}")
    if not value:
        raise InvalidPayload(name, "must not be empty")
    return value


def _reject_unknown(raw: Mapping[object, object], known: frozenset[str], *, prefix: str) -> None:
    unknown = [key for key in raw if key not in known]
    if not unknown:
        return
    # Report one deterministic key; sort by repr since keys need not all be strings.
    key = min(unknown, key=repr)
    parent = prefix or "payload"
    if isinstance(key, str) and _is_echoable(key) and _IDENTIFIER_LIKE_RE.fullmatch(key):
        # Not "invalid password: is not ...": redaction takes the word after a secret's name
        # for its value, and the message said "invalid password: [REDACTED] not a known field".
        raise InvalidPayload(f"{prefix}.{key}" if prefix else key, f"is not a known field of {parent}",
                             text=f"invalid {parent}: has an unknown field {key!r}")  # fmt: skip
    # The key itself is untrusted: do not make it part of the field name.
    raise InvalidPayload(parent, f"has an unknown field {_describe(key)}")


def _is_echoable(value: str) -> bool:
    return len(value) <= _ECHO_MAX and all(ch in _PRINTABLE_ASCII for ch in value)


def _describe(value: object) -> str:
    """A short, log-safe description: the repr of short printable values, else only their shape."""
    if isinstance(value, str):
        if _is_echoable(value):
            return repr(value)
        if len(value) > _ECHO_MAX:
            return f"a string of {len(value)} characters (not shown)"
        return "a string with non-printable or non-ASCII characters (not shown)"
    if value is None or isinstance(value, bool | int | float):
        text = repr(value)
        return text if len(text) <= _ECHO_MAX else f"a {_type_name(value)} (not shown)"
    return _type_name(value)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"
