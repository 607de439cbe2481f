"""One frozen settings object, read from the environment once and validated.

Every default works on a laptop: with ``DATABASE_URL`` unset the project runs on
an embedded PostgreSQL kept under ``CONTROLPLANE_HOME`` (``./.controlplane``).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from models.queries import INT_RANGE
from models.queries import MAX_DELAY_MS as MAX_DELAY_MS  # (re-exported: its home for tasks)
from tasks.errors import ConfigurationError

#: The services a project can be registered with, in registration order.
SERVICE_NAMES = ("auth", "realtime", "storage")


#: Drawn once per process (again in a forked child): see :func:`worker_id`.
_process_tag = secrets.token_hex(3)


def _draw_process_tag() -> None:
    global _process_tag
    _process_tag = secrets.token_hex(3)


os.register_at_fork(after_in_child=_draw_process_tag)


def worker_id(hostname: str) -> str:
    """How this process is named in its claims, its heartbeat row and ``control_plane.jobs.worker``:
    ``host:pid:tag``, ``tag`` six hex digits drawn at random once per process. ``host:pid`` alone
    is not unique: containers that share the host's network share its name, and each numbers its
    processes from 1, so their workers' ids matched. One heartbeat row then stood for both, a
    worker's lease keeper kept the other's claims, and a clean shutdown deleted the other's row."""
    return f"{hostname}:{os.getpid()}:{_process_tag}"


def _snapshot(environ: Mapping[str, str]) -> dict[str, str]:
    """A copy of the environment that another thread's change cannot break: ``dict(os.environ)``
    lists the names and then reads each, and raises KeyError for one deleted in between
    (worker threads read the settings at every provisioning step)."""
    return {name: value for name in list(environ) if (value := environ.get(name)) is not None}


def _url(env: dict[str, str], name: str) -> str | None:
    raw = env.get(name) or None
    if raw is None:
        return None
    if not raw.startswith(("postgres://", "postgresql://")):
        raise ConfigurationError(f"{name} must be a postgresql:// URL")
    problem = _url_problem(raw)
    if problem:
        raise ConfigurationError(f"{name} {problem}")
    return raw


def _url_problem(url: str) -> str | None:
    """Why libpq would misread ``url`` (None when it reads it), in words that quote none of it.

    A password holding a '/' or an '@' that is not percent-encoded (``openssl rand -base64``
    makes '/' often) ends the URL's host part early: libpq then takes part of the password
    for the port or the host, and its connection error quotes that part, into every log and
    ``last_error`` that error reaches, after retries that cannot help."""
    from psycopg2 import ProgrammingError
    from psycopg2.extensions import parse_dsn

    from tasks.redaction import unquoted

    try:
        parts = parse_dsn(url)
    except ProgrammingError as exc:  # "invalid dsn: <libpq's words>"
        first = next(iter(str(exc).strip().splitlines()), "").removeprefix("invalid dsn: ")
        return f"is not a valid PostgreSQL URL ({unquoted(first)})"
    ports = (parts.get("port") or "").split(",")
    # (A '/' after digits: the user name read as the host, the digits as the port, the rest of
    # the password and the host as the database's name, which the server's refusal quotes.)
    misread = "@" in (parts.get("host") or "") or "@" in (parts.get("dbname") or "")
    if any(port and not port.isdigit() for port in ports) or misread:
        return (
            "is not a valid PostgreSQL URL: its port is not a number, or its host or database name holds "
            "an '@'; a password or user name with '/', '@' or '%' must be percent-encoded ('/' as %2F, "
            "'@' as %40, '%' as %25)"
        )
    return None


#: ``BROKER_URL`` for Dramatiq's in-memory StubBroker: unit tests of actors, without a database.
STUB_BROKER_URL = "stub://"


def _broker_url(env: dict[str, str]) -> str | None:
    raw = env.get("BROKER_URL") or None
    if raw is not None and raw != STUB_BROKER_URL and not raw.startswith(("amqp://", "amqps://")):
        raise ConfigurationError(
            "BROKER_URL must be an amqp:// URL (RabbitMQ), or stub:// (Dramatiq's StubBroker, for unit "
            "tests); leave it unset for the PostgreSQL broker"
        )
    if raw is not None and raw != STUB_BROKER_URL and _amqp_url_misread(raw):
        raise ConfigurationError(
            "BROKER_URL is not a valid AMQP URL: its port is not a number, or its user name and password "
            "end before its '@'; a password or user name with '/', '?', '#' or '%' must be percent-encoded "
            "('/' as %2F, '?' as %3F, '#' as %23, '%' as %25)"
        )
    return raw


