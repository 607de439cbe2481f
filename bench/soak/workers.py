"""The soak's worker processes: real ``dramatiq`` CLIs, killed, stopped and restarted by the chaos.

Each slot runs ``python -m dramatiq tasks bench.soak.actors tasks.provision --processes 1``
in its own process group (the CLI's main process and its one forked worker process), with
its output appended to ``worker-<slot>.log``. SIGKILL goes to the whole group (main and
worker die mid-flight); SIGTERM goes to the main process, which stops its worker gracefully.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from bench import procfs

ROOT = Path(__file__).resolve().parents[2]

#: Short leases and backoffs, so that a dead worker's jobs are back within seconds.
WORKER_ENV = {
    "CONTROLPLANE_LEASE_SECONDS": "5",
    "CONTROLPLANE_HEARTBEAT_INTERVAL": "1",
    "CONTROLPLANE_REAP_INTERVAL": "1",
    "CONTROLPLANE_POLL_INTERVAL": "0.5",
    "CONTROLPLANE_MIN_BACKOFF_MS": "100",
    "CONTROLPLANE_MAX_BACKOFF_MS": "2000",
    # Dramatiq's consumer restart delay after a lost connection (default 3 s).
    "dramatiq_restart_delay": "500",
    "PYTHONUNBUFFERED": "1",
}


class SoakWorker:
    """One worker slot: a ``dramatiq`` CLI with one worker process, restartable."""

    def __init__(self, slot: int, env: dict[str, str], log_dir: Path, threads: int) -> None:
        self.slot = slot
        self.env = env
        self.log_path = log_dir / f"worker-{slot}.log"
        self.threads = threads
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.expected_exit = False
        self.sigterm_sent = False
        self.unexpected_exits: list[int] = []

    def start(self) -> None:
        """Start (or restart) the slot's worker."""
        with open(self.log_path, "ab") as log:
            log.write(f"--- soak: starting worker slot {self.slot} (start {self.starts + 1}) ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dramatiq",
                    "tasks",
                    "bench.soak.actors",
                    "tasks.provision",
                    "--processes",
                    "1",
                    "--threads",
                    str(self.threads),
                    "--worker-shutdown-timeout",
                    "10000",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        self.starts += 1
        self.expected_exit = False
        self.sigterm_sent = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """The CLI's main process and its descendants."""
        if not self.alive():
            return []
        assert self.proc is not None
        return procfs.tree(self.proc.pid)

    def kill(self) -> None:
        """SIGKILL the whole process group: the main process and its worker die mid-flight."""
        if self.proc is None:
            return
        self.expected_exit = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def request_stop(self) -> None:
        """SIGTERM the main process once: a graceful stop (Dramatiq reads a second one as "kill now")."""
        if self.proc is None or self.sigterm_sent:
            return
        self.expected_exit = True
        self.sigterm_sent = True
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def terminate(self, timeout: float = 30.0) -> int | None:
        """Stop gracefully (one SIGTERM) and wait; SIGKILL the group if it takes too long."""
        if self.proc is None:
            return None
        self.request_stop()
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return None
        # Kill the group even if its leader is gone: a forked worker may outlive it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode

    def check(self) -> bool:
        """True if the worker exited on its own (not by the chaos or the runner); then it is restarted."""
        if self.proc is None or self.proc.poll() is None or self.expected_exit:
            return False
        self.unexpected_exits.append(int(self.proc.returncode or 0))
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.start()
        return True


class MemorySampler:
    """Peak resident memory of the worker processes, sampled once a second by the runner."""

    def __init__(self) -> None:
        self.peak_process_kb = 0
        self.peak_total_kb = 0
        self.samples = 0

    def sample(self, workers: list[SoakWorker]) -> None:
        total = 0
        for worker in workers:
            for pid in worker.pids():
                kb = procfs.rss_kb(pid)
                total += kb
                self.peak_process_kb = max(self.peak_process_kb, kb)
        self.peak_total_kb = max(self.peak_total_kb, total)
        self.samples += 1

