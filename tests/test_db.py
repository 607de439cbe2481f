"""What the control plane logs of a database error: enough to act on, nothing of the data."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import psycopg2
import pytest

from tasks import db


def test_a_database_error_is_logged_without_the_values_it_quotes(db_url: str) -> None:
    # Given a statement that fails on a job's arguments, one of which is a secret
    secret = "sk_live_hunter2hunter2"
    conn = db.connect(db_url, autocommit=True)
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.Error) as raised:
            cur.execute(
                "INSERT INTO control_plane.jobs (id, type, queue, payload) VALUES (gen_random_uuid(), 'x', 'q', %s)",
                (f'{{"args": ["{secret}", oops]}}',),
            )
    finally:
        conn.close()
    # (psycopg2's own text quotes the statement with the secret filled in)
    assert secret in str(raised.value)
    # When it is described for a log line
    line = db.loggable_error(raised.value)
    # Then the line names the error and its SQLSTATE, on one line, without the secret
    assert line == "InvalidTextRepresentation: invalid input syntax for type json (SQLSTATE 22P02)"


def test_a_value_a_data_exception_quotes_is_left_out(db_url: str) -> None:
    # Given a value PostgreSQL quotes in its own message when it cannot read it
    conn = db.connect(db_url, autocommit=True)
    try:
        with conn.cursor() as cur, pytest.raises(psycopg2.Error) as raised:
            cur.execute("SELECT %s::uuid", ("pw-hunter2",))
    finally:
        conn.close()
    assert "hunter2" in raised.value.diag.message_primary
    # When described for a log line / Then the message stays, the value does not
    assert db.loggable_error(raised.value) == (
        'InvalidTextRepresentation: invalid input syntax for type uuid: "…" (SQLSTATE 22P02)'
    )


def test_an_error_without_a_sqlstate_keeps_its_first_line_redacted() -> None:
    # Given libpq's error for a server that does not answer (no SQLSTATE, several lines), and another exception
    with pytest.raises(psycopg2.OperationalError) as raised:
        psycopg2.connect("postgresql://app@127.0.0.1:1/x", connect_timeout=2)
    assert "\n" in str(raised.value).strip()
    # When described for a log line / Then each is one line, its type first, secrets redacted
    line = db.loggable_error(raised.value)
    assert line.startswith("OperationalError: connection to server at") and "\n" not in line
    assert db.loggable_error(ValueError("token=abc123 bad\nsecond line")) == "ValueError: token=[REDACTED] bad"


def test_a_connection_given_back_inside_a_transaction_is_rolled_back_not_handed_on(db_url: str) -> None:
    import tasks
    from tests import actors
    from tests.support import job, query

    # Given code that borrows a pooled connection and leaves a failed transaction in it,
    # and code that leaves one open
    with pytest.raises(psycopg2.errors.DivisionByZero), tasks.connection() as conn, conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("SELECT 1/0")
    with tasks.connection() as conn, conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("CREATE TABLE left_open (x int)")
    # and code that turns autocommit off and leaves
    with tasks.connection() as conn:
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
    # When the process sends jobs on the same pool
    message = actors.noop.send(1)
    # Then the sends work and commit on their own; what was left open was rolled back
    assert job(db_url, message.message_id)["status"] == "pending"
    assert query(db_url, "SELECT to_regclass('left_open')::text AS t")[0]["t"] is None


def test_a_pooled_connection_the_server_ended_while_idle_is_not_handed_out(db_url: str) -> None:
    from tests.support import query, wait_for

    # Given a pool with one idle connection, whose session the server ends (a restart,
    # pg_terminate_backend, a DBA's idle_session_timeout)
    pool = db.Pool(lambda: db_url, size=1, application_name="controlplane-test-idle")
    try:
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (first,) = cur.fetchone()
        query(db_url, "SELECT pg_terminate_backend(%s)", (first,))
        wait_for(lambda: not query(db_url, "SELECT 1 AS x FROM pg_stat_activity WHERE pid = %s", (first,)),
                 what="the session to end")  # fmt: skip
        # When the pool is asked for a connection
        with pool.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid()")
            (second,) = cur.fetchone()
        # Then it is a new one that works, not the dead one (whose first statement would fail)
        assert second != first
    finally:
        pool.close()


def test_threads_that_send_while_holding_a_pooled_connection_do_not_wait_for_each_other(db_url: str) -> None:
    import threading

    import tasks
    from tests import actors
    from tests.support import job

    # Given as many threads as the pool has connections, each holding one of them
    size = tasks.broker.settings.pool_size
    all_holding = threading.Barrier(size, timeout=30)
    sent: list[str] = []

    def hold_and_send(n: int) -> None:
        with tasks.connection() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            all_holding.wait()
            # When each sends a job while it holds its connection (the send needs one too)
            sent.append(actors.noop.send(n).message_id)

    threads = [threading.Thread(target=hold_and_send, args=(n,), daemon=True) for n in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Then every send went through (they waited for each other forever before) and committed
    assert len(sent) == size
    assert all(job(db_url, message_id)["status"] == "pending" for message_id in sent)


def test_a_process_joining_a_running_embedded_server_says_it_uses_it_not_that_it_starts_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tasks import embedded

    home = tmp_path / "home"
    pgdata = (home / "pgdata").resolve()
    caplog.set_level(logging.INFO, logger="tasks.embedded")
    try:
        # Given an embedded server started by one process
        db.embedded_url(home)
        assert f"starting the embedded PostgreSQL in {pgdata}" in caplog.text
        caplog.clear()
        # When another process (here: this one, having forgotten it) joins it
        embedded._urls.pop(pgdata)
        db.embedded_url(home)
        # Then its log says it uses the server, not that it starts one
        assert f"using the embedded PostgreSQL in {pgdata}" in caplog.text
        assert "starting" not in caplog.text
    finally:
        db.stop_embedded(home)


def test_stopping_an_embedded_server_that_died_says_so_and_it_starts_again(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.support import query, wait_for

    # Given an embedded server, whose first start says it made a new one and where,
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"CONTROLPLANE_HOME": str(home)}
    controlplane = [sys.executable, "-m", "tasks.cli"]
    first = subprocess.run([*controlplane, "db", "url"], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert f"created a new, empty embedded PostgreSQL in {home / 'pgdata'}" in first.stderr
    # that was then killed outright (its postmaster.pid left behind)
    pid = int((home / "pgdata" / "postmaster.pid").read_text().split()[0])
    os.kill(pid, signal.SIGKILL)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    wait_for(gone, what="the postmaster to die")
    try:
        # When an operator stops it, Then that is no error: there was nothing to stop
        stop = subprocess.run([*controlplane, "db", "stop"], env=env, capture_output=True, text=True, timeout=60)
        assert (stop.returncode, stop.stdout.strip()) == (
            0, f"the embedded server was not running (data in {home / 'pgdata'})",
        ), stop.stderr
        # And the next process starts it again
        started = subprocess.run([*controlplane, "db", "url"], env=env, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, started.stderr
        assert query(started.stdout.strip(), "SELECT 1 AS one") == [{"one": 1}]
        assert "created a new" not in started.stderr  # the same one, started again
    finally:
        subprocess.run([*controlplane, "db", "stop"], env=env, capture_output=True, timeout=60)


def test_stopping_an_embedded_server_with_workers_on_it_warns_that_their_finished_jobs_may_run_again(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    import migrations
    from tests.conftest import SUPPORT_SCHEMA
    from tests.support import WorkerProcess, query, wait_for

    # Given an embedded server with a worker running on it
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"CONTROLPLANE_HOME": str(home)}
    controlplane = [sys.executable, "-m", "tasks.cli"]
    url = subprocess.run([*controlplane, "db", "url"], env=env, capture_output=True, text=True, timeout=120)
    assert url.returncode == 0, url.stderr
    migrations.upgrade(url.stdout.strip())
    query(url.stdout.strip(), SUPPORT_SCHEMA)
    worker = WorkerProcess(url.stdout.strip(), extra_env={"DATABASE_URL": "", "CONTROLPLANE_HOME": str(home)},
                           log_path=tmp_path / "worker.log")  # (as a user runs it: DATABASE_URL unset)
    try:
        worker.wait_ready()
        # When the operator stops the server
        stop = subprocess.run([*controlplane, "db", "stop"], env=env, capture_output=True, text=True, timeout=60)
        # Then it stops, saying that workers are connected and what that costs
        assert (stop.returncode, stop.stdout.strip()) == (0, "stopped"), stop.stderr
        assert "connection(s) of running workers" in stop.stderr and "run again" in stop.stderr, stop.stderr
        # And the workers, cut off, say how to bring it back
        wait_for(lambda: "the embedded PostgreSQL may be stopped: `controlplane db start` starts it" in worker.log(),
                 what="the worker to say how to start the server again")  # fmt: skip
        # And with no worker left, stopping it again (started by the next command) says nothing of them
        worker.terminate()
        subprocess.run([*controlplane, "db", "start"], env=env, capture_output=True, timeout=120, check=True)
        again = subprocess.run([*controlplane, "db", "stop"], env=env, capture_output=True, text=True, timeout=60)
        assert (again.returncode, again.stderr) == (0, ""), again.stderr
    finally:
        worker.terminate()
        subprocess.run([*controlplane, "db", "stop"], env=env, capture_output=True, timeout=60)


def test_a_worker_whose_embedded_server_cannot_start_says_why_in_one_line_and_tries_again(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.support import WorkerProcess, wait_for

    # Given an embedded server made, stopped, and given a setting PostgreSQL refuses
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"} | {"CONTROLPLANE_HOME": str(home)}
    controlplane = [sys.executable, "-m", "tasks.cli"]
    for action in ("start", "stop"):
        done = subprocess.run([*controlplane, "db", action], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    with open(home / "pgdata" / "postgresql.auto.conf", "a") as conf:
        conf.write("shared_buffers = 'abc'\n")
    # When a worker starts there
    worker = WorkerProcess("", extra_env={"CONTROLPLANE_HOME": str(home)}, log_path=tmp_path / "worker.log")
    try:
        # Then it says why the server did not start, twice (it tries again), with no traceback, and runs on
        said = 'Consumer encountered a connection error: configuration file "'
        wait_for(lambda: worker.log().count(said) >= 2, what="the worker to say it twice")
        assert worker.proc.poll() is None
        assert "Traceback" not in worker.log(), worker.log()
    finally:
        worker.terminate()
        subprocess.run([*controlplane, "db", "stop"], env=env, capture_output=True, timeout=60)


def test_another_user_given_roots_embedded_data_is_told_to_run_as_root_not_as_the_servers_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pwd

    from tasks import embedded

    try:
        server = pwd.getpwnam(embedded._SERVER_USER)
    except KeyError:
        pytest.skip(f"no user {embedded._SERVER_USER} here (root never started an embedded server)")
    if os.geteuid() != 0:
        pytest.skip("only root can give data to the server's user")
    # Given data that root's embedded server owns (it runs as its own user)
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    os.chown(pgdata, server.pw_uid, server.pw_gid)
    # When another user (not root: no server user of its own) starts it
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    monkeypatch.setattr(embedded, "_server_user", lambda: None)
    # Then it is told to run as root, who made it, not as the server's user
    with pytest.raises(embedded.EmbeddedServerError, match=f"belongs to user {server.pw_name}: run as root,"):
        embedded._check_owner(pgdata)


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another user only when root starts it")
def test_an_embedded_server_stops_though_a_directory_above_its_data_was_closed_since_it_started(
    tmp_path: Path,
) -> None:
    import psutil

    from tests.support import query, wait_for

    # Given an embedded server root started (it runs as another user, and the library opened the
    # directories above its data to that user), under a directory then closed to other users
    # again (as pytest closes /tmp/pytest-of-root when another test process starts)
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    home = closed / "home"
    url = db.embedded_url(home, "postgres")
    assert query(url, "SELECT 1 AS one") == [{"one": 1}]
    pid = int((home / "pgdata" / "postmaster.pid").read_text().split()[0])
    os.chmod(closed, 0o700)
    try:
        # When it is stopped, Then it stops (pg_ctl, run as the server's user, failed and it ran on)
        assert db.stop_embedded(home) is True
        wait_for(lambda: not psutil.pid_exists(pid), what="the postmaster to exit")
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGINT)


def test_the_embedded_server_survives_odd_homes_reused_pids_failed_starts_and_a_big_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import stat
    import subprocess
    from urllib.parse import unquote

    from tasks.embedded import LOG_KEEP_BYTES, EmbeddedServerError
    from tests.support import query

    # Given a home whose path a shell splits (a space, a quote), and PGPORT set for another server
    home = tmp_path / "My Projects" / "it's"
    monkeypatch.setenv("PGPORT", "1")
    pgdata = home / "pgdata"
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        # When the embedded server is started there, Then it runs, and only its owner may use its socket
        url = db.embedded_url(home)
        settings = "SELECT current_setting('unix_socket_permissions') AS p, current_setting('port') AS port"
        assert query(url, settings) == [{"p": "0700", "port": "5432"}]
        # (its socket in a directory of its own, which nobody else may write to, not even as root)
        socket_dir = Path(unquote(url.split("host=")[1].split("&")[0]))
        assert socket_dir != pgdata and stat.S_IMODE(os.lstat(socket_dir).st_mode) == 0o700
        # And a postmaster.pid naming another live process (a pid reused after a reboot) neither
        # stops it from starting nor gets that process signalled by `db stop`
        assert db.stop_embedded(home) is True
        (pgdata / "postmaster.pid").write_text(f"{sleeper.pid}\n{pgdata}\n")
        assert db.stop_embedded(home) is False
        (pgdata / "postmaster.pid").write_text(f"{sleeper.pid}\n{pgdata}\n")
        assert query(db.embedded_url(home), "SELECT 1 AS one") == [{"one": 1}]
        assert sleeper.poll() is None
        # And a start that fails says PostgreSQL's reason and where the log is, in one line, and the
        # same process starts it once the cause is gone
        db.stop_embedded(home)
        version = (pgdata / "PG_VERSION").read_text()
        (pgdata / "PG_VERSION").write_text("15\n")
        with pytest.raises(EmbeddedServerError) as refused:
            db.embedded_url(home)
        assert "initialized by PostgreSQL version 15" in str(refused.value)
        assert str(pgdata / "log") in str(refused.value) and "\n" not in str(refused.value)
        (pgdata / "PG_VERSION").write_text(version)
        # And a log past its size is moved aside at the next start
        with (pgdata / "log").open("ab") as log:
            log.truncate(LOG_KEEP_BYTES + 1)
        assert query(db.embedded_url(home), "SELECT 1 AS one") == [{"one": 1}]
        assert (pgdata / "log.1").stat().st_size > LOG_KEEP_BYTES > (pgdata / "log").stat().st_size
    finally:
        sleeper.kill()
        db.stop_embedded(home)


def test_pghostaddr_set_for_another_server_is_refused_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.embedded import EmbeddedServerError

    # Given PGHOSTADDR set in the shell (libpq takes it over the socket the URL names)
    monkeypatch.setenv("PGHOSTADDR", "127.0.0.1")
    # When the embedded server is asked for, Then it is refused, naming the variable, and nothing
    # was started or made that the connections would then have missed
    with pytest.raises(EmbeddedServerError, match="PGHOSTADDR is set"):
        db.embedded_url(tmp_path / "home")
    assert not (tmp_path / "home").exists()


def test_a_socket_directory_that_is_a_link_or_another_users_is_refused(tmp_path: Path) -> None:
    import os

    from tasks.embedded import EmbeddedServerError, _private_dir

    # Given a link where the socket's private directory would be (another user made it first)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "controlplane-0"
    link.symlink_to(elsewhere)
    me = (os.geteuid(), os.getegid())
    # When the server's socket directory is made there, Then it is refused, and left alone
    with pytest.raises(EmbeddedServerError, match="not a directory but a link"):
        _private_dir(link, me, 0o700)
    # And so is another user's directory
    if os.geteuid() == 0:
        os.chown(elsewhere, 65534, 65534)
        theirs = me
    else:
        theirs = (me[0] + 1, me[1])
    with pytest.raises(EmbeddedServerError, match="belongs to user"):
        _private_dir(elsewhere, theirs, 0o700)
    # And a directory of ours left open by an earlier run is closed again
    if os.geteuid() == 0:
        os.chown(elsewhere, *me)
    elsewhere.chmod(0o777)
    _private_dir(elsewhere, me, 0o700)
    assert elsewhere.stat().st_mode & 0o777 == 0o700


def test_the_socket_directory_is_under_a_tmpdir_the_server_can_reach_and_short_enough(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import tempfile

    from tasks.embedded import EmbeddedServerError, _socket_dir

    pgdata = tmp_path / "My Projects" / "pgdata"  # a path the socket cannot live in
    # Given a TMPDIR closed to other users (pam_tmpdir gives each user one)
    private = tmp_path / "private-tmp"
    private.mkdir(mode=0o700)
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    # When the socket's directory is chosen, Then a server that runs as another user (root's
    # case) can reach it, and one of ours is made where we are
    chosen = _socket_dir(pgdata, tmp_path)
    expected_base = Path("/tmp") if os.geteuid() == 0 else private
    assert chosen.parent == expected_base / f"controlplane-{os.geteuid()}"
    # And a TMPDIR too deep for a socket's path is refused, saying what to do
    deep = tmp_path / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    monkeypatch.setattr("tasks.embedded._traversable", lambda directory: True)  # (root: reachable as it is)
    with pytest.raises(EmbeddedServerError, match="set TMPDIR"):
        _socket_dir(pgdata, tmp_path)


def test_connections_skip_gssapi_unless_the_url_or_environment_asks_for_it(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # libpq's default looks for Kerberos credentials first, and the Kerberos library psycopg2-binary
    # bundles is not safe to set up from two threads at once (psycopg's issues 1088 and 1213)
    monkeypatch.delenv("PGGSSENCMODE", raising=False)
    conn = db.connect(db_url)
    try:
        assert conn.get_dsn_parameters()["gssencmode"] == "disable"
    finally:
        conn.close()
    # A deployment that asks for GSSAPI encryption keeps it
    assert db.gss_off_unless_asked(db_url + ("&" if "?" in db_url else "?") + "gssencmode=require") == {}
    monkeypatch.setenv("PGGSSENCMODE", "require")
    assert db.gss_off_unless_asked(db_url) == {}


#: A process that adds environment variables in one thread (with heap traffic, so that glibc's
#: setenv moves the environment's array) while two threads connect; argv: URL, guarded|bare.
_ENVIRONMENT_RACE = """
import os, sys, threading
import psycopg2
from tests.support import EnvironmentGuard
if sys.argv[2] == "guarded":
    EnvironmentGuard().install()