def _amqp_url_misread(url: str) -> bool:
    """Whether pika (``urllib.parse``) would misread ``url``: a '/', '?' or '#' in its password
    not percent-encoded ends the URL's authority there, and the password's head is taken for the
    port, whose ValueError ("Port could not be cast to integer value as 'Top'") reached every
    command's and worker's traceback; or for the host, the rest of the password for the vhost."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return True
    return "@" in url.partition("://")[2] and "@" not in parts.netloc


#: What makes a PostgreSQL interval negative: a minus sign (not one between digits: the
#: SQL-standard '1-2' and ISO 8601's 'P0001-02-03' are positive), or "ago".
_NEGATIVE_RE = re.compile(r"(?<!\d)-|\bago\b", re.IGNORECASE)
#: The words PostgreSQL's interval input knows (its ``deltatktbl``, which it compares on their
#: first 10 letters: "microseconds" is "microsecon"), less "ago" (refused above) and those only
#: EXTRACT takes ("quarter", "timezone").
INTERVAL_WORDS = frozenset(
    "c cent centuries century d day days dec decade decades decs h hour hours hr hrs m microsecon "
    "mil millennia millennium millisecon mils min mins minute minutes mon mons month months ms msec "
    "msecond mseconds msecs s sec second seconds secs us usec usecond useconds usecs w week weeks y year "
    "years yr yrs".split()
)
#: ISO 8601's interval forms (P7D, PT12H, P0001-02-03T04:05:06; PostgreSQL wants the capital P),
#: whose letters are not words.
_ISO_8601_RE = re.compile(r"P[\dT]")


def retention_problem(value: str) -> str | None:
    """Why ``value`` is not a retention period (None when it may be: PostgreSQL has the last word):
    a bare number is seconds to PostgreSQL, "7 days ago" or "-7 days" is negative, and "0 days"
    is nothing; each would prune every finished job. A word that is no unit ("7 dyas") would
    fail every prune, found only at the first (03:00 by default)."""
    text = value.strip()
    if not any(ch.isdigit() for ch in text):
        return f"{value!r} has no number"
    if text.replace(".", "", 1).isdigit():
        return f"{value!r} has no unit (PostgreSQL would read seconds); write e.g. '{text} days'"
    if _NEGATIVE_RE.search(text):
        return f"{value!r} is negative: a retention is a positive period such as '7 days'"
    if all(ch == "0" for ch in text if ch.isdigit()):
        return f"{value!r} is zero: a retention is a positive period such as '7 days'"
    if not _ISO_8601_RE.match(text):
        for word in re.findall(r"[^\W\d_]+", text):  # letters, any alphabet's
            if word.lower()[:10] not in INTERVAL_WORDS:
                return f"{value!r}: {word!r} is not a unit PostgreSQL knows (write e.g. '7 days', '12 hours')"
    return None


def _interval(env: dict[str, str], name: str, default: str) -> str:
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    problem = retention_problem(raw)
    if problem:
        raise ConfigurationError(f"{name} must be a PostgreSQL interval such as {default!r}: {problem}")
    return raw


def _schedule(env: dict[str, str], name: str, default: str) -> str | None:
    raw = " ".join((env.get(name) or "").split())
    if not raw:
        return default
    if raw.lower() == "off":
        return None
    from tasks.cron import CronError, parse

    try:
        parse(raw)
    except CronError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None
    return raw


def _port(env: dict[str, str], name: str) -> int | None:
    port = _int(env, name, 0, minimum=0)
    if port > 65535:
        raise ConfigurationError(f"{name} must be a TCP port (1-65535), got {port}")
    return port or None


#: The longest interval, lease or timeout in seconds: past it a lease overflowed PostgreSQL's
#: timestamps (every claim failed), and a poll interval that long never looked at delayed jobs.
MAX_SECONDS = 86_400.0
#: MAX_DELAY_MS (``models.queries``, whose result statements cut a TTL to it): the longest delay
#: a message may wait, 100 years in milliseconds. PostgreSQL's timestamps end at year 294276,
#: and a retry's delay past them failed the settle of its worker's whole queue, again and
#: again. A send asking for more is refused; a retry's delay is cut to it; no backoff or
#: result TTL may be set longer.
#: ``max_retries=None`` (Dramatiq's "retry forever"), as attempts: the jobs row, the reaper
#: and the operator views need a number. A billion attempts outlast any backoff (capped at
#: ``max_backoff``, 7 days by default), and twice it, which the reaper computes, fits an ``int``.
#: No actor, message or setting may ask for more.
UNLIMITED_ATTEMPTS = 1_000_000_000
#: PostgreSQL's int: a timeout or connection limit passed to it.
_MAX_INT = INT_RANGE.stop - 1


def _float(
    env: dict[str, str], name: str, default: float, maximum: float = MAX_SECONDS, *, zero: bool = False
) -> float:
    """A number of seconds, positive (or 0 too, with ``zero``: off)."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero) or value > maximum:
        kind = "a number of seconds from 0 (off)" if zero else "a positive number of seconds"
        raise ConfigurationError(f"{name} must be {kind} up to {maximum:g}, got {raw!r}")
    return value


