"""A project's secrets, derived, never stored.

API keys and the app role's password are HMAC-SHA256 derivations of the
server-side pepper, the project id, a purpose and a random per-project nonce.
The nonce stays in ``control_plane.projects.secret_nonce`` only until the
caller reads the secrets once (or they expire); then it is erased and nobody,
the control plane included, can produce them again. Until then a step that
runs twice derives the same secrets: creating the role or the keys again is
idempotent by construction. No plaintext secret is ever written to a table, a
message, a result or a log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
from pathlib import Path

from tasks.errors import ConfigurationError
from tasks.provision import apikeys
from tasks.settings import Settings

logger = logging.getLogger(__name__)

#: The shortest pepper a new deployment takes. The pepper is all that keeps the secrets out
#: of a copy of the control plane's tables (a dump, a standby, a backup): with the stored key
#: hashes and nonces, a guessable one is found offline, and with it every unread secret.
MIN_PEPPER_BYTES = 32

#: (database, fingerprint) pairs this process has found to be its deployment's pepper.
_checked: set[tuple[str, str]] = set()
_checked_lock = threading.Lock()


def pepper(settings: Settings, *, record: bool = True) -> bytes:
    """The server-side pepper: ``API_KEY_PEPPER``, else a random one kept under CONTROLPLANE_HOME;
    the deployment's, or :class:`tasks.errors.ConfigurationError` before anything is derived from it
    (``control_plane.deployment``, migration 0013). ``record``: the first pepper used in a
    deployment becomes its pepper (a step's; not a reveal's, which checks what it derives against
    the stored hashes instead)."""
    if settings.api_key_pepper:
        _check(settings.api_key_pepper, "API_KEY_PEPPER", None, record)
        return settings.api_key_pepper
    path = settings.home / "api-key-pepper"
    created = False
    if not path.exists():
        settings.home.mkdir(parents=True, exist_ok=True)
        created = _create_private(path, secrets.token_hex(32))
    elif path.stat().st_mode & 0o077:
        logger.warning("%s can be read by other users of this machine (mode %o): chmod 600 it", path,
                       path.stat().st_mode & 0o777)
    value = path.read_text().strip().encode()
    if not value:
        raise RuntimeError(f"{path} is empty: restore it from a backup, or set API_KEY_PEPPER")
    _check(value, f"{path}{', made just now' if created else ''}", path if created else None, record)
    return value


def _check(value: bytes, where: str, made: Path | None, record: bool) -> None:
    """Raise unless ``value`` is the deployment's pepper; with ``record``, make it so if the
    deployment has none recorded yet (the first use of a pepper, or the first since migration 0013).

    ``made``: the pepper file this call created, deleted when it is the wrong one (a process
    started in another directory than the workers), so that it misleads no later process. A pepper
    file made just now is not recorded as the pepper of a deployment that already has API keys:
    those were made with another one.
    """
    import tasks
    from models import project_queries as q
    from tasks import db

    fingerprint = hmac.new(value, b"controlplane:api-key-pepper-fingerprint", hashlib.sha256).hexdigest()[:32]
    database = tasks.database_url()
    with _checked_lock:
        if (database, fingerprint) in _checked:
            return
    wrong = (
        f"the API key pepper of this process ({where}) is not the one this deployment's projects were "
        "provisioned with: nothing was derived from it; give every process the same API_KEY_PEPPER, or the "
        "same CONTROLPLANE_HOME (its api-key-pepper file)"
    )
    with db.transaction(tasks.connection) as conn, conn.cursor() as cur:
        cur.execute(q.RECORDED_PEPPER)
        row = cur.fetchone()
        if row is None:
            if not record:
                return
            cur.execute(q.ANY_API_KEY)
            has_keys = cur.fetchone() is not None
            if made is not None and has_keys:
                made.unlink(missing_ok=True)
                raise ConfigurationError(wrong)
            if not has_keys and len(value) < MIN_PEPPER_BYTES:
                # (A deployment with keys keeps its pepper, short or not: another would void them.)
                raise ConfigurationError(
                    f"the API key pepper of this process ({where}) is {len(value)} bytes: a new "
                    f"deployment's must be at least {MIN_PEPPER_BYTES} random bytes (`openssl rand -hex 32`); "
                    "nothing was derived from it"
                )
            cur.execute(q.PEPPER_FINGERPRINT, {"fingerprint": fingerprint})
            row = cur.fetchone()
            if row is None:  # recorded by another process meanwhile, after this statement's snapshot
                cur.execute(q.RECORDED_PEPPER)
                row = cur.fetchone()
        (recorded,) = row
    if recorded != fingerprint:
        if made is not None:
            made.unlink(missing_ok=True)
        raise ConfigurationError(wrong)
    with _checked_lock:
        if (database, fingerprint) not in _checked and len(value) < MIN_PEPPER_BYTES:
            logger.warning(
                "the API key pepper of this process (%s) is %d bytes: a copy of the control plane's tables "
                "is enough to guess one this short, and with it every unread secret; changing it voids "
                "every existing key (docs/provisioning.md, \"Secrets\")", where, len(value))  # fmt: skip
        _checked.add((database, fingerprint))


def _create_private(path: Path, text: str) -> bool:
    """Create ``path`` (mode 0600) holding ``text``, unless it exists; never half-written.
    True when this call created it.

    The text goes to a file of this process's own, flushed to disk, then is linked under
    ``path`` in one step: a process that finds ``path`` finds it whole, and of two processes
    creating it at once one wins and the other reads the winner's.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    try:
        _write_new(tmp, text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False  # another process created it first: theirs stands
        except OSError:  # a file system without hard links: create it in place, exclusively
            try:
                _write_new(path, text)
            except FileExistsError:
                return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` (mode 0600, ``FileExistsError`` if it exists) holding ``text``, flushed to disk."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _derive(key: bytes, purpose: str, project_id: str, nonce: bytes) -> bytes:
    return hmac.new(key, b"|".join([purpose.encode(), project_id.encode(), nonce]), hashlib.sha256).digest()


def lock_key(key: bytes, purpose: str, project_id: str) -> int:
    """An advisory lock key (a signed 64-bit integer) for ``purpose`` on ``project_id`` that only
    holders of the pepper can compute."""
    digest = hmac.new(key, f"controlplane:lock:{purpose}:{project_id}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def api_key(key: bytes, project_id: str, prefix: str, slot: int, nonce: bytes) -> str:
    """The API key of ``slot`` (1-based)."""
    return apikeys.from_random_bytes(prefix, _derive(key, f"api-key:{slot}", project_id, nonce))


def database_password(key: bytes, project_id: str, nonce: bytes) -> str:
    """The password of the project's app role (43 base62 characters)."""
    raw = _derive(key, "database-password", project_id, nonce)
    return apikeys.from_random_bytes("p", raw).split("_", 1)[1][:43]
