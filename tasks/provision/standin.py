"""Local stand-ins for the auth, realtime and storage admin APIs, with fault switches.

Each :class:`StandinService` is a real HTTP server on loopback that speaks the contract of
``docs/services.md`` (``PUT/GET/DELETE /tenants/{project_id}``, bearer token) over an
in-memory tenant store, so the demo and the tests exercise real sockets, timeouts and
dropped connections instead of mocks.

Fault switches, settable from Python (:meth:`StandinService.set_faults`) or over HTTP
(``POST /_faults`` with a JSON object, for a test in another process):

* ``fail_times``: the next N tenant requests answer 500;
* ``status_429_times``: the next N tenant requests answer 429;
* ``hang_seconds``: every tenant request waits this long before it is handled;
* ``reject_token``: every tenant request answers 401, whatever its token;
* ``drop_after_commit_times``: the next N successful PUT/DELETE are applied, then the
  connection is closed without an answer.

``GET /_state`` returns the tenants, request counts and faults; ``POST /_reset`` clears all.
The ``/_`` endpoints take no token: the stand-ins bind to loopback and hold no real data.

Run all three with ``python -m tasks.provision.standin``: it prints one JSON line per
service (name, URL, settings variable) and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hmac
import json
import logging
import os
import re
import signal
import sys
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from urllib.parse import unquote, urlsplit

__all__ = ["SERVICE_NAMES", "Faults", "StandinService", "main"]

logger = logging.getLogger(__name__)

SERVICE_NAMES: tuple[str, ...] = ("auth", "realtime", "storage")

#: The status recorded in ``request_log`` for a request closed without an answer.
NO_ANSWER = 0

_TENANT_PATH = re.compile(r"/tenants/([^/]+)")
_MAX_BODY = 1 << 20

Record = dict[str, object]


@dataclass
class Faults:
    """The fault switches of one stand-in; all off by default."""

    fail_times: int = 0
    status_429_times: int = 0
    hang_seconds: float = 0.0
    reject_token: bool = False
    drop_after_commit_times: int = 0

    def to_json(self) -> dict[str, object]:
        """The switches as a JSON object."""
        return dataclasses.asdict(self)


@dataclass
class _Outcome:
    status: int
    body: Record | None = None
    drop: bool = False


class StandinService:
    """One stand-in admin API: a threaded HTTP server over an in-memory tenant store."""

    def __init__(self, name: str, token: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self._token = token
        self._address = (host, port)
        self._lock = threading.Lock()
        self._tenants: dict[str, Record] = {}
        self._log: list[tuple[str, str, int]] = []
        self._faults = Faults()
        #: Bumped by reset(): a request that hung across it belongs to a test that is over.
        self._generation = 0
        #: Requests dropped unanswered because they hung across a reset.
        self._stale = 0
        # Set by stop(): wakes requests that hang, so stopping never waits for them.
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"StandinService({self.name!r}, url={self.url if self._server else None!r})"

    def start(self) -> None:
        """Bind the socket and serve on a background thread."""
        if self._server is not None:
            raise RuntimeError(f"stand-in {self.name} is already running")
        self._stopping.clear()
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # serve_forever checks for shutdown() once per poll interval; keep stop() quick.
            kwargs={"poll_interval": 0.05},
            name=f"standin-{self.name}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket; in-flight hanging requests are abandoned."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``."""
        if self._server is None:
            raise RuntimeError(f"stand-in {self.name} is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def tenants(self) -> dict[str, Record]:
        """A copy of the tenant store, keyed by project_id."""
        with self._lock:
            return copy.deepcopy(self._tenants)

    @property
    def request_log(self) -> list[tuple[str, str, int]]:
        """A copy of (method, path, status) for every tenant request, oldest first."""
        with self._lock:
            return list(self._log)

    @property
    def faults(self) -> Faults:
        """A copy of the current fault switches."""
        with self._lock:
            return dataclasses.replace(self._faults)

    def set_faults(
        self,
        *,
        fail_times: int | None = None,
        status_429_times: int | None = None,
        hang_seconds: float | None = None,
        reject_token: bool | None = None,
        drop_after_commit_times: int | None = None,
    ) -> None:
        """Change the given fault switches; the others keep their value."""
        self._update_faults(
            {
                "fail_times": fail_times,
                "status_429_times": status_429_times,
                "hang_seconds": hang_seconds,
                "reject_token": reject_token,
                "drop_after_commit_times": drop_after_commit_times,
            }
        )

    def reset(self) -> None:
        """Forget all tenants and requests and turn every fault off."""
        with self._lock:
            self._tenants.clear()
            self._log.clear()
            self._faults = Faults()
            self._generation += 1

    def state(self) -> dict[str, object]:
        """Tenants, request counts and faults, as served by ``GET /_state``."""
        with self._lock:
            counts = Counter(method for method, _, _ in self._log)
            return {
                "name": self.name,
                "tenants": copy.deepcopy(self._tenants),
                "requests": len(self._log),
                "request_counts": dict(counts),
                "faults": self._faults.to_json(),
                "stale_requests": self._stale,
            }

    def _update_faults(self, changes: Mapping[str, object]) -> None:
        """Apply ``changes`` (a None value keeps the switch) all or nothing; ValueError if invalid."""
        unknown = sorted(str(key) for key in changes if key not in _FAULT_SWITCHES)
        if unknown:
            raise ValueError(f"unknown fault switch {unknown[0][:40]!r}")
        with self._lock:
            old = self._faults
            self._faults = Faults(
                fail_times=_count(changes, "fail_times", old.fail_times),
                status_429_times=_count(changes, "status_429_times", old.status_429_times),
                hang_seconds=_seconds(changes, "hang_seconds", old.hang_seconds),
                reject_token=_flag(changes, "reject_token", old.reject_token),
                drop_after_commit_times=_count(
                    changes, "drop_after_commit_times", old.drop_after_commit_times
                ),
            )

    def _tenant_request(
        self, method: str, path: str, project_id: str, authorization: str, body: bytes
    ) -> _Outcome:
        """Apply faults, then the tenant operation; the caller writes the outcome."""
        with self._lock:
            entry, generation = self._faults, self._generation
            hang = entry.hang_seconds
        if hang > 0 and self._stopping.wait(hang):
            return self._record(method, path, _Outcome(NO_ANSWER, drop=True))
        expected = f"Bearer {self._token}".encode()
        authorized = hmac.compare_digest(authorization.encode(), expected)
        with self._lock:
            if self._generation != generation:
                # Hung across a reset: its client is long gone, and the fresh state is not its.
                self._stale += 1
                return _Outcome(NO_ANSWER, drop=True)
            faults = self._faults
            # A request that hung across a change of faults (its client long gone) must not
            # use up the counted faults set after it arrived: they are meant for new requests.
            counted = faults is entry or hang <= 0
            if faults.reject_token or not authorized:
                outcome = _Outcome(401, {"error": "invalid token"})
            elif not counted:
                outcome = self._apply(method, project_id, body)
            elif faults.status_429_times > 0:
                faults.status_429_times -= 1
                outcome = _Outcome(429, {"error": "slow down"})
            elif faults.fail_times > 0:
                faults.fail_times -= 1
                outcome = _Outcome(500, {"error": "injected failure"})
            else:
                outcome = self._apply(method, project_id, body)
                if (
                    method in ("PUT", "DELETE")
                    and 200 <= outcome.status < 300
                    and faults.drop_after_commit_times > 0
                ):
                    faults.drop_after_commit_times -= 1
                    outcome = _Outcome(NO_ANSWER, drop=True)
            self._log.append((method, path, outcome.status))
        return outcome

    def _record(self, method: str, path: str, outcome: _Outcome) -> _Outcome:
        with self._lock:
            self._log.append((method, path, outcome.status))
        return outcome

    def _apply(self, method: str, project_id: str, body: bytes) -> _Outcome:
        """The tenant operation itself; called with the lock held."""
        if method == "GET":
            record = self._tenants.get(project_id)
            if record is None:
                return _Outcome(404, {"error": "no such tenant"})
            return _Outcome(200, copy.deepcopy(record))
        if method == "DELETE":
            if self._tenants.pop(project_id, None) is None:
                return _Outcome(404, {"error": "no such tenant"})
            return _Outcome(204)
        if method == "PUT":
            try:
                document = json.loads(body)
            except ValueError:
                return _Outcome(400, {"error": "body must be JSON"})
            if not isinstance(document, dict):
                return _Outcome(400, {"error": "body must be a JSON object"})
            tenant_id = document.get("tenant_id")
            if not isinstance(tenant_id, str) or not tenant_id:
                return _Outcome(400, {"error": "tenant_id must be a non-empty string"})
            created = project_id not in self._tenants
            record = {**document, "project_id": project_id}
            self._tenants[project_id] = record
            return _Outcome(201 if created else 200, copy.deepcopy(record))
        return _Outcome(405, {"error": "method not allowed"})


_FAULT_SWITCHES = frozenset(field.name for field in dataclasses.fields(Faults))


def _count(changes: Mapping[str, object], key: str, default: int) -> int:
    value = changes.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} must be a non-negative integer")
    return value