def _switch(env: dict[str, str], name: str, default: bool) -> bool:
    raw = (env.get(name) or "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "on", "true", "yes"):
        return True
    if raw in ("0", "off", "false", "no"):
        return False
    raise ConfigurationError(f"{name} must be on or off, got {env.get(name)!r}")


def _int(env: dict[str, str], name: str, default: int, minimum: int = 0, maximum: int = _MAX_INT) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, got {raw!r}")
    if value > maximum:
        raise ConfigurationError(f"{name} must be at most {maximum}, got {raw!r}")
    return value


#: Queues whose jobs one worker process runs at most this many of at once, unless told otherwise:
#: a provisioning step is DDL on the tenant server, and sixteen at once on two cores cost a fifth
#: to a third more CPU per project than four and finished later (docs/performance.md, change 26).
PROVISIONING_QUEUE = "provisioning"
DEFAULT_QUEUE_CONCURRENCY = {PROVISIONING_QUEUE: 2}

#: Dramatiq's pattern for a queue's name.
QUEUE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9._-]*")


def _queue_concurrency(env: dict[str, str], name: str) -> dict[str, int]:
    """``queue=N,...`` (``queue=off`` lifts one queue's limit, ``off`` every limit) over the defaults."""
    limits = dict(DEFAULT_QUEUE_CONCURRENCY)
    raw = (env.get(name) or "").strip()
    if not raw:
        return limits
    if raw.lower() == "off":
        return {}
    for entry in raw.split(","):
        queue, sep, value = (part.strip() for part in entry.partition("="))
        if not sep or not QUEUE_NAME.fullmatch(queue):
            raise ConfigurationError(f"{name} must read queue=N,... (or off), got {entry.strip()!r}")
        if value.lower() == "off":
            limits.pop(queue, None)
            continue
        if not re.fullmatch(r"[0-9]+", value) or int(value) < 1:
            raise ConfigurationError(f"{name}: the limit of queue {queue!r} must be a whole number from 1, or off")
        limits[queue] = int(value)
    return limits


