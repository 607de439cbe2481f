"""``BROKER_URL=stub://``: a user's unit tests of their actors, as Dramatiq's testing guide writes them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT

USER_TESTS = '''
import dramatiq
from dramatiq import Worker
from dramatiq.brokers.stub import StubBroker

import tasks

assert isinstance(tasks.broker, StubBroker) and dramatiq.get_broker() is tasks.broker
calls = []
finals = []


@dramatiq.actor(max_attempts=2, min_backoff=1, max_backoff=2, store_results=True,
                unique_key_from=lambda args, kwargs: str(args[0]), on_final_failure="final")
def add(x, y):
    calls.append((x, y))
    if y < 0:
        raise ValueError("negative")
    return x + y


@dramatiq.actor
def final(message, failure):
    finals.append(failure["type"])


@dramatiq.actor(store_results=True)
async def twice(x):
    return 2 * x


@dramatiq.actor(max_attempts=1)
def broken():
    raise RuntimeError("broken for good")


worker = Worker(tasks.broker, worker_timeout=100)
worker.start()
message = add.send(1, 2)
tasks.broker.join(add.queue_name)
worker.join()
print("result", message.get_result(block=True))
add.send(5, -1)
try:
    tasks.broker.join(add.queue_name, fail_fast=True)
except ValueError as exc:
    print("fail_fast raised", repr(exc))
tasks.broker.join(final.queue_name, fail_fast=False)
worker.join()
print("calls", calls, "finals", finals)
chain = dramatiq.pipeline([broken.message(), add.message(1)]).run()
tasks.broker.join(broken.queue_name, fail_fast=False)
worker.join()
try:
    chain.get_result(block=True, timeout=10_000)
except dramatiq.results.ResultFailure as exc:
    print("pipeline stopped:", "the pipeline stopped at" in str(exc))
print("async", twice.send(21).get_result(block=True, timeout=10_000))
# (no worker.stop(), as in the README: the process must exit all the same)
'''


def test_actors_with_this_packages_options_run_on_the_stub_broker_without_a_database(tmp_path: Path) -> None:
    # Given a user's unit test of an actor that uses this package's options (max_attempts,
    # unique_key_from, on_final_failure), and of an async one, written as the README writes them, run
    # with BROKER_URL=stub:// and a database that does not answer
    (tmp_path / "user_tests.py").write_text(USER_TESTS)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(BROKER_URL="stub://", CONTROLPLANE_HOME=str(tmp_path / "home"),
               PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]))
    # When it runs
    done = subprocess.run([sys.executable, "user_tests.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    # Then its actors ran in memory: the result, the retry, fail_fast's exception and the final hook,
    # and a pipeline's caller heard its step fail for good (at once: no database to look in)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "result 3",
        "fail_fast raised ValueError('negative')",
        "calls [(1, 2), (5, -1), (5, -1)] finals ['ValueError']",
        "pipeline stopped: True",
        "async 42",
    ]
    # And no embedded PostgreSQL was made for it (DATABASE_URL is unset)
    assert not (tmp_path / "home").exists()


def test_the_commands_refuse_the_stub_broker(tmp_path: Path) -> None:
    # Given BROKER_URL=stub:// left set in a shell
    env = {**os.environ, "BROKER_URL": "stub://", "CONTROLPLANE_HOME": str(tmp_path / "home")}
    # When an operator runs a command that would send or claim
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "send", "controlplane.prune"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    # Then it refuses in one line, rather than send into a memory no other process sees
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "controlplane: error: BROKER_URL=stub:// is Dramatiq's in-memory StubBroker, for unit tests: "
        "`controlplane` would work on messages no other process sees; unset BROKER_URL"
    ]


def test_importing_the_package_on_the_stub_broker_with_a_metrics_port_changes_no_environment(tmp_path: Path) -> None:
    # Given a unit-test process with BROKER_URL=stub:// and CONTROLPLANE_METRICS_PORT left set
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL" and not k.lower().startswith("prometheus")}
    env.update(BROKER_URL="stub://", CONTROLPLANE_METRICS_PORT="9477", CONTROLPLANE_HOME=str(tmp_path / "home"))
    script = (
        "import os; before = dict(os.environ); import tasks\n"
        "from dramatiq.middleware.prometheus import Prometheus\n"
        "print(sorted(set(os.environ.items()) ^ set(before.items())))\n"
        "print([type(m).__name__ for m in tasks.broker.middleware if isinstance(m, Prometheus)])\n"
    )
    # When it imports the package (which tells the StubBroker its process has booted)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    # Then no metrics middleware is added and the environment is as it was: a change there
    # while the application's other threads connect is the race of docs/reliability.md
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "[]"]
