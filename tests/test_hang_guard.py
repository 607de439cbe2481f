"""The suite's guard against hung tests (tests/hang_guard.py), run on a small suite of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONFTEST = """
from tests import hang_guard

def pytest_configure(config):
    hang_guard.install(config)
"""

HANGING_TESTS = """
import signal, time

import pytest

def test_sleeps():
    time.sleep(600)

def test_blocks_the_alarm():
    # The main thread cannot take SIGALRM, as when a thread holding the GIL never lets it run Python.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
    time.sleep(600)

def test_passes():
    pass


@pytest.fixture
def hangs_in_teardown():
    yield
    time.sleep(600)


def test_sleeps_and_so_does_its_teardown(hangs_in_teardown):
    time.sleep(600)
"""

PASSING_TESTS = """
def test_one():
    pass

def test_two():
    pass

def test_three():
    pass
"""


def _run_suite(
    tmp_path: Path, *selection: str, addopts: str = "", markers: Sequence[str] = (), **env: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_hangs.py").write_text(HANGING_TESTS)
    (tmp_path / "test_passes.py").write_text(PASSING_TESTS)
    marker_lines = "".join(f"\n    {marker}" for marker in markers)
    (tmp_path / "pytest.ini").write_text(f"[pytest]\naddopts = {addopts}\nmarkers ={marker_lines}\n")
    return subprocess.run(
        # (a --basetemp of its own: without one, pytest closes /tmp/pytest-of-<user> to other users
        # again, which an embedded server another test process starts as its own user must cross)
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini"),
         "--basetemp", str(tmp_path / "inner-tmp")]
        + [name if name.endswith(".py") else f"{tmp_path / 'test_hangs.py'}::{name}" for name in selection],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,  # (a guard against this test hanging, far above the second or two it takes)
    )


def test_a_test_that_outlives_the_limit_fails_with_every_stack_and_the_suite_goes_on(tmp_path: Path) -> None:
    # Given a suite whose first test sleeps for ten minutes, with a limit of one second
    # When it runs
    run = _run_suite(
        tmp_path, "test_sleeps", "test_passes", CONTROLPLANE_TEST_TIMEOUT="1", CONTROLPLANE_TEST_TIMEOUT_GRACE="1"
    )
    # Then that test fails, named, with its stack, and the next test runs
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 1 passed" in run.stdout, run.stdout
    assert "test_hangs.py::test_sleeps still running after 1 s (CONTROLPLANE_TEST_TIMEOUT)" in run.stdout
    assert "test_hangs.py::test_sleeps still running after 1 s; every thread:" in run.stderr
    assert 'test_hangs.py", line 7 in test_sleeps' in run.stderr, run.stderr


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
    assert "Timeout (0:00:" in run.stderr, run.stderr
    assert 'test_hangs.py", line 12 in test_blocks_the_alarm' in run.stderr, run.stderr
    assert "passed" not in run.stdout


def test_a_test_failed_by_the_alarm_whose_teardown_hangs_too_ends_the_process_after_the_grace(
    tmp_path: Path,
) -> None:
    # Given a test that sleeps, and a fixture whose teardown sleeps too (pytest's faulthandler
    # plugin cancels the process's faulthandler timer when the alarm fails the test)
    # When the suite runs with a limit of one second and one of grace
    run = _run_suite(tmp_path, "test_sleeps_and_so_does_its_teardown", "test_passes",
                     CONTROLPLANE_TEST_TIMEOUT="1", CONTROLPLANE_TEST_TIMEOUT_GRACE="1")  # fmt: skip
    # Then the alarm fails the test, and the process ends in the teardown, with its stack
    assert run.returncode == 1, run.stdout + run.stderr
    assert "test_sleeps_and_so_does_its_teardown still running after 1 s; every thread:" in run.stderr
    assert "Timeout (0:00:0" in run.stderr and "in hangs_in_teardown" in run.stderr, run.stderr


def test_the_suites_own_settings_end_a_session_whose_worker_the_guard_ended(tmp_path: Path) -> None:
    # Given this suite's options (two xdist workers, a file each) on a suite of two files, one
    # of whose tests the alarm cannot reach
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    # When it runs with a limit of one second and one of grace
    run = _run_suite(tmp_path, "test_blocks_the_alarm", "test_passes.py",
                     addopts=options["addopts"], markers=options["markers"],
                     CONTROLPLANE_TEST_TIMEOUT="1", CONTROLPLANE_TEST_TIMEOUT_GRACE="1")  # fmt: skip
    # Then the session ends (xdist 3.8 waits for ever on a worker started in a crashed one's
    # place), naming the hung test, and the other file's tests ran
    assert run.returncode == 1, run.stdout + run.stderr
    assert "crashed while running 'test_hangs.py::test_blocks_the_alarm'" in run.stdout, run.stdout
    assert "1 failed, 3 passed" in run.stdout, run.stdout


def test_a_child_forked_by_a_test_gets_the_alarms_default_action() -> None:
    # (a forked child that sets an alarm to end itself, as tests/test_time_ordered_ids.py's does)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if signal.getsignal(signal.SIGALRM) is signal.SIG_DFL else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_alarm_waits_while_the_main_thread_runs_the_environment_guard() -> None:
    from tests.hang_guard import _inside_environment_guard
    from tests.support import EnvironmentGuard

    # Given the frames of a test calling into the suite's EnvironmentGuard (its wait, whose
    # condition it calls), where an exception raised by the alarm could leave its lock held
    seen: list[FrameType] = []

    def ready() -> bool:
        frame = sys._getframe()
        seen.append(frame)
        return True

    guard = EnvironmentGuard()
    with guard._cond:
        guard._wait(ready, "a condition")
    # Then the alarm's handler knows it is inside the guard there, and not in the test itself
    assert _inside_environment_guard(seen[0]) is True
    assert _inside_environment_guard(sys._getframe()) is False


def test_pytests_own_faulthandler_timeout_is_refused(tmp_path: Path) -> None:
    # (its timer would replace the guard's)
    run = _run_suite(tmp_path, "test_passes", addopts="-o faulthandler_timeout=5")
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    assert "faulthandler_timeout would replace the hang guard's timer" in run.stderr, run.stderr


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_a_bad_limit_is_refused_by_name(tmp_path: Path, value: str) -> None:
    run = _run_suite(tmp_path, "test_passes", CONTROLPLANE_TEST_TIMEOUT=value)
    assert run.returncode == pytest.ExitCode.USAGE_ERROR
    assert "CONTROLPLANE_TEST_TIMEOUT must " in run.stderr, run.stderr


def test_this_suite_runs_under_the_guard(request: pytest.FixtureRequest) -> None:
    # (unless CONTROLPLANE_TEST_TIMEOUT=0 turns it off, as for a debugger's session)
    from tests.hang_guard import DEFAULT_TIMEOUT, _seconds

    if _seconds("CONTROLPLANE_TEST_TIMEOUT", DEFAULT_TIMEOUT) == 0:
        pytest.skip("CONTROLPLANE_TEST_TIMEOUT=0 turns the guard off")
    assert request.config.pluginmanager.get_plugin("controlplane-hang-guard") is not None
