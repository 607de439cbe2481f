"""A small TCP proxy on 127.0.0.1 in front of PostgreSQL's Unix socket, that the chaos loop can cut.

The soak's workers connect to ``postgresql://postgres@127.0.0.1:<port>/soak``; the proxy
forwards every connection to the embedded server's Unix socket, one thread per direction.
It runs as its own process (``python -m bench.soak.proxy --upstream /path/.s.PGSQL.5432``) so
that forwarding never competes for the soak process's GIL with the producer threads. It
prints ``{"port": N}`` on its first line, then obeys one command per line on stdin and answers
each with one JSON line:

* ``cut F``: close a random fraction ``F`` (0..1] of the open connections, both sides at
  once, as a network failure would (the client sees the connection reset);
* ``stall F S``: stop forwarding on a random fraction ``F`` of the open connections for
  ``S`` seconds, then resume: a partition, with no error, that outlives a lease;
* ``stats``: open connections and counters.

End of stdin (the soak process closed it, or died) stops the proxy. It binds loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

_CHUNK = 65536


class _Pair:
    """One proxied connection: the client's TCP socket and the server's Unix socket."""

    def __init__(self, proxy: Proxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.gate = threading.Event()
        self.gate.set()
        self.closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        for src, dst in ((self.client, self.upstream), (self.upstream, self.client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                self.gate.wait()  # a stall holds the data (and the kernel buffers fill up behind it)
                if self.closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        self.close(abort=False)

    def close(self, *, abort: bool) -> None:
        """Close both sides; ``abort`` resets them (SO_LINGER 0) instead of a clean FIN."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.gate.set()
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                if abort and sock.family == socket.AF_INET:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self.proxy.forget(self)

    def stall(self, seconds: float) -> None:
        self.gate.clear()
        timer = threading.Timer(seconds, self.gate.set)
        timer.daemon = True
        timer.start()


class Proxy:
    """Accepts on 127.0.0.1 and forwards to a Unix socket; cuts and stalls on command."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        self.upstream = upstream
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(256)
        self.port: int = self.listener.getsockname()[1]
        self.pairs: set[_Pair] = set()
        self.lock = threading.Lock()
        self.accepted = 0
        self.refused = 0
        self.cut_total = 0
        self.stalled_total = 0
        self.random = random.Random()

    def serve(self) -> None:
        """Accept forever (on a daemon thread)."""
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.upstream)
            except OSError:
                # The server is down (a restart): the client sees its connection refused/closed.
                with self.lock:
                    self.refused += 1
                for sock in (client, upstream):
                    with contextlib.suppress(OSError):
                        sock.close()
                continue
            pair = _Pair(self, client, upstream)
            with self.lock:
                self.pairs.add(pair)
                self.accepted += 1
            pair.start()

    def forget(self, pair: _Pair) -> None:
        with self.lock:
            self.pairs.discard(pair)

    def _pick(self, fraction: float) -> list[_Pair]:
        with self.lock:
            pairs = sorted(self.pairs, key=id)
        if not pairs:
            return []
        count = max(1, round(len(pairs) * min(max(fraction, 0.0), 1.0)))
        return self.random.sample(pairs, count)

    def cut(self, fraction: float) -> dict[str, int]:
        chosen = self._pick(fraction)
        for pair in chosen:
            pair.close(abort=True)
        with self.lock:
            self.cut_total += len(chosen)
            return {"cut": len(chosen), "open": len(self.pairs)}

    def stall(self, fraction: float, seconds: float) -> dict[str, int]:
        chosen = self._pick(fraction)
        for pair in chosen:
            pair.stall(seconds)
        with self.lock:
            self.stalled_total += len(chosen)
            return {"stalled": len(chosen), "open": len(self.pairs)}

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {
                "open": len(self.pairs),
                "accepted": self.accepted,
                "refused": self.refused,
                "cut": self.cut_total,
                "stalled": self.stalled_total,
            }

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()
        for pair in self._pick(1.0):
            pair.close(abort=False)


def main(argv: list[str] | None = None) -> int:
    """Run the proxy until stdin closes."""
    parser = argparse.ArgumentParser(prog="python -m bench.soak.proxy", description=__doc__)
    parser.add_argument("--upstream", required=True, help="path of the server's Unix socket (.s.PGSQL.PORT)")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: a free one)")
    args = parser.parse_args(argv)
    proxy = Proxy(args.upstream, args.port)
    threading.Thread(target=proxy.serve, daemon=True, name="accept").start()
    print(json.dumps({"port": proxy.port}), flush=True)
    for line in sys.stdin:
        words = line.split()
        answer: dict[str, Any]
        try:
            if not words:
                continue
            if words[0] == "cut":
                answer = proxy.cut(float(words[1]))
            elif words[0] == "stall":
                answer = proxy.stall(float(words[1]), float(words[2]))
            elif words[0] == "stats":
                answer = proxy.stats()
            else:
                answer = {"error": f"unknown command {words[0]!r}"}
        except (IndexError, ValueError) as exc:
            answer = {"error": str(exc)}
        print(json.dumps(answer), flush=True)
    proxy.close()
    return 0


class ProxyProcess:
    """The proxy as a child process of the soak, driven over its stdin and stdout."""

    def __init__(self, upstream: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.soak.proxy", "--upstream", upstream],
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lock = threading.Lock()
        first = self._read()
        self.port = int(first["port"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the proxy exited with {self.proc.poll()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def command(self, text: str) -> dict[str, Any]:
        """Send one command line and return the proxy's answer."""
        assert self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
            return self._read()

    def cut(self, fraction: float) -> dict[str, Any]:
        return self.command(f"cut {fraction}")

    def stall(self, fraction: float, seconds: float) -> dict[str, Any]:
        return self.command(f"stall {fraction} {seconds}")

    def stats(self) -> dict[str, Any]:
        return self.command("stats")

    def stop(self) -> None:
        """Close stdin (the proxy exits); kill it if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


if __name__ == "__main__":
    raise SystemExit(main())
