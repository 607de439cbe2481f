"""The chaos soak in --quick mode: a few thousand jobs, 2 workers, 2 provisions, light chaos.

Runs ``python -m bench.soak --quick`` as a subprocess (its own private PostgreSQL, proxy,
stand-in services and workers) and checks that every must-be-zero row of its table is zero.
The full soak and its numbers are in ``docs/reliability.md``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

MUST_BE_ZERO = (
    "lost",
    "ran_from_rolled_back",
    "failed_not_by_design",
    "stuck",
    "disagreements",
    "orphans",
    "delayed_ran_early",
    "secrets_found",
)


@pytest.mark.soak
def test_quick_soak_loses_nothing_and_leaves_nothing_behind(tmp_path: Path) -> None:
    # Given the quick soak (kills, a SIGTERM, a PostgreSQL restart, a queue paused and resumed, cut
    # and stalled connections)
    output = tmp_path / "soak.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.soak", "--quick", "--seconds-limit", "100", "--output", str(output)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=110)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the soak stop its workers and its server and remove its folder
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"the quick soak took more than 110 s:\n{out[-3000:]}")
    assert output.exists(), f"no result written (exit {proc.returncode}):\n{out[-3000:]}"
    doc = json.loads(output.read_text())
    rows = doc["rows"]
    # Then it ran real work through real chaos
    assert rows["committed"] > 1000
    assert rows["rolled_back"] > 0
    assert rows["failed_as_designed"] > 0
    assert doc["chaos"]["counts"].get("kill", 0) >= 1
    assert doc["chaos"]["counts"].get("pg_restart", 0) == 1
    assert doc["chaos"]["counts"].get("pause", 0) == 1
    assert rows["projects_active"] == rows["projects_committed"] == 2
    # And every must-be-zero row is zero, the queue drained, and the command says so
    assert {name: rows[name] for name in MUST_BE_ZERO} == dict.fromkeys(MUST_BE_ZERO, 0), doc["details"]
    assert doc["drained"] is True
    assert proc.returncode == 0, out[-3000:]
