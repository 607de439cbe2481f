"""Client for the admin APIs of the auth, realtime and storage services.

The contract (see ``docs/services.md``)::

    PUT    /tenants/{project_id}   JSON body with tenant_id; upsert; 200 or 201 + JSON object
    GET    /tenants/{project_id}   200 + JSON object, or 404
    DELETE /tenants/{project_id}   200/204, or 404 (already gone: counts as done)
    Authorization: Bearer <token>

Failures are classified for the retry policy: timeouts, dropped or refused connections, an
answer cut short of its ``Content-Length``, 408, 429 and 5xx raise
:class:`~tasks.errors.TransientError` (with the ``Retry-After`` a 429 or 503 gave, which the
next attempt waits at least); 409 raises :class:`~tasks.errors.Conflict`; any other unexpected
status (401, 403, other 4xx, redirects, which are not followed) raises
:class:`~tasks.errors.PermanentError`. Messages name the service, method, path and status, and
never contain the token.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import http.client
import json
import socket
import ssl
import threading
import time
from urllib.parse import quote, quote_plus, urlsplit

from tasks.errors import Conflict, PermanentError, TransientError
from tasks.provision.apikeys import REDACTED, redact

__all__ = ["ServiceClient"]

_TRANSIENT_STATUSES = frozenset({408, 429})
# A snippet of the response body helps an operator; the whole body could be a page of HTML.
_BODY_SNIPPET = 200
#: The most of an answer's body read: an admin API answers with a small JSON object.
_MAX_BODY = 1 << 20
#: How much of an error body is scrubbed before its snippet is cut from it (redaction
#: costs grow with the text; whatever lies past this is cut off anyway).
_SCRUBBED = 4096
_USER_AGENT = "controlplane-tasks"
#: Redirects that say the request belongs at another address, so this one applied nothing
#: (a 302 or 303 may come after the request was applied: the answer to a POST, say).
_MOVED = frozenset({301, 307, 308})


def _spellings(token: str) -> list[str]:
    """``token`` as a service echoing it may write it, longest first: as is, JSON-escaped (``/``
    as ``\\/`` too), percent-encoded, and inside base64 or URL-safe base64 text (the part of its
    encoding that does not depend on what comes before or after it, at each of the three byte
    alignments)."""
    escaped = json.dumps(token)[1:-1]
    forms = {token, escaped, escaped.replace("/", "\\/"), quote(token, safe=""), quote_plus(token), quote(token)}
    raw = token.encode()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for offset in range(3):
            text = encode(b"\0" * offset + raw).decode()
            stable = text[4 if offset else 0 : -4]  # the first group holds the padding bytes, the last the end
            if len(stable) >= 8:
                forms.add(stable)
    return sorted(forms, key=len, reverse=True)


class ServiceClient:
    """Talks to one service's admin API; a new connection per request, so it is thread-safe."""

    def __init__(self, name: str, base_url: str, token: str, timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{name}: service URL must be http:// or https:// with a host")
        if parts.username or parts.password:
            # Credentials travel in the token, and a URL is too easily logged.
            raise ValueError(f"{name}: service URL must not contain credentials")
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            # http.client would echo an invalid header value (the token) in its error.
            raise ValueError(f"{name}: service token must be non-empty printable ASCII without spaces")
        if timeout <= 0:
            raise ValueError(f"{name}: timeout must be positive")
        try:
            port = parts.port
        except ValueError:  # urllib's own message quotes the URL
            raise ValueError(f"{name}: service URL has a port that is not a number from 0 to 65535") from None
        self.name = name
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = port
        self._base_path = parts.path.rstrip("/")
        self._token = token

    def __repr__(self) -> str:
        scheme = "https" if self._https else "http"
        port = f":{self._port}" if self._port else ""
        return f"ServiceClient({self.name!r}, '{scheme}://{self._host}{port}{self._base_path}')"

    def put_tenant(self, project_id: str, body: dict[str, object]) -> dict[str, object]:
        """Create or update the project's tenant; returns the service's record."""
        if "tenant_id" not in body:
            raise ValueError("the tenant body must include tenant_id")
        status, data, path, headers = self._request("PUT", project_id, body)
        if 200 <= status < 300:
            return self._json_object("PUT", path, status, data)
        raise self._error("PUT", path, status, data, headers)

    def get_tenant(self, project_id: str) -> dict[str, object] | None:
        """The service's record of the project's tenant, or None if it has none."""
        status, data, path, headers = self._request("GET", project_id, None)
        if status == 200:
            return self._json_object("GET", path, status, data)
        if status == 404:
            return None
        raise self._error("GET", path, status, data, headers)

    def delete_tenant(self, project_id: str) -> None:
        """Remove the project's tenant; a tenant that does not exist counts as removed."""
        status, data, path, headers = self._request("DELETE", project_id, None)
        if 200 <= status < 300 or status == 404:
            return
        raise self._error("DELETE", path, status, data, headers)

    def _request(
        self, method: str, project_id: str, body: dict[str, object] | None
    ) -> tuple[int, bytes, str, http.client.HTTPMessage]:
        path = f"{self._base_path}/tenants/{quote(project_id, safe='')}"
        headers = {
            "Authorization": f"Bearer {self._token}",
            "Accept": "application/json",
            "User-Agent": _USER_AGENT,
        }
        payload: bytes | None = None
        if body is not None:
            payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
            headers["Content-Type"] = "application/json"
        conn: http.client.HTTPConnection
        if self._https:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout)
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        where = f"{self.name} {method} {path}"
        # The socket's timeout bounds each read, not the request: a server that trickles its
        # answer a byte at a time would hold the step for as long as it likes. The whole
        # request gets SERVICE_TIMEOUT_SECONDS; past it, the connection is cut under the read.
        expired = threading.Event()

        def cut() -> None:
            expired.set()
            with contextlib.suppress(OSError, AttributeError, ValueError):
                # socket.socket's own shutdown, not SSLSocket's, which unwraps the TLS layer
                # under the reading thread's feet
                socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)

        watchdog = threading.Timer(self.timeout, cut)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            status, data = response.status, response.read(_MAX_BODY)
            if expired.is_set():  # cut short: what was read is not the whole answer
                raise TransientError(f"{where}: no whole answer within {self.timeout:g}s")
            if response.length and len(data) < _MAX_BODY:
                # The connection closed before the body its Content-Length announced (http.client
                # hands over the short body): a dropped connection, not an answer it could not read.
                raise TransientError(f"{where}: HTTP {status}, the connection closed {response.length} bytes "
                                     "short of its answer")  # fmt: skip
            return status, data, path, response.headers
        except (TimeoutError, OSError, ValueError, http.client.HTTPException) as exc:
            if expired.is_set() or isinstance(exc, TimeoutError):
                raise TransientError(f"{where}: no answer within {self.timeout:g}s") from exc
            if isinstance(exc, ssl.SSLCertVerificationError):
                # A certificate that does not verify will not verify on the next attempt either.
                # The request was never sent: nothing can have been applied.
                refused = PermanentError(f"{where}: TLS certificate verification failed")
                refused.refused = True  # type: ignore[attr-defined]
                raise refused from exc
            # Refused, reset, dropped after the request was sent, DNS failure: the request may
            # or may not have been applied; PUT and DELETE are idempotent, so retrying is safe.
            raise TransientError(f"{where}: connection failed ({type(exc).__name__})") from exc
        finally:
            watchdog.cancel()
            conn.close()

    def _json_object(self, method: str, path: str, status: int, data: bytes) -> dict[str, object]:
        if not data.strip():
            return {}
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise PermanentError(f"{self.name} {method} {path}: HTTP {status} with a non-JSON body") from exc
        except RecursionError:
            # (an array or object nested thousands deep: no tenant record, and no retry reads it better)
            raise PermanentError(f"{self.name} {method} {path}: HTTP {status} body is nested too deep to be a "
                                 "tenant record") from None
        if not isinstance(value, dict):
            raise PermanentError(f"{self.name} {method} {path}: HTTP {status} body is not a JSON object")
        return value

    def _error(
        self, method: str, path: str, status: int, data: bytes, headers: http.client.HTTPMessage | None = None
    ) -> Exception:
        message = f"{self.name} {method} {path}: HTTP {status}"
        header = headers.get if headers is not None else (lambda name: None)
        if 300 <= status < 400:
            # Not followed (the token would go wherever it points): the URL setting is to mend.
            message += (f", a redirect{self._to(header('Location'))}: set {self.name.upper()}_SERVICE_URL "
                        "to the address the service answers at")  # fmt: skip
        # A refused credential's answer says nothing the status does not, and is where a service
        # would echo the Authorization header back: not quoted at all.
        snippet = "" if status in (401, 403) or 300 <= status < 400 else self._snippet(data)
        if snippet:
            message = f"{message}: {snippet}"
        if status >= 500 or status in _TRANSIENT_STATUSES:
            return TransientError(message, retry_after=_retry_after(header("Retry-After")))
        error = (
            Conflict(message) if status == 409
            else PermanentError(f"{message} (check the {self.name} service token)") if status in (401, 403)
            else PermanentError(message)
        )
        # A 4xx is the service refusing the request: it applied nothing; so is a redirect to
        # where the request belongs. Any other answer (a 2xx it could not read, a 1xx, a 302 or
        # 303) may have come after it applied it.
        error.refused = 400 <= status < 500 or status in _MOVED  # type: ignore[attr-defined]
        return error

    def _to(self, location: str | None) -> str:
        """Where a redirect points, as scheme and host only (its path or query could carry anything)."""
        if not location:
            return ""
        try:
            parts = urlsplit(location)
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            return ""
        where = f"{parts.scheme}://{parts.hostname}{port}" if parts.hostname else ""
        return f" to {self._snippet(where.encode())}" if where else " within the service"

    def _snippet(self, data: bytes) -> str:
        # A server may echo the request, headers included: scrub before it reaches a log, in
        # every spelling an echo gives it (JSON escapes, percent-encoding, base64). Replace
        # before truncating, so no cut can leave part of the token behind.
        text = data[:_SCRUBBED].decode("utf-8", "replace")
        for form in _spellings(self._token):
            text = text.replace(form, REDACTED)
        text = redact(text)
        text = "".join(ch if ch.isprintable() else " " for ch in text)
        text = " ".join(text.split())
        return text[:_BODY_SNIPPET]


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header's wait in seconds (a number of seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # ("²".isdigit() is true, and float() refuses it)
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)
