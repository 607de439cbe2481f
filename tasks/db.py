"""Where the control plane's database is, and how to open a connection to it.

With ``DATABASE_URL`` set, that server is used. Unset, an embedded PostgreSQL
is started on first use (:mod:`tasks.embedded`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as queue_module
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg2
import psycopg2.extensions

# re-exported: the embedded server is where the database is when DATABASE_URL is unset
from tasks.embedded import EmbeddedServerError as EmbeddedServerError
from tasks.embedded import embedded_url as embedded_url
from tasks.embedded import has_embedded as has_embedded
from tasks.embedded import running_url as running_url
from tasks.embedded import stop_embedded as stop_embedded
from tasks.redaction import redact, unquoted
from tasks.settings import Settings

logger = logging.getLogger(__name__)

def with_database(url: str, database: str) -> str:
    """The same server URL pointed at another database."""
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=database).render_as_string(hide_password=False)


def database_url(settings: Settings) -> str:
    """The libpq URL of the control plane's database, starting the embedded server if needed."""
    if settings.database_url is not None:
        return settings.database_url
    return embedded_url(settings.home)


def gss_off_unless_asked(url: str) -> dict[str, str]:
    """``gssencmode=disable`` unless the URL or ``PGGSSENCMODE`` sets it.

    libpq's default (``prefer``) first looks for Kerberos credentials, and the Kerberos
    library bundled with psycopg2-binary is not safe to set up from two threads at once
    (psycopg's issues 1088 and 1213: a segmentation fault in the connect). A test process
    crashed so in the twenty-first session; the cause found later for such crashes here is
    another thread changing the environment (docs/reliability.md, "Twenty-fourth session"),
    which may have been that one's too. A deployment that encrypts with GSSAPI says so in
    its URL or environment, and keeps it.
    """
    if "gssencmode" in url or os.environ.get("PGGSSENCMODE"):
        return {}
    return {"gssencmode": "disable"}


def connect_options(url: str) -> dict[str, str]:
    """How every connection of this project connects to ``url`` (the lease keeper's too, which
    gets them in its environment), but for what the URL sets itself: a server that does not
    answer fails a connect in 10 s; keepalives notice a connection cut while idle, and
    ``tcp_user_timeout`` one cut with a statement in flight (keepalives probe only an idle
    connection: a statement sent after the route to the server went away, a failover to another
    address, waited for TCP's retransmissions to give up, about 15 minutes, its thread with it;
    a helper's review in a network namespace: failed after 20 s with it)."""
    try:
        given = psycopg2.extensions.parse_dsn(libpq_url(url))
    except psycopg2.ProgrammingError:
        given = {}
    options = {
        **gss_off_unless_asked(url),
        "connect_timeout": "10",
        "keepalives": "1",
        "keepalives_idle": "10",
        "keepalives_interval": "5",
        "keepalives_count": "3",
        "tcp_user_timeout": "30000",
    }
    return {name: value for name, value in options.items() if name not in given}


def connect(url: str, *, autocommit: bool = False, application_name: str = "controlplane") -> Any:
    """A new psycopg2 connection with keepalives, so a dead server is noticed."""
    conn = psycopg2.connect(url, application_name=application_name, **connect_options(url))
    conn.autocommit = autocommit
    return conn


def libpq_url(url: str) -> str:
    """The libpq spelling of ``url``, given in SQLAlchemy's (see :func:`sqlalchemy_url`) or libpq's."""
    return url.replace("postgresql+psycopg2://", "postgresql://", 1)


def sqlalchemy_url(url: str) -> str:
    """The SQLAlchemy spelling of a libpq URL (psycopg2 driver)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    return url.replace("postgresql://", "postgresql+psycopg2://", 1)


#: SQLSTATEs that end a session from the server's side: connection exceptions
#: (class 08), and the server shutting down or not yet accepting connections.
_SESSION_ENDED = ("08", "57P01", "57P02", "57P03")


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` means the connection is gone (server restart, network cut).

    psycopg2 files much more under ``OperationalError``: a deadlock, a
    serialization failure (see :func:`is_transient`), a cancelled statement, a
    lock timeout, a full disk. Their connection is fine, the statement was
    rolled back; only an error without a SQLSTATE (raised by libpq: refused,
    closed, timed out) or one of ``_SESSION_ENDED`` means the connection is gone.
    """
    if isinstance(exc, psycopg2.InterfaceError):
        return True
    if not isinstance(exc, psycopg2.OperationalError):
        return False
    code = exc.pgcode
    return code is None or code.startswith(_SESSION_ENDED)