@dataclass(frozen=True)
class Settings:
    """What the broker, the workers and the CLI need to know about their world."""

    #: The control plane's PostgreSQL; ``None`` means the embedded server.
    database_url: str | None
    #: Where the embedded server keeps its data (and other local state).
    home: Path
    #: Longest wait between two looks at the queue when no NOTIFY arrives.
    poll_interval: float = 1.0
    #: How long a claimed message stays leased to a worker without a heartbeat.
    lease_seconds: float = 30.0
    #: How often a worker extends the leases of the messages it holds.
    heartbeat_interval: float = 10.0
    #: How often a worker looks for expired leases of dead workers.
    reap_interval: float = 5.0
    #: How long a worker process's lease keeper (``tasks/lease_keeper.py``) keeps its leases
    #: while its own threads cannot heartbeat (a job holding the GIL); 0: no keeper.
    lease_keeper_seconds: float = 600.0
    #: Under a backlog, how long a consumer gathers finished messages before one SETTLE (0: never wait).
    settle_window_ms: float = 5.0
    #: Run the broker's hot statements as prepared statements (off behind PgBouncer's transaction pooling).
    prepared_statements: bool = True
    #: A send NOTIFYs a queue only while one of its consumers waits for work (off: every
    #: send NOTIFYs, as releases before this one did; for a rolling upgrade from them).
    wake_only_waiting: bool = True
    #: While a queue's jobs run under 50 ms on average, a consumer holds this many times
    #: Dramatiq's prefetch (bigger claims and settles); 1 turns it off.
    burst_prefetch: int = 4
    #: Queue -> the most of its jobs one worker process holds, and so runs, at once (below
    #: Dramatiq's prefetch, never bursting above it): work that contends for something outside
    #: the worker, such as provisioning's DDL on the tenant server, gains nothing from more.
    queue_concurrency: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_QUEUE_CONCURRENCY))
    #: Connections a worker process keeps for sends and results (besides one per queue).
    pool_size: int = 2
    #: Retry policy defaults (Dramatiq's backoff, in milliseconds).
    max_attempts: int = 20
    min_backoff_ms: int = 15_000
    max_backoff_ms: int = 7 * 86_400_000
    #: How long results stay in the results backend.
    result_ttl_ms: int = 86_400_000
    #: The host part of this process's :func:`worker_id`.
    hostname: str = field(default_factory=socket.gethostname)

    # -- brokers, periodic tasks, retention, metrics -----------------------------
    #: ``amqp://...``: Dramatiq's RabbitMQ broker instead of ours (the jobs mirror stays in PostgreSQL);
    #: ``stub://``: Dramatiq's StubBroker, in memory (unit tests).
    broker_url: str | None = None
    #: How long completed (and cancelled) jobs, and failed ones, are kept by the daily ``controlplane.prune``.
    retention_completed: str = "7 days"
    retention_failed: str = "30 days"
    #: When ``controlplane.prune`` runs (cron, UTC); None: never.
    prune_schedule: str | None = "0 3 * * *"
    #: Port of the workers' Prometheus endpoint (Dramatiq's metrics); None: no endpoint.
    metrics_port: int | None = None
    #: Address the workers' and ``controlplane metrics``' endpoints listen on.
    metrics_host: str = "0.0.0.0"  # Prometheus scrapes from another machine

    # -- provision_project ----------------------------------------------------
    #: The server tenant databases are created on (None: the control plane's own).
    provision_database_url: str | None = None
    #: Admin API base URL and bearer token of each service (None: not configured).
    service_urls: dict[str, str] = field(default_factory=dict)
    service_tokens: dict[str, str] = field(default_factory=dict)
    #: Client timeout of one admin API call, in seconds.
    service_timeout: float = 5.0
    #: Server-side secret keying API key hashes and secret derivation (None: a per-home file).
    api_key_pepper: bytes | None = None
    #: How long the caller may read a project's secrets (once).
    secrets_ttl_seconds: int = 86_400
    #: When ``provision_project.sweep`` runs (cron, UTC): stuck projects to compensation,
    #: expired secrets erased; None: never.
    provision_sweep_schedule: str | None = "*/10 * * * *"
    #: Connection limit of each tenant's app role.
    app_connection_limit: int = 20
    #: statement_timeout and lock_timeout of every provisioning session, in milliseconds.
    provision_statement_timeout_ms: int = 30_000
    provision_lock_timeout_ms: int = 5_000

    @property
    def postgres_broker(self) -> bool:
        """Whether the messages go through our broker (no ``BROKER_URL``): its message
        table then holds exactly the live jobs, a cheaper place to look than the history."""
        return self.broker_url is None

    @property
    def stub_broker(self) -> bool:
        """Whether the messages go through Dramatiq's StubBroker (``BROKER_URL=stub://``): in
        memory, for unit tests; nothing is written to PostgreSQL."""
        return self.broker_url == STUB_BROKER_URL

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate the settings; a bad value raises ConfigurationError naming it."""
        env = _snapshot(os.environ if environ is None else environ)
        url = env.get("DATABASE_URL") or None
        if url is not None and not url.startswith(("postgres://", "postgresql://", "postgresql+psycopg2://")):
            raise ConfigurationError("DATABASE_URL must be a postgresql:// URL")
        if url is not None and url.startswith("postgresql+psycopg2://"):
            url = "postgresql://" + url.removeprefix("postgresql+psycopg2://")
        if url is not None and (problem := _url_problem(url)):
            raise ConfigurationError(f"DATABASE_URL {problem}")
        lease = _float(env, "CONTROLPLANE_LEASE_SECONDS", 30.0)
        heartbeat = _float(env, "CONTROLPLANE_HEARTBEAT_INTERVAL", min(10.0, lease / 3))
        if heartbeat >= lease:
            raise ConfigurationError("CONTROLPLANE_HEARTBEAT_INTERVAL must be shorter than the lease")
        return cls(
            database_url=url,
            home=Path(env.get("CONTROLPLANE_HOME") or ".controlplane").resolve(),
            poll_interval=_float(env, "CONTROLPLANE_POLL_INTERVAL", 1.0),
            lease_seconds=lease,
            heartbeat_interval=heartbeat,
            reap_interval=_float(env, "CONTROLPLANE_REAP_INTERVAL", min(5.0, lease / 2)),
            lease_keeper_seconds=_float(env, "CONTROLPLANE_LEASE_KEEPER_SECONDS", 600.0, zero=True),
            pool_size=_int(env, "CONTROLPLANE_POOL_SIZE", 2, minimum=1, maximum=10_000),
            settle_window_ms=_int(env, "CONTROLPLANE_SETTLE_WINDOW_MS", 5, minimum=0, maximum=60_000),
            prepared_statements=_switch(env, "CONTROLPLANE_PREPARED_STATEMENTS", True),
            wake_only_waiting=_switch(env, "CONTROLPLANE_WAKE_ONLY_WAITING", True),
            burst_prefetch=_int(env, "CONTROLPLANE_BURST_PREFETCH", 4, minimum=1, maximum=1_000),
            queue_concurrency=_queue_concurrency(env, "CONTROLPLANE_QUEUE_CONCURRENCY"),
            max_attempts=_int(env, "CONTROLPLANE_MAX_ATTEMPTS", 20, minimum=1, maximum=UNLIMITED_ATTEMPTS),
            min_backoff_ms=_int(env, "CONTROLPLANE_MIN_BACKOFF_MS", 15_000, minimum=1, maximum=MAX_DELAY_MS),
            max_backoff_ms=_int(env, "CONTROLPLANE_MAX_BACKOFF_MS", 7 * 86_400_000, minimum=1, maximum=MAX_DELAY_MS),
            result_ttl_ms=_int(env, "CONTROLPLANE_RESULT_TTL_MS", 86_400_000, minimum=1, maximum=MAX_DELAY_MS),
            broker_url=_broker_url(env),
            retention_completed=_interval(env, "CONTROLPLANE_RETENTION_COMPLETED", "7 days"),
            retention_failed=_interval(env, "CONTROLPLANE_RETENTION_FAILED", "30 days"),
            prune_schedule=_schedule(env, "CONTROLPLANE_PRUNE_SCHEDULE", "0 3 * * *"),
            metrics_port=_port(env, "CONTROLPLANE_METRICS_PORT"),
            metrics_host=env.get("CONTROLPLANE_METRICS_HOST") or "0.0.0.0",
            provision_database_url=_url(env, "PROVISION_DATABASE_URL"),
            service_urls={
                name: env[f"{name.upper()}_SERVICE_URL"].rstrip("/")
                for name in SERVICE_NAMES
                if env.get(f"{name.upper()}_SERVICE_URL")
            },
            service_tokens={
                name: env[f"{name.upper()}_SERVICE_TOKEN"]
                for name in SERVICE_NAMES
                if env.get(f"{name.upper()}_SERVICE_TOKEN")
            },
            service_timeout=_float(env, "SERVICE_TIMEOUT_SECONDS", 5.0),
            api_key_pepper=env["API_KEY_PEPPER"].encode() if env.get("API_KEY_PEPPER") else None,
            secrets_ttl_seconds=_int(
                env, "PROVISION_SECRETS_TTL_SECONDS", 86_400, minimum=1, maximum=MAX_DELAY_MS // 1000
            ),
            provision_sweep_schedule=_schedule(env, "PROVISION_SWEEP_SCHEDULE", "*/10 * * * *"),
            app_connection_limit=_int(env, "PROVISION_APP_CONNECTION_LIMIT", 20, minimum=1),
            provision_statement_timeout_ms=_int(env, "PROVISION_STATEMENT_TIMEOUT_MS", 30_000, minimum=1),
            provision_lock_timeout_ms=_int(env, "PROVISION_LOCK_TIMEOUT_MS", 5_000, minimum=1),
        )


def get_settings() -> Settings:
    """The settings of this process, read from the environment now."""
    return Settings.from_env()
