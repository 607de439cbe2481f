"""The suite's guard against hung tests (tests/hang_guard.py), run on a small suite of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONFTEST = """
from tests import hang_guard

def pytest_configure(config):
    hang_guard.install(config)
"""

HANGING_TESTS = """
import signal, time

def test_sleeps():
    time.sleep(600)

def test_blocks_the_alarm():
    # The main thread cannot take SIGALRM, as when a thread holding the GIL never lets it run Python.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    time.sleep(600)

def test_passes():
    pass
"""


def _run_suite(tmp_path: Path, *selection: str, **env: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_hangs.py").write_text(HANGING_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini")]
        + [f"{tmp_path / 'test_hangs.py'}::{name}" for name in selection],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_test_that_outlives_the_limit_fails_with_every_stack_and_the_suite_goes_on(tmp_path: Path) -> None:
    # Given a suite whose first test sleeps for ten minutes, with a limit of one second
    # When it runs
    run = _run_suite(tmp_path, "test_sleeps", "test_passes", CONTROLPLANE_TEST_TIMEOUT="1")
    # Then that test fails, named, with its stack, and the next test runs
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 1 passed" in run.stdout, run.stdout
    assert "test_hangs.py::test_sleeps still running after 1 s (CONTROLPLANE_TEST_TIMEOUT)" in run.stdout
    assert "test_hangs.py::test_sleeps still running after 1 s; every thread:" in run.stderr
    assert 'test_hangs.py", line 5 in test_sleeps' in run.stderr, run.stderr


def test_a_test_whose_main_thread_cannot_take_the_alarm_ends_the_process_after_the_grace(tmp_path: Path) -> None:
    # Given a test that blocks the alarm and sleeps, with a limit of one second and one of grace
    # When the suite runs
    run = _run_suite(
        tmp_path,
        "test_blocks_the_alarm",
        "test_passes",
        CONTROLPLANE_TEST_TIMEOUT="1",
        CONTROLPLANE_TEST_TIMEOUT_GRACE="1",
    )
    # Then the process ends (exit status 1) with the hung test's stack, instead of sleeping on
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Timeout (0:00:02)!" in run.stderr, run.stderr
    assert 'test_hangs.py", line 10 in test_blocks_the_alarm' in run.stderr, run.stderr
    assert "passed" not in run.stdout


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_a_bad_limit_is_refused_by_name(tmp_path: Path, value: str) -> None:
    run = _run_suite(tmp_path, "test_passes", CONTROLPLANE_TEST_TIMEOUT=value)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    assert "CONTROLPLANE_TEST_TIMEOUT must " in run.stderr, run.stderr


def test_this_suite_runs_under_the_guard(request: pytest.FixtureRequest) -> None:
    # (unless CONTROLPLANE_TEST_TIMEOUT=0 turns it off, as for a debugger's session)
    if os.environ.get("CONTROLPLANE_TEST_TIMEOUT", "").strip() in ("0", "0.0"):
        pytest.skip("CONTROLPLANE_TEST_TIMEOUT=0 turns the guard off")
    assert request.config.pluginmanager.get_plugin("controlplane-hang-guard") is not None