def within_lock_timeout(cur: Any, savepoint: str, lock_timeout: str, run: Callable[[], object]) -> bool:
    """Run ``run`` (statements on ``cur``) in the caller's open transaction under a savepoint,
    waiting at most ``lock_timeout`` (``'100ms'``) for a lock. False when a lock was not had in
    time: what ``run`` did is undone, and the transaction goes on as it was (its own lock
    timeout included: a rollback to the savepoint undoes the ``SET LOCAL`` too)."""
    import psycopg2.errors

    cur.execute(f"SAVEPOINT {savepoint}; SET LOCAL lock_timeout = '{lock_timeout}'")
    try:
        run()
    except psycopg2.errors.LockNotAvailable:
        cur.execute(f"ROLLBACK TO SAVEPOINT {savepoint}")
        return False
    cur.execute(f"SET LOCAL lock_timeout TO DEFAULT; RELEASE SAVEPOINT {savepoint}")
    return True


def is_transient(exc: BaseException) -> bool:
    """True when PostgreSQL rolled back ``exc``'s transaction to break a conflict
    (deadlock, serialization failure): running it again may succeed."""
    return isinstance(exc, psycopg2.extensions.TransactionRollbackError)


def loggable_error(exc: BaseException) -> str:
    """``exc`` as one line safe to log: its type, PostgreSQL's primary message and SQLSTATE.

    ``str()`` of a psycopg2 error quotes the statement around the error position
    with its parameters filled in (psycopg2 fills them in on the client) and the
    server's DETAIL, which quotes row values: either can hold a job's arguments,
    so a secret. Neither is kept, nor the value a data exception (SQLSTATE class
    22) quotes in its primary message; a libpq error (no SQLSTATE) keeps its first line.
    """
    detail = ""
    if isinstance(exc, psycopg2.Error):
        detail = getattr(exc.diag, "message_primary", None) or ""
        if exc.pgcode and exc.pgcode.startswith("22"):
            detail = unquoted(detail)
        if exc.pgcode:
            detail = f"{detail} (SQLSTATE {exc.pgcode})"
    if not detail:
        detail = next(iter(str(exc).strip().splitlines()), "")
    detail = " ".join(detail.split())
    return redact(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)


def connection_is_usable(conn: Any) -> bool:
    """True while ``conn`` is open and not in a broken transaction."""
    if conn is None or conn.closed:
        return False
    status = conn.get_transaction_status()
    return bool(status != psycopg2.extensions.TRANSACTION_STATUS_UNKNOWN)


def ended_by_server(conn: Any) -> str | None:
    """The server's last words when it has ended the session (a ``FATAL`` message, which
    psycopg2 keeps as a notice without closing the connection), else None."""
    if conn.notices and conn.notices[-1].startswith("FATAL:"):
        return str(conn.notices[-1]).strip()
    return None


def idle_connection_is_alive(conn: Any) -> bool:
    """True when an idle connection is still usable, without a round trip.

    An idle connection has nothing to read unless the server has closed it
    (restart, ``pg_terminate_backend``, ``idle_session_timeout``): a zero-timeout
    ``select`` sees that. The server's last words come first (a ``FATAL`` message,
    which psycopg2 reads as a notice without closing the connection), then the end
    of the stream; either one means the session is over.
    """
    if not connection_is_usable(conn):
        return False
    import select

    try:
        for _ in range(2):  # the message, then the end of the stream
            readable, _, _ = select.select([conn], [], [], 0)
            if not readable:
                break
            conn.poll()
            if ended_by_server(conn):
                return False
    except (psycopg2.Error, OSError, ValueError):
        return False
    return not conn.closed