def _seconds(changes: Mapping[str, object], key: str, default: float) -> float:
    value = changes.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{key} must be a non-negative number")
    return float(value)


def _flag(changes: Mapping[str, object], key: str, default: bool) -> bool:
    value = changes.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Do not join handler threads on close: a hanging request must not delay stop().
    block_on_close = False

    def __init__(self, address: tuple[str, int], standin: StandinService) -> None:
        self.standin = standin
        super().__init__(address, _Handler)

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that time out and leave are part of the tests; not worth a traceback.
        logger.debug("stand-in %s: error while handling a request", self.standin.name, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def log_message(self, format: str, *args: object) -> None:
        # The request line only (never headers, so never the token), at debug level.
        logger.debug("stand-in %s: " + format, self.server.standin.name, *args)

    def _dispatch(self, method: str) -> None:
        standin = self.server.standin
        path = urlsplit(self.path).path
        body = self._read_body()
        if body is None:
            self._send(_Outcome(413, {"error": "body too large"}))
            return
        if path.startswith("/_"):
            self._send(self._control(standin, method, path, body))
            return
        match = _TENANT_PATH.fullmatch(path)
        if match is None:
            self._send(standin._record(method, path, _Outcome(404, {"error": "not found"})))
            return
        authorization = self.headers.get("Authorization", "")
        self._send(standin._tenant_request(method, path, unquote(match.group(1)), authorization, body))

    def _control(self, standin: StandinService, method: str, path: str, body: bytes) -> _Outcome:
        if (method, path) == ("GET", "/_state"):
            return _Outcome(200, standin.state())
        if (method, path) == ("POST", "/_reset"):
            standin.reset()
            return _Outcome(200, {})
        if (method, path) == ("POST", "/_faults"):
            try:
                changes = json.loads(body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("body must be a JSON object")
                standin._update_faults(changes)
            except ValueError as exc:
                return _Outcome(400, {"error": str(exc)})
            return _Outcome(200, standin.faults.to_json())
        return _Outcome(404, {"error": "not found"})

    def _read_body(self) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > _MAX_BODY:
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, outcome: _Outcome) -> None:
        if outcome.drop:
            # Close without a status line: the client sees the connection end mid-request.
            self.close_connection = True
            return
        data = b"" if outcome.body is None else json.dumps(outcome.body).encode()
        try:
            self.send_response(outcome.status)
            if outcome.status == 429:
                self.send_header("Retry-After", "0")
            if outcome.body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (e.g. timed out during a hang); nobody is left to answer.
            self.close_connection = True


def main(argv: Sequence[str] | None = None) -> int:
    """Start the three stand-ins, print their URLs as JSON lines, serve until SIGTERM/SIGINT.

    Tokens come from ``AUTH_SERVICE_TOKEN``, ``REALTIME_SERVICE_TOKEN`` and
    ``STORAGE_SERVICE_TOKEN`` (default ``dev-<name>-token``); they are never printed.
    """
    parser = argparse.ArgumentParser(prog="python -m tasks.provision.standin", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    for name in SERVICE_NAMES:
        parser.add_argument(f"--port-{name}", type=int, default=0, help=f"{name} port (0: any free port)")
    args = parser.parse_args(argv)

    services = [
        StandinService(
            name,
            os.environ.get(f"{name.upper()}_SERVICE_TOKEN") or f"dev-{name}-token",
            host=args.host,
            port=getattr(args, f"port_{name}"),
        )
        for name in SERVICE_NAMES
    ]
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for service in services:
            service.start()
            setting = f"{service.name.upper()}_SERVICE_URL"
            print(json.dumps({"service": service.name, "url": service.url, "setting": setting}), flush=True)
        stop.wait()
    finally:
        for service in services:
            service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
