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

import contextlib
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from tasks.provision import apikeys
from tasks.settings import Settings

NONCE_BYTES = 32


def new_nonce() -> bytes:
    """A fresh random nonce for a new project."""
    return secrets.token_bytes(NONCE_BYTES)


def pepper(settings: Settings) -> bytes:
    """The server-side pepper: ``API_KEY_PEPPER``, else a random one kept under CONTROLPLANE_HOME."""
    if settings.api_key_pepper:
        return settings.api_key_pepper
    path = settings.home / "api-key-pepper"
    if not path.exists():
        settings.home.mkdir(parents=True, exist_ok=True)
        _create_private(path, secrets.token_hex(32))
    value = path.read_text().strip().encode()
    if not value:
        raise RuntimeError(f"{path} is empty: restore it from a backup, or set API_KEY_PEPPER")
    return value


def _create_private(path: Path, text: str) -> None:
    """Create ``path`` (mode 0600) holding ``text``, unless it exists; never half-written.

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
            pass  # another process created it first: theirs stands
        except OSError:  # a file system without hard links: create it in place, exclusively
            with contextlib.suppress(FileExistsError):
                _write_new(path, text)
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


def api_key(key: bytes, project_id: str, prefix: str, slot: int, nonce: bytes) -> str:
    """The API key of ``slot`` (1-based)."""
    return apikeys.from_random_bytes(prefix, _derive(key, f"api-key:{slot}", project_id, nonce))


def database_password(key: bytes, project_id: str, nonce: bytes) -> str:
    """The password of the project's app role (43 base62 characters)."""
    raw = _derive(key, "database-password", project_id, nonce)
    return apikeys.from_random_bytes("p", raw).split("_", 1)[1][:43]