url, done, stop = sys.argv[1], [0, 0], threading.Event()
def connect(i):
    while not stop.is_set():
        psycopg2.connect(url, gssencmode="disable").close()
        done[i] += 1
threads = [threading.Thread(target=connect, args=(i,)) for i in (0, 1)]
for t in threads:
    t.start()
added, heap = 0, []
while min(done) < 150:
    os.environ[f"CP_RACE_{added}"] = "x"
    added += 1
    heap.append(bytearray(1024 + 64 * (added % 7)))
    if len(heap) > 50:
        heap.clear()
    if added % 400 == 0:
        for name in [n for n in os.environ if n.startswith("CP_RACE_")]:
            del os.environ[name]
stop.set()
for t in threads:
    t.join()
print(added, sum(done))
"""


def test_environment_changes_and_connects_in_other_threads_do_not_crash(server_url: str) -> None:
    # Given a process whose environment is changed in one thread while two others connect, as the
    # suite's monkeypatch.setenv does beside its clone threads and in-process workers (without the
    # guard such a process dies of SIGSEGV inside psycopg2.connect, mostly within a second)
    import subprocess
    import sys

    from tests.support import ROOT

    run = subprocess.run(
        [sys.executable, "-c", _ENVIRONMENT_RACE, server_url, "guarded"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    # When its changes and connects go through the suite's EnvironmentGuard
    # Then it lives to the end, having done both many times
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    added, connects = map(int, run.stdout.split())
    assert added > 1_000 and connects >= 300


def test_the_environment_guard_holds_a_change_until_the_connects_end_and_bounds_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import threading
    import warnings

    from tests.support import EnvironmentGuard, wait_for

    # Given a connect in flight
    guard = EnvironmentGuard()
    release, order = threading.Event(), []

    def connect(name: str, hold: bool) -> None:
        with guard.connecting():
            order.append(name)
            if hold:
                release.wait(60)

    def change() -> None:
        with guard.changing():
            order.append("change")

    threads = [threading.Thread(target=connect, args=("first connect", True))]
    threads[0].start()
    wait_for(lambda: guard._connecting == 1, what="the connect to start")
    # When an environment change comes, and then another connect
    threads.append(threading.Thread(target=change))
    threads[1].start()
    wait_for(lambda: guard._changes_waiting == 1, what="the change to wait")
    threads.append(threading.Thread(target=connect, args=("later connect", False)))
    threads[2].start()
    release.set()
    for t in threads:
        t.join(10)
    # Then the change waited for the first connect, and the later connect for the change
    assert order == ["first connect", "change", "later connect"]
    # And the guard the suite installed is the one os.environ changes go through, and a connect
    # that does not end holds a change up only for WAIT_SECONDS, with a warning
    installed = psycopg2._environment_guard
    monkeypatch.setattr(installed, "WAIT_SECONDS", 0.2)
    holding, done = threading.Event(), threading.Event()

    def hold() -> None:
        with installed.connecting():
            holding.set()
            done.wait(60)

    holder = threading.Thread(target=hold)
    try:
        holder.start()
        holding.wait(10)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            os.environ["CP_GUARD_PROBE"] = "1"  # (waits for the connect held, then goes ahead)
        # (only the guard's: a ResourceWarning of an earlier test's object, collected meanwhile, may come too)
        said = [str(w.message) for w in seen if str(w.message).startswith("EnvironmentGuard")]
        assert said == ["EnvironmentGuard: an environment change went ahead after 0.2s"]
    finally:
        done.set()
        holder.join(10)
        os.environ.pop("CP_GUARD_PROBE", None)


@pytest.mark.parametrize("name", ["DATABASE_URL", "PROVISION_DATABASE_URL"])
@pytest.mark.parametrize(
    "url",
    [
        "postgresql://cp:q8ZmR2vXk1/Lw3+Tz9PbH7aQ==@127.0.0.1:5432/db",  # a base64 password's '/'
        "postgresql://cp:q8ZmR2vXk1@Lw3+Tz9PbH7aQ==@127.0.0.1/db",  # an '@' in the password
        "postgresql://cp:q8ZmR2vXk1%Lw3+Tz9PbH7aQ==@127.0.0.1/db",  # a '%' that encodes nothing
        "postgresql://localhost:5432/q8ZmR2vXk1Lw3+Tz9PbH7aQ==@127.0.0.1/db",  # a '/' after a user's digits
    ],
)
def test_a_url_libpq_would_misread_is_refused_at_start_quoting_none_of_it(name: str, url: str) -> None:
    from tasks.errors import ConfigurationError
    from tasks.settings import Settings

    # Given a URL whose password is not percent-encoded: libpq would take part of it for the
    # port or the host, and quote that part in a connection error every retry logs
    # When the settings are read, Then it is refused, naming the setting, quoting no part of it
    with pytest.raises(ConfigurationError, match=f"^{name} is not a valid PostgreSQL URL") as refused:
        Settings.from_env({name: url})
    assert not any(part in str(refused.value) for part in ("q8ZmR2vXk1", "Lw3", "aQ=="))
    # And its percent-encoded form, and the other forms libpq reads, are taken
    for good in (
        "postgresql://cp:q8ZmR2vXk1%2FLw3+Tz9PbH7aQ==@127.0.0.1:5432/db",
        "postgresql://cp:q8ZmR2vXk1%40Lw3@127.0.0.1/db",
        "postgresql://h1:5432,h2:5433/db?target_session_attrs=read-write",
        "postgresql:///db?host=/var/run/postgresql&port=5432",
        "postgresql://[::1]:5432/db",
        "postgres://cp:a:b?c#d@localhost/db",
    ):
        assert getattr(Settings.from_env({name: good}), name.lower()) == good


def test_connections_give_up_on_a_server_gone_mid_statement_and_keep_what_the_url_sets(db_url: str) -> None:
    # Given the URL a deployment gives, with and without its own connect timeout
    plain = db.connect(db_url)
    own = db.connect(db_url + ("&" if "?" in db_url else "?") + "connect_timeout=2&tcp_user_timeout=5000")
    try:
        # Then a connection notices a server gone from the network with a statement in flight
        # (keepalives probe only idle ones: such a statement waited ~15 minutes of TCP retries),
        # as well as idle, and a connect to one that does not answer gives up
        params = plain.get_dsn_parameters()
        assert (params["tcp_user_timeout"], params["keepalives"], params["connect_timeout"]) == ("30000", "1", "10")
        # And what the URL sets is the URL's (it used to be overridden by the defaults)
        params = own.get_dsn_parameters()
        assert (params["tcp_user_timeout"], params["connect_timeout"]) == ("5000", "2")
    finally:
        plain.close()
        own.close()
