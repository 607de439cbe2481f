"""The systems the harness compares: how to build each one's interpreter, set it up, send and run workers.

``floor``, ``floor_batch``, ``floor_tuned`` and ``ours`` run under this project's interpreter;
each peer runs in its own virtualenv under ``bench/.venvs/<name>``, built on
demand with pip (see :func:`ensure_venv`). A peer whose virtualenv cannot be
built is skipped with the reason; the run goes on.

``floor_tuned`` is opt-in (``--only floor,floor_tuned,ours``): floor's worker
with ours' asynchronous commits and one listener per process (see
``bench/drivers/floor_driver.py``), a reference like ``floor`` and
``floor_batch`` that no target compares ours with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / "bench" / ".venvs"

#: Peers' pins: the versions these drivers were written and checked against.
PEER_REQUIREMENTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "pgqueuer": (("pgqueuer==1.6.0", "asyncpg"),),
    "procrastinate": (("procrastinate==3.10.0", "psycopg[binary,pool]"),),
    # dramatiq-pg 0.12 pins dramatiq<2 and tenacity<9: the newest Dramatiq beside it, then it with --no-deps.
    "dramatiq_pg": (("dramatiq==2.2.1", "psycopg2-binary", "tenacity<9"), ("--no-deps", "dramatiq-pg==0.12.0")),
    # The same as pip resolves its pins (Dramatiq 1.18): opt-in, beside the default one.
    "dramatiq_pg_d1": (("dramatiq-pg==0.12.0", "psycopg2-binary"),),
    "celery": (("celery[redis]==5.7.0",),),
}

#: The distributions whose versions a results file records, per interpreter.
VERSION_PACKAGES: dict[str, tuple[str, ...]] = {
    "project": ("dramatiq", "psycopg2-binary", "SQLAlchemy", "controlplane-tasks"),
    "pgqueuer": ("pgqueuer", "asyncpg"),
    "procrastinate": ("procrastinate", "psycopg", "psycopg-pool"),
    "dramatiq_pg": ("dramatiq-pg", "dramatiq", "psycopg2-binary", "tenacity"),
    "dramatiq_pg_d1": ("dramatiq-pg", "dramatiq", "psycopg2-binary", "tenacity"),
    "celery": ("celery", "kombu", "redis"),
}


@dataclass(frozen=True)
class System:
    """One system under test.

    Attributes:
      name: the name on the command line and in results.
      driver: the module run with ``python -m`` for setup, sends and (some) workers.
      venv: the peer virtualenv's name, or None for this project's interpreter.
      claim: jobs per claim statement (floor drivers only).
      dramatiq_module: for Dramatiq-based systems, the module their ``dramatiq``
        command line loads (one command starts all processes).
      dramatiq_broker_first: whether ``tasks`` precedes the module (this project).
      batch_api: whether the system has a batch enqueue call.
      uses_redis: Celery: the "database" is a Redis database number.
      max_backlog: the largest backlog the harness ever gives this system (None: no cap).
      cap_reason: why it is capped.
      time_cap: a smaller cap that keeps a default run near 20 minutes for a slow
        system (lifted by ``--uncapped``).
      postgres: a Postgres-backed system (for "ahead of every Postgres peer").
      reference: a hand-written reference (the floors), not a peer: the targets' "ahead of
        every peer" leaves it out.
      worker_args: more arguments for each worker command (drivers' own workers only).
    """

    name: str
    driver: str
    venv: str | None = None
    claim: int = 1
    dramatiq_module: str | None = None
    dramatiq_broker_first: bool = False
    batch_api: bool = True
    uses_redis: bool = False
    max_backlog: int | None = None
    cap_reason: str = ""
    time_cap: int | None = None
    postgres: bool = True
    reference: bool = False
    worker_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def python(self) -> Path:
        """The interpreter that runs this system's driver and workers."""
        if self.venv is None:
            return Path(sys.executable)
        return VENVS / self.venv / "bin" / "python"

    def worker_commands(self, url: str, processes: int, threads: int) -> list[list[str]]:
        """The commands that start ``processes`` worker processes of ``threads`` threads each."""
        py = str(self.python)
        if self.dramatiq_module is not None:
            modules = ["tasks", self.dramatiq_module] if self.dramatiq_broker_first else [self.dramatiq_module]
            return [[py, "-m", "dramatiq", *modules, "--processes", str(processes), "--threads", str(threads)]]
        one = [py, "-m", self.driver, "worker", "--url", url, "--threads", str(threads), "--claim", str(self.claim)]
        one += self.worker_args
        return [list(one) for _ in range(processes)]

    def worker_env(self, url: str) -> dict[str, str]:
        """Environment variables that point the workers at ``url``."""
        if self.uses_redis:
            return {"BENCH_REDIS_URL": url}
        return {"DATABASE_URL": url, "BENCH_DATABASE_URL": url, "PGDSN": url, **self.env}


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in (
        System("floor", "bench.drivers.floor_driver", claim=1, reference=True),
        System("floor_batch", "bench.drivers.floor_driver", claim=100, reference=True),
        # Not in DEFAULT_SYSTEMS: a reference run on demand (--only floor,floor_tuned,ours).
        System(
            "floor_tuned",
            "bench.drivers.floor_driver",
            claim=1,
            reference=True,
            worker_args=("--async-commit", "--one-listener"),
        ),
        System(
            "ours",
            "bench.drivers.ours_driver",
            dramatiq_module="bench.drivers.ours_actors",
            dramatiq_broker_first=True,
        ),
        System("pgqueuer", "bench.drivers.pgqueuer_driver", venv="pgqueuer"),
        System("procrastinate", "bench.drivers.procrastinate_driver", venv="procrastinate", time_cap=5000),
        *(
            System(
                name,
                "bench.drivers.dramatiq_pg_driver",
                venv=name,
                dramatiq_module="bench.drivers.dramatiq_pg_actors",
                batch_api=False,
                # It holds one advisory lock per message while its queue stays busy; a 12,800-message
                # drain once filled this server's shared lock table (see the design notes), which
                # breaks every other session on the server. Keep its backlogs small.
                max_backlog=1000,
                cap_reason="backlogs capped at 1,000: dramatiq-pg holds one advisory lock per message "
                "while busy and can fill the server's shared lock table",
            )
            # dramatiq_pg_d1: opt-in, on the Dramatiq its pins resolve to (the default one runs on
            # the newest Dramatiq, installed beside it without its pins)
            for name in ("dramatiq_pg", "dramatiq_pg_d1")
        ),
        System(
            "celery",
            "bench.drivers.celery_driver",
            venv="celery",
            batch_api=False,
            uses_redis=True,
            postgres=False,
            time_cap=5000,
        ),
    )
}