def _clean_for_reuse(conn: Any) -> bool:
    """Whether ``conn`` can go back to a pool: idle, or made idle by rolling back what its
    borrower left open (a ``BEGIN`` without ``COMMIT``, a failed statement in a transaction).
    Pooled as it was, the next borrower's statements would join that transaction, or fail."""
    idle = psycopg2.extensions.TRANSACTION_STATUS_IDLE
    status = conn.get_transaction_status()
    if status == idle:
        return _autocommit_again(conn)
    if status not in (psycopg2.extensions.TRANSACTION_STATUS_INTRANS, psycopg2.extensions.TRANSACTION_STATUS_INERROR):
        return False  # a statement still running, or the connection is gone: close it
    try:
        with conn.cursor() as cur:
            cur.execute("ROLLBACK")
    except psycopg2.Error:
        return False
    return conn.get_transaction_status() == idle and _autocommit_again(conn)


def _autocommit_again(conn: Any) -> bool:
    """Put back the pool's autocommit a borrower turned off (its next borrower's sends commit)."""
    if conn.autocommit:
        return True
    try:
        conn.autocommit = True
    except psycopg2.Error:
        return False
    return True


@contextlib.contextmanager
def transaction(connection: Callable[[], contextlib.AbstractContextManager[Any]]) -> Iterator[Any]:
    """One transaction (BEGIN ... COMMIT, ROLLBACK on an exception) on a connection from
    ``connection``, a pool's autocommit connections (``Pool.connection``, ``tasks.connection``)."""
    with connection() as conn:
        with conn.cursor() as cur:
            cur.execute("BEGIN")
        try:
            yield conn
        except BaseException:
            with contextlib.suppress(Exception), conn.cursor() as cur:
                cur.execute("ROLLBACK")
            raise
        with conn.cursor() as cur:
            cur.execute("COMMIT")


class Pool:
    """A small blocking pool of at most ``size`` autocommit connections (sends, results, mirror writes).

    Safe across ``fork``: a child process never uses its parent's sockets, it
    opens its own connections on first use.

    A thread that already holds one of its connections gets another at once, beyond
    ``size``, instead of waiting for one: code that sends (or writes a result, or the
    jobs mirror) while it holds ``tasks.connection()`` would otherwise wait, with
    ``size`` threads doing so at once, for each other forever.
    """

    def __init__(self, url_factory: Callable[[], str], size: int, application_name: str = "controlplane-send") -> None:
        self._url_factory = url_factory
        self._size = size
        self._application_name = application_name
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._idle: queue_module.LifoQueue[Any] = queue_module.LifoQueue()
        self._slots = threading.BoundedSemaphore(self._size)
        #: How many of this pool's connections the current thread holds.
        self._held = threading.local()

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """A connection for the duration of the block, returned to the pool after it."""
        if self._pid != os.getpid():
            self._reset()  # forked: the parent's connections are not ours to use (nor to close)
        held = getattr(self._held, "count", 0)
        if not held:
            self._slots.acquire()
        self._held.count = held + 1
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue_module.Empty:
                conn = None
            if not idle_connection_is_alive(conn):
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
                conn = connect(self._url_factory(), autocommit=True, application_name=self._application_name)
            lost = False
            try:
                yield conn
            except psycopg2.Error as exc:
                lost = is_connection_error(exc)
                raise
            finally:
                # Pooled again unless it is gone, cannot be made idle, or is one too many
                # (a nested borrow's): the outer finally closes it.
                if not lost and self._idle.qsize() < self._size and _clean_for_reuse(conn):
                    self._idle.put(conn)
                    conn = None
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            # One fewer held (not "as many as on entry": blocks may end out of order, a
            # generator's closed after the block that opened it).
            self._held.count -= 1
            if not held:
                self._slots.release()

    def close(self) -> None:
        """Close the idle connections (connections in use go back to the pool when their block ends)."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue_module.Empty:
                return
            with contextlib.suppress(Exception):
                conn.close()