#: The order of ``--only`` when it is not given (``floor_tuned`` and ``dramatiq_pg_d1`` run only when named).
DEFAULT_SYSTEMS = ("floor", "floor_batch", "ours", "pgqueuer", "procrastinate", "dramatiq_pg", "celery")
QUICK_SYSTEMS = ("floor", "ours")


def _marker(venv: str) -> Path:
    return VENVS / venv / ".bench-ready"


def ensure_venv(venv: str, log: Path) -> str | None:
    """Build ``bench/.venvs/<venv>`` if needed; None when ready, else why it could not be built."""
    wanted = json.dumps(PEER_REQUIREMENTS[venv])
    marker = _marker(venv)
    if marker.exists() and marker.read_text() == wanted:
        return None
    target = VENVS / venv
    steps: list[list[str]] = [[sys.executable, "-m", "venv", "--clear", str(target)]]
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps += [[*pip, *requirement] for requirement in PEER_REQUIREMENTS[venv]]
    # Build from the base interpreter, not from inside this project's virtualenv.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    with log.open("a") as out:
        for step in steps:
            out.write("$ " + " ".join(step) + "\n")
            out.flush()
            try:
                done = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"{' '.join(step[-2:])}: {exc}"
            if done.returncode != 0:
                return f"`{' '.join(step[3:] if 'pip' in step else step)}` exited {done.returncode} (see {log})"
    marker.write_text(wanted)
    return None


def versions(python: Path, packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of ``packages`` under ``python`` (missing ones are left out)."""
    code = (
        "import json, sys\nfrom importlib import metadata\nout = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n        out[name] = metadata.version(name)\n"
        "    except metadata.PackageNotFoundError:\n        pass\n"
        "print(json.dumps(out))\n"
    )
    try:
        done = subprocess.run([str(python), "-c", code, *packages], capture_output=True, text=True, timeout=60)
        result: dict[str, str] = json.loads(done.stdout)
        return result
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return {}
