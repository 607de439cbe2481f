"""The ``controlplane`` command: migrate, demo, send; inspect, retry and cancel jobs; pause and
resume queues; queue stats, workers and pruning; the clock of periodic tasks; queue metrics; manage
the embedded database."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import select
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg2
import psycopg2.errors
from dramatiq.errors import BrokerConnectionError, ConnectionClosed

from models import queries
from tasks import db
from tasks.errors import ConfigurationError
from tasks.middleware.option_checks import call_problem
from tasks.redaction import redact
from tasks.settings import Settings, retention_problem


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit status 1."""


def _settings() -> Settings:
    return Settings.from_env()


def _url(settings: Settings, *, create: bool = False) -> str:
    """The database's URL, starting the embedded server when ``DATABASE_URL`` is unset. Only
    ``migrate``, ``demo`` and ``db url``/``db start`` may ``create`` one: the commands about
    jobs, run from another folder, would otherwise make a new, empty server and report a
    missing schema."""
    if not create and settings.database_url is None and not db.has_embedded(settings.home):
        raise UserError(
            f"no embedded PostgreSQL in {settings.home} (CONTROLPLANE_HOME, ./.controlplane of the folder "
            "you run from): run this where you ran `controlplane demo` or `controlplane migrate`, or set "
            "CONTROLPLANE_HOME or DATABASE_URL"
        )
    try:
        return db.database_url(settings)
    except Exception as exc:  # the embedded server failed to start
        raise UserError(f"cannot start the embedded PostgreSQL: {exc}") from exc


def _connect(url: str) -> Any:
    try:
        return db.connect(url, autocommit=True, application_name="controlplane-cli")
    except psycopg2.Error as exc:
        # (A URL libpq cannot read, whose error would quote part of it, is refused by the settings.)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection refused"
        raise UserError(f"cannot connect to the database: {first}") from exc


def _describe_target(settings: Settings) -> str:
    if settings.database_url is None:
        return f"embedded PostgreSQL (data in {settings.home / 'pgdata'})"
    from sqlalchemy.engine import make_url

    # hide_password covers the user part; a password in the query string (?password=) is redacted
    try:
        shown = make_url(settings.database_url).render_as_string(hide_password=True)
    except ValueError:  # (several hosts, h1:5432,h2:5432: libpq's to read, and to say)
        given = psycopg2.extensions.parse_dsn(settings.database_url)
        shown = " ".join(f"{k}={given[k]}" for k in ("host", "port", "dbname", "user") if given.get(k))
    return "DATABASE_URL " + redact(shown)


# -- migrate -------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    import migrations

    settings = _settings()
    url = _url(settings, create=True)
    _connect(url).close()
    def waiting(attempt: int, error: BaseException) -> None:
        print(f"controlplane migrate: try {attempt} of {args.lock_attempts} gave up on a lock "
              f"({_first_line(error)}); trying again", file=sys.stderr, flush=True)  # fmt: skip

    try:
        migrations.upgrade(url, lock_timeout=args.lock_timeout, attempts=args.lock_attempts, on_retry=waiting)
    except migrations.NewerSchema as exc:
        # A newer release migrated it (this one is being rolled back to), perhaps while this run
        # waited for the migration lock: its schema is a superset this release runs on
        # (docs/operations.md, "Upgrading"); nothing to do.
        print(f"controlplane migrate: {_describe_target(settings)}: {exc}: left as it is", file=sys.stderr)
        return 0
    except migrations.LockNotAvailable:
        raise UserError(
            f"cannot migrate: a table stayed locked for {args.lock_timeout:g} s on each of "
            f"{args.lock_attempts} tries; {_left_at(url)}; {_lock_holders(url)}"
        ) from None
    except DBAPIError as exc:  # what the database said, in one line (e.g. no CREATE privilege)
        refused = _first_line(exc.orig or exc)
        raise UserError(f"cannot migrate: the database refused: {refused}; {_left_at(url)}") from None
    except (CommandError, SQLAlchemyError, RuntimeError) as exc:  # e.g. a function edited by hand
        raise UserError(f"cannot migrate: {_first_line(exc)}; {_left_at(url)}") from None
    print(f"migrated {_describe_target(settings)} to revision {migrations.current(url)}")
    return 0


def _left_at(url: str) -> str:
    """Where a migration that stopped left the database: each revision commits on its own."""
    import migrations

    try:
        found = migrations.current(url)
    except Exception:  # (what stopped the migration may stop this look too)
        return "its revision could not be read"
    head = migrations.head()
    if found == head:
        return f"the database is at this release's revision, {found}"
    return (f"the database is at revision {found or 'none'} (each revision up to it applied whole, "
            f"nothing of the next), this release's is {head}")


def _lock_holders(url: str) -> str:
    """The sessions holding locks on the control plane's tables, for a migration that could not get one."""
    conn = _connect(url)
    try:
        rows = _fetch(conn, queries.LOCK_HOLDERS, {})
    finally:
        conn.close()
    if not rows:
        return "the sessions in the way have ended: try again"
    described = "; ".join(
        f"pid {r['pid']} ({r['usename']}, {r['application_name'] or 'no application name'}, {r['state']} "
        f"for {r['for']}: {redact(' '.join((r['query'] or '').split()))[:80]})"
        for r in rows[:5]
    )
    return f"sessions holding the control plane's tables: {described} (end them, or try when they are done)"


# -- db --------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    settings = _settings()
    if args.action == "url":
        print(_url(settings, create=True))
    elif args.action == "start":
        url = _url(settings, create=True)
        if settings.database_url is not None:
            _connect(url).close()  # not ours to start: say it runs only if it answers
        print(f"running: {_describe_target(settings)}")
    elif args.action == "stop":
        if settings.database_url is not None:
            raise UserError("DATABASE_URL is set: that server is not ours to stop")
        _warn_of_connected_workers(settings)
        try:
            stopped = db.stop_embedded(settings.home)
        except subprocess.CalledProcessError as exc:
            raise UserError(f"cannot stop the embedded PostgreSQL (pg_ctl exited with {exc.returncode})") from None
        if stopped:
            print("stopped")
        elif not db.has_embedded(settings.home):
            print(f"there is no embedded server in {settings.home} (nothing to stop)")
        else:
            print(f"the embedded server was not running (data in {settings.home / 'pgdata'})")
    return 0


def _warn_of_connected_workers(settings: Settings) -> None:
    """Say so when workers are connected to the embedded server about to stop: they wait for it,
    and the jobs they finish while it is down past their lease run again (at-least-once)."""
    try:
        url = db.running_url(settings.home)
        if url is None:
            return
        conn = _connect(url)
        try:
            (workers,) = _fetch(conn, "SELECT count(*) AS n FROM pg_stat_activity "
                                      "WHERE application_name LIKE 'controlplane-worker%%'")  # fmt: skip
        finally:
            conn.close()
    except Exception:  # (the stop itself says what is wrong with the server)
        return
    if workers["n"]:
        print(f"controlplane: warning: {workers['n']} connection(s) of running workers: they wait for the "
              f"server to come back, and the jobs they finish while it is down more than their lease "
              f"({settings.lease_seconds:g} s) run again; stop the workers first to avoid that", file=sys.stderr)


# -- send ------------------------------------------------------------------------


def _json_arg(raw: str | None, name: str, kind: type) -> Any:
    if raw is None:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{name} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise UserError(f"{name} nests arrays or objects too deep to read") from None
    if not isinstance(value, kind):
        raise UserError(f"{name} must be a JSON {'array' if kind is list else 'object'}")
    return value


def cmd_send(args: argparse.Namespace) -> int:
    import dramatiq

    import tasks

    settings = _settings()
    _url(settings)  # (an error if there is no database to send to)
    # The built-in actors (provision_project and its steps, controlplane.prune), then the caller's.
    _import_modules([*_BUILTIN_ACTOR_MODULES, *(args.module or [])])
    send_args = _json_arg(args.args, "--args", list)
    send_kwargs = _json_arg(args.kwargs, "--kwargs", dict)
    options: dict[str, Any] = {}
    if args.priority is not None:
        options["priority"] = args.priority
    if args.unique_key is not None:
        options["unique_key"] = args.unique_key  # an empty one is refused, as the library refuses it
    actor = tasks.broker.actors.get(args.actor)
    if actor is not None:
        if args.queue is not None and args.queue != actor.queue_name:
            # (the message goes to the queue the actor declares; a --queue it ignored said otherwise)
            raise UserError(f"{args.actor} is declared on queue {actor.queue_name!r}, not {args.queue!r}: "
                            "leave out --queue, which is for actors no --module declares")  # fmt: skip
        _check_call(args.actor, actor.fn, send_args, send_kwargs)
        message = actor.message_with_options(args=tuple(send_args), kwargs=send_kwargs, **options)
    else:
        # An actor declared only in the workers' code: address it by name.
        from tasks.middleware import time_ordered_id

        if args.queue is None:
            # Sent to 'default' with the defaults' attempts, a misspelt name (or a module not
            # loaded) would wait forever in a queue no worker of that actor reads.
            raise UserError(
                f"actor {args.actor!r} is not declared in the modules loaded here: give --module with the "
                "module that declares it, or --queue with the queue its workers read to send it by name"
            )
        from tasks.middleware.option_checks import check_queue_name

        try:
            check_queue_name(args.queue)  # ('x.DQ' too, which a send would take for Dramatiq's delay queue of x)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if settings.postgres_broker:
            _check_declared_queue(args.actor, args.queue)
        message = dramatiq.Message(
            queue_name=args.queue,
            actor_name=args.actor,
            args=tuple(send_args),
            kwargs=send_kwargs,
            options=options,
            message_id=time_ordered_id(),
        )
    try:
        sent = tasks.broker.enqueue(message, delay=int(args.delay * 1000) if args.delay else None)
    except (TypeError, ValueError) as exc:  # NotSerializable, InvalidOption, InvalidUniqueKey, a delay too long
        raise UserError(str(exc)) from None
    # With --unique-key, a live job holding the key comes back instead of a new one.
    duplicate = sent.message_id != message.message_id
    if duplicate:
        # (without --unique-key, the key the actor's unique_key_from made)
        key = f"unique key {args.unique_key!r}" if args.unique_key is not None else "its actor's unique key"
        print(
            _printable(f"controlplane: job {sent.message_id} holds {key} (pending or running): nothing new was sent"),
            file=sys.stderr,
        )
    print(json.dumps({"id": sent.message_id, "deduplicated": duplicate}) if args.json else sent.message_id)
    return 0


# -- jobs ------------------------------------------------------------------------

_LIST_COLUMNS = ("id", "type", "queue", "status", "attempts", "max_attempts", "scheduled_at", "last_error")


#: Control characters (C0, DEL, C1): written as escapes, never to the operator's terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """``text`` with its control characters as ``\\xNN``: an error text that quotes a job's input
    could otherwise clear the screen, recolour it or rewrite what an operator reads."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _error(text: str) -> None:
    """``controlplane: error: TEXT`` on stderr, redacted, its control characters escaped (an
    error may quote a job's unique key or arguments)."""
    print(f"controlplane: error: {_printable(redact(text))}", file=sys.stderr)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        # The date too (a job that failed three days ago must not read like one of a minute
        # ago), in UTC as `clock --list` prints it, whatever the session's time zone.
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
    return _printable(str(value))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], width: int = 60) -> None:
    """A plain aligned table; long cells are cut at ``width`` characters."""
    cells = [[_fmt(r[c])[:width] for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fetch(conn: Any, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    from psycopg2.extras import RealDictCursor

    with conn.cursor(cursor_factory=RealDictCursor) as cur:
        cur.execute(sql, params or {})
        return [dict(r) for r in cur.fetchall()]


def _jsonable(rows: Any) -> str:
    return json.dumps(rows, default=str, indent=2)


def cmd_jobs(args: argparse.Namespace) -> int:
    settings = _settings()
    conn = _connect(_url(settings))
    try:
        if args.action == "list":
            where, params = ["true"], {}
            for column in ("status", "type", "queue"):
                value = getattr(args, column)
                # (--status retrying: pending jobs with a retry_at, _status_lookup's; a queue or an
                # actor may be named 'retrying' too, and is filtered on)
                if value and not (column == "status" and value == "retrying"):
                    where.append(f"{column} = %({column})s")
                    params[column] = value
            where += _status_lookup(args.status, settings)
            # Failed jobs by when they failed (a job may fail days after it was sent), newest
            # first, read from failed_at's index: by creation, PostgreSQL may walk the whole
            # history's created_at index past the completions to find them.
            time_column = "failed_at" if args.status == "failed" else "created_at"
            if args.since is not None:
                where.append(f"{time_column} >= now() - %(since)s::interval")
                params["since"] = args.since
            rows = _fetch_since(
                conn,
                f"SELECT {', '.join(_LIST_COLUMNS)} FROM control_plane.jobs WHERE {' AND '.join(where)} "  # noqa: S608
                f"ORDER BY {time_column} DESC, id DESC LIMIT %(limit)s",  # (ids: time-ordered, unique)
                {**params, "limit": args.limit},
                args.since,
            )
            if args.json:
                print(_jsonable(rows))
            else:
                print_table(rows, _LIST_COLUMNS)
        elif args.action == "show":
            try:
                job_id = str(uuid.UUID(args.id))
            except ValueError:
                raise UserError(f"{args.id!r} is not a job id (a UUID)") from None
            rows = _fetch(conn, "SELECT * FROM control_plane.jobs WHERE id = %(id)s", {"id": job_id})
            if not rows:
                raise UserError(f"no job with id {job_id}")
            print(_jsonable(rows[0]) if args.json else _show(rows[0]))
    finally:
        conn.close()
    return 0


def _fetch_since(conn: Any, sql: str, params: dict[str, Any], since: str | None) -> list[dict[str, Any]]:
    """``_fetch`` of a query that takes ``--since`` as ``%(since)s::interval``: a period the
    server does not read is the user's error, named."""
    if since is not None and not since.strip():
        raise UserError("--since must be a period such as '1 hour', not empty")
    try:
        negative = "SELECT %(since)s::interval < interval '0' AS negative"
        if since is not None and _fetch(conn, negative, {"since": since})[0]["negative"]:
            raise UserError(
                f"--since must be a period back from now such as '1 hour', got {since!r}, which PostgreSQL "
                "reads as a negative interval ('ago' or a minus sign turns it around): it would match nothing"
            )
        return _fetch(conn, sql, params)
    except psycopg2.DataError as exc:
        if since is None:
            raise
        # (the interval is the only value the server reads as anything but text here)
        raise UserError(
            f"--since must be a PostgreSQL interval such as '1 hour' or '2 days', got {since!r} ({_first_line(exc)})"
        ) from None


def _status_lookup(status: str | None, settings: Settings) -> list[str]:
    """Conditions that let PostgreSQL find jobs of ``status`` without reading the whole history.

    ``jobs`` has no index on ``status`` (a completion would then never be a HOT
    update, see docs/design.md): failed jobs are found through ``failed_at``'s
    index, and with the Postgres broker running ones through the message table
    (a running job's message is claimed until its outcome is written, in the
    same statement). Pending jobs are looked for in the history itself: a
    pending job without a message is one an operator must be able to see.
    ``retrying`` (pending jobs waiting for another attempt) is ``retry_at``'s index.
    """
    if status == "failed":
        return ["failed_at IS NOT NULL"]
    if status == "retrying":
        return ["retry_at IS NOT NULL"]
    if status == "running" and settings.postgres_broker:
        # (an array, not IN: with stale statistics of messages the planner read the whole history)
        return ["id = ANY(ARRAY(SELECT id FROM control_plane.messages WHERE claim_token IS NOT NULL))"]
    return []


def _show(job: dict[str, Any]) -> str:
    lines = [f"{k:>13}: {_fmt(job[k])}" for k in job if k not in ("payload", "options", "errors", "result")]
    lines.append(f"{'payload':>13}: {json.dumps(job['payload'])}")
    lines.append(f"{'result':>13}: {json.dumps(job['result'])}")
    lines.append(f"{'attempts log':>13}:")
    for entry in job["errors"] or []:
        lines.append(_printable(f"{'':>15}#{entry.get('attempt')} at {entry.get('at')}: {entry.get('error')}"))
    return "\n".join(lines)


def _job_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise UserError(f"{raw!r} is not a job id (a UUID)") from None


def _scalar(conn: Any, sql: str, params: dict[str, Any] | None = None) -> Any:
    """The single value of a one-row, one-column statement; a refusal by a SQL function is a UserError."""
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params or {})
            return cur.fetchone()[0]
    except (psycopg2.DataError, psycopg2.IntegrityError, psycopg2.InternalError) as exc:
        # What control_plane.retry_job raises (a live duplicate, nothing to re-send), bad intervals.
        raise UserError(_first_line(exc)) from None


def _why_not(conn: Any, job_id: str, allowed: str, done: str) -> UserError:
    """Why an operation on ``job_id`` did nothing: no such job, or the wrong state."""
    rows = _fetch(conn, queries.JOB_STATUS, {"id": job_id})
    if not rows:
        return UserError(f"no job with id {job_id}")
    return UserError(f"job {job_id} is {rows[0]['status']}: only {allowed} jobs can be {done}")


def _check_call(name: str, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> None:
    """Refuse arguments the actor's function cannot take (:func:`call_problem`)."""
    problem = call_problem(fn, tuple(args), kwargs)
    if problem:
        raise UserError(f"{name} cannot be called with these arguments: {problem}")


def _check_declared_queue(actor: str, queue: str) -> None:
    """Refuse a send by name to another queue than the one the actor's workers declared it on
    (``control_plane.actor_defaults``): the job would wait for a worker of that other queue.
    An actor no worker has declared yet is sent, with a warning."""
    import tasks

    try:
        with tasks.connection() as conn, conn.cursor() as cur:
            cur.execute(queries.ACTOR_DECLARED_QUEUE, {"actor": actor})
            row = cur.fetchone()
    except (psycopg2.errors.UndefinedTable, psycopg2.errors.InsufficientPrivilege):
        return  # (a schema before migration 0015, or a role that may not read it: nothing to go by)
    if row is None:
        print(_printable(f"controlplane: warning: no worker has declared actor {actor!r} yet "
                         f"(control_plane.actor_defaults): the job waits in queue {queue!r} until one "
                         "that declares it reads that queue"), file=sys.stderr)  # fmt: skip
    elif row[0] != queue:
        raise UserError(
            f"actor {actor!r} is declared by its workers on queue {row[0]!r} (control_plane.actor_defaults), "
            f"not {queue!r}: the job would wait for a worker of that queue; send it with --queue {row[0]}"
        )


def _needs_postgres_broker(
    settings: Settings, what: str, instead: str = "to run a job again, send it again: controlplane send"
) -> None:
    """Refuse ``what`` when RabbitMQ carries the messages: it works on control_plane.messages."""
    if not settings.postgres_broker:
        raise UserError(
            f"{what} needs the PostgreSQL broker: with BROKER_URL set the messages are in RabbitMQ, "
            f"which this cannot reach ({instead})"
        )


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    _needs_postgres_broker(_settings(), "jobs retry")
    for option in ("type", "queue", "since", "limit", "dry_run"):
        if getattr(args, option) not in (None, False) and not args.failed:
            raise UserError(f"--{option.replace('_', '-')} goes with --failed (which failed jobs to retry)")
    if (args.id is None) == (not args.failed):
        raise UserError("give a job id, or --failed to retry every failed job (not both)")
    conn = _connect(_url(_settings()))
    try:
        if args.id is not None:
            job_id = _job_id(args.id)
            if not _scalar(conn, queries.RETRY_JOB, {"id": job_id}):
                raise _why_not(conn, job_id, "failed or cancelled", "retried")
            print(f"retried {job_id}: pending again")
            return 0
        which_ones = {"type": args.type, "queue": args.queue, "since": args.since, "limit": args.limit}
        found = _fetch_since(conn, queries.FAILED_JOB_IDS, which_ones, args.since)
        ids = [r["id"] for r in found]
        which = (f" of type {args.type}" if args.type else "") + (f" in queue {args.queue}" if args.queue else "")
        which += f" failed in the last {args.since}" if args.since else ""
        if args.dry_run:
            print(f"would retry {len(ids)} failed job(s){which}")
            return 0
        retried = refused = 0

        def retry(job_id: str) -> None:
            nonlocal retried, refused
            try:
                # false: someone retried it since we listed it, which is as good
                retried += bool(_scalar(conn, queries.RETRY_JOB, {"id": job_id}))
            except UserError as exc:
                refused += 1
                print(_printable(redact(f"controlplane: {exc}")), file=sys.stderr)

        if not _each_saying_how_far(ids, retry, "failed jobs", lambda: f"retried {retried} of {len(ids)} failed job(s)",
                                    "retry the rest"):  # fmt: skip
            return 130
        print(f"retried {retried} failed job(s){which}")
        if refused:
            raise UserError(f"{refused} failed job(s) could not be retried (see above)")
        return 0
    finally:
        conn.close()


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    _needs_postgres_broker(_settings(), "jobs cancel", "a job in RabbitMQ cannot be cancelled: it runs as sent")
    if args.type and not args.queue:
        raise UserError("--type goes with --queue (cancel every pending or running job of that type in the queue)")
    if (args.id is None) == (args.queue is None):
        raise UserError("give a job id, or --queue to cancel every pending or running job of a queue (not both)")
    if args.queue is not None:
        return _cancel_queue(args.queue, args.type)
    job_id = _job_id(args.id)
    conn = _connect(_url(_settings()))
    try:
        outcome = _scalar(conn, queries.CANCEL_JOB, {"id": job_id})
        if outcome is None:
            raise _why_not(conn, job_id, "pending or running", "cancelled")
        if outcome == "cancelled":
            print(f"cancelled {job_id}")
        else:
            print(f"cancelling {job_id}: a worker holds it; it ends cancelled at once if no thread has started "
                  "it, else its worker interrupts it, unless it finishes first (see its status)")
        return 0
    finally:
        conn.close()


def _one_by_one(ids: list[str], act: Callable[[str], None], noun: str) -> bool:
    """``act`` on each of ``ids``, each call its own transaction (one for all would slow every claim
    of their queue until it ended), with progress on stderr every 100 when there are more than
    100; False when Ctrl-C stopped it (what was done stays done: a second run goes on)."""
    try:
        for n, job_id in enumerate(ids, 1):
            act(job_id)
            if len(ids) > 100 and (n % 100 == 0 or n == len(ids)):
                print(f"  {n}/{len(ids)} {noun} done", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        return False
    return True


def _cancel_queue(queue: str, actor: str | None) -> int:
    """Cancel every pending or running job of ``queue`` (of ``actor`` only, if given), one by one
    as ``jobs retry --failed`` retries."""
    conn = _connect(_url(_settings()))
    try:
        ids = [r["id"] for r in _fetch(conn, queries.LIVE_JOB_IDS, {"queue": queue, "type": actor})]
        cancelled = cancelling = 0

        def cancel(job_id: str) -> None:
            nonlocal cancelled, cancelling
            # None: it ended since we listed it; 'cancelling': a worker holds it and is told
            outcome = _scalar(conn, queries.CANCEL_JOB, {"id": job_id})
            cancelled += outcome == "cancelled"
            cancelling += outcome == "cancelling"

        def so_far() -> str:
            return f"cancelled {cancelled} and asked {cancelling} running job(s) to stop, of {len(ids)}"

        if not _each_saying_how_far(ids, cancel, "jobs", so_far, "cancel the rest"):
            return 130
        of_type = f" of type {actor}" if actor else ""
        print(f"cancelled {cancelled} pending job(s){of_type} in queue {queue}; {cancelling} running job(s) asked "
              "to stop (their workers interrupt them, unless they finish first)")
        return 0
    finally:
        conn.close()


# -- queues ------------------------------------------------------------------------


def _queue_name(value: str) -> str:
    from tasks.errors import InvalidOption
    from tasks.middleware.option_checks import check_queue_name

    try:
        check_queue_name(value)  # what an actor's queue name must be
    except InvalidOption as exc:
        raise argparse.ArgumentTypeError(_printable(str(exc))) from None
    return value


def _actor_name(value: str) -> str:
    """An actor's name to filter by: an empty one filtered nothing, and listed every job."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must name an actor, not be empty")
    return value


def cmd_queues(args: argparse.Namespace) -> int:
    settings = _settings()
    if args.action == "pause":  # (a pause left from the Postgres broker may still be listed and resumed)
        _needs_postgres_broker(settings, "queues pause", "stop the queue's workers instead")
    conn = _connect(_url(settings))
    try:
        if args.action == "list":
            rows = _fetch(conn, queries.PAUSED_QUEUES)
            if args.json:
                print(json.dumps(rows, default=str, indent=2))
            elif rows:
                print_table(rows, ("queue", "paused_at", "reason"))
            else:
                print("no queue is paused")
            return 0
        if args.action == "pause":
            try:
                known = _scalar(conn, queries.QUEUE_KNOWN, {"queue": args.queue})
            except psycopg2.errors.InsufficientPrivilege:
                known = True  # a role that may pause but not read those tables: no note, the pause goes on
            if not known:
                print(f"controlplane: note: no actor a worker declared sends to queue {args.queue!r} and it "
                      "holds no jobs; check the name (pausing it all the same)", file=sys.stderr)
            if _scalar(conn, queries.PAUSE_QUEUE, {"queue": args.queue, "reason": args.reason}):
                print(f"paused {args.queue}: its workers take none of its jobs and give back those they hold "
                      "and have not started; running jobs go on. Resume: controlplane queues resume "
                      f"{args.queue}")
            else:
                print(f"{args.queue} was paused already (its reason and time are kept)")
            return 0
        if _scalar(conn, queries.RESUME_QUEUE, {"queue": args.queue}):
            print(f"resumed {args.queue}: its workers take its jobs again")
        else:
            print(f"{args.queue} was not paused")
        return 0
    finally:
        conn.close()


# -- stats, prune, workers ---------------------------------------------------------

_STATS_COLUMNS = ("queue", "ready", "scheduled", "running", "failed", "completed_last_minute", "oldest_ready_age")


def _stats_query(settings: Settings) -> str:
    """The queue stats' query: the Postgres broker's message table holds the live jobs; else the view."""
    return queries.QUEUE_STATS_VIA_MESSAGES if settings.postgres_broker else queries.QUEUE_STATS


def cmd_stats(args: argparse.Namespace) -> int:
    settings = _settings()
    stats = _stats_query(settings)
    conn = _connect(_url(settings))
    try:
        with conn.cursor() as cur:
            cur.execute("; ".join(f"SET {setting}" for setting in queries.STATS_SETTINGS))
        while True:
            rows = _fetch(conn, stats)
            if args.json:
                # One document per refresh; one line each when watching, for a script to read.
                print(json.dumps(rows, default=str, indent=None if args.watch else 2), flush=True)
            else:
                if args.watch and sys.stdout.isatty():
                    print("\033[H\033[J", end="")  # clear the screen
                if args.watch:
                    print(f"{time.strftime('%H:%M:%S')}  every {args.interval:g}s, Ctrl-C to stop")
                # (with no row to show it on, asked apart: a queue whose jobs all just completed is not listed)
                uncounted = any(r["completed_last_minute"] is None for r in rows) or (
                    not rows
                    and settings.postgres_broker
                    and not _fetch(conn, queries.STATS_COMPLETIONS_COUNTED)[0]["counted"]
                )
                for r in rows:
                    r["oldest_ready_age"] = f"{r.pop('oldest_ready_age_seconds'):.1f}s"
                    if r["completed_last_minute"] is None:
                        r["completed_last_minute"] = "-"
                if rows:
                    # (pauses are the Postgres broker's: the view other brokers read has no such column)
                    print_table(rows, _STATS_COLUMNS + (("paused",) if "paused" in rows[0] else ()))
                else:
                    print("no jobs in any queue" if not uncounted else "no queue with live, failed or paused jobs")
                if uncounted:
                    print(f"(completed_last_minute not counted: without the BRIN index on jobs.completed_at, "
                          f"PostgreSQL 16+, it would read all of jobs, over "
                          f"{queries.STATS_COMPLETED_SCAN_MAX_ROWS:,} rows, at each refresh)")
                sys.stdout.flush()
            if not args.watch:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0  # the way to leave --watch
    finally:
        conn.close()


def cmd_prune(args: argparse.Namespace) -> int:
    settings = _settings()
    # A bad value is named where it came from: the option, or the setting it defaults to.
    sources = (
        "--completed-after" if args.completed_after else "CONTROLPLANE_RETENTION_COMPLETED",
        "--failed-after" if args.failed_after else "CONTROLPLANE_RETENTION_FAILED",
    )
    args.completed_after = args.completed_after or settings.retention_completed
    args.failed_after = args.failed_after or settings.retention_failed
    conn = _connect(_url(settings))
    try:
        _check_retentions(conn, zip(sources, (args.completed_after, args.failed_after), strict=True))
        # What the daily controlplane.prune does, so that a cron line running this command
        # without a clock prunes the same.
        from tasks.maintenance import prune_rows

        with conn.cursor() as cur:
            pruned = prune_rows(cur, args.completed_after, args.failed_after)
        print(
            f"pruned {pruned['jobs']} job(s), completed or cancelled longer ago than {args.completed_after} or "
            f"failed longer ago than {args.failed_after}, and {pruned['results']} expired result(s); and "
            f"{pruned['schedule_ticks']} schedule tick(s) older than {args.completed_after} (each schedule's "
            f"latest kept), {pruned['rate_limits']} expired rate-limit counter(s)"
        )
        return 0
    finally:
        conn.close()


def _check_retentions(conn: Any, named: Iterable[tuple[str, str]]) -> None:
    """Refuse a retention that is not a positive period, or that this server does not read as an
    interval (``7,5 days`` passes the check without a server): ``name`` says where it came from."""
    for name, value in named:
        problem = retention_problem(value)
        try:
            _scalar(conn, "SELECT %(value)s::interval", {"value": value})
        except UserError:
            problem = problem or f"{value!r} is not a PostgreSQL interval"
        else:
            try:
                # The prune's cut-off: an interval of thousands of years reaches before 4713 BC,
                # and every prune then failed ("timestamp out of range"), completed jobs kept too.
                _scalar(conn, "SELECT now() - %(value)s::interval", {"value": value})
            except UserError:
                problem = problem or (f"{value!r} reaches before the earliest time PostgreSQL holds (4713 BC): "
                                      "to keep jobs for ever, give a few centuries ('500 years')")
        if problem:
            raise UserError(f"{name} must be a PostgreSQL interval such as '7 days': {problem}")


_WORKER_COLUMNS = ("id", "state", "queues", "started_at", "heartbeat_at", "silent_seconds", "in_flight")


def cmd_workers(args: argparse.Namespace) -> int:
    settings = _settings()
    _needs_postgres_broker(settings, "controlplane workers",
                           "RabbitMQ's workers do not heartbeat here: its management UI lists their consumers")
    conn = _connect(_url(settings))
    try:
        rows = _fetch(conn, queries.WORKERS)
    finally:
        conn.close()
    for r in rows:
        # A worker heartbeats every CONTROLPLANE_HEARTBEAT_INTERVAL; one silent for a whole lease is
        # gone (killed, cut off), its row kept until a live worker's reaper forgets it (4 leases).
        r["state"] = "alive" if r["silent_seconds"] < settings.lease_seconds else "dead (silent past its lease)"
    if args.json:
        print(_jsonable(rows))
        return 0
    if not rows:
        print("no workers")
        return 0
    for r in rows:
        r["queues"] = ",".join(r["queues"])
        r["silent_seconds"] = f"{r['silent_seconds']:.1f}"
    print_table(rows, _WORKER_COLUMNS)
    return 0


# -- clock, metrics -------------------------------------------------------------------


#: Modules declaring the control plane's own actors and schedules.
_BUILTIN_ACTOR_MODULES = ("tasks.maintenance", "tasks.provision")


def _import_modules(modules: Sequence[str]) -> None:
    """Import ``modules``; the application's are also looked for in the current directory, as the
    ``dramatiq`` command looks, but last on the path: a file there named like a module the
    control plane imports (``secrets.py``) does not shadow it."""
    import importlib

    if any(m not in _BUILTIN_ACTOR_MODULES for m in modules) and os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except (ImportError, ValueError, TypeError) as exc:  # "" and "." raise the last two
            raise UserError(f"cannot import module {module!r}: {exc}") from None


def cmd_clock(args: argparse.Namespace) -> int:
    import signal
    import threading

    from tasks.periodic import Clock, schedule_names

    # The built-in schedule (controlplane.prune), then the application's (the Procfile's line adds
    # tasks.provision, whose sweep needs provisioning workers).
    _import_modules(["tasks.maintenance", *(args.module or [])])
    settings = _settings()
    url = _url(settings)  # (an error if there is no database to tick in)
    if settings.prune_schedule is not None and not args.list:
        # The daily prune would fail on a retention this server refuses: say so now, not at 03:00.
        # A server not up yet is no reason to stop: the clock waits for it, as the workers do.
        try:
            conn = _connect(url)
        except UserError as exc:
            print(_printable(redact(f"controlplane clock: the retentions are not checked against the server ({exc})")),
                  file=sys.stderr, flush=True)  # fmt: skip
        else:
            try:
                _check_retentions(conn, [("CONTROLPLANE_RETENTION_COMPLETED", settings.retention_completed),
                                         ("CONTROLPLANE_RETENTION_FAILED", settings.retention_failed)])
            finally:
                conn.close()
    clock = Clock()
    if args.list:
        now = clock.now()
        last = clock.last_ticks()
        rows: list[dict[str, Any]] = [
            {
                "name": s.name,
                "cron": s.cron.expression,
                "actor": s.actor_name,
                "queue": s.queue_name,
                "last_tick": last.get(s.name),
                "next_tick": s.cron.next(now),
            }
            for s in clock.schedules
        ]
        clock.close()
        if args.json:
            print(_jsonable(rows))
        else:
            print_table([{**r, "last_tick": _day(r["last_tick"]), "next_tick": _day(r["next_tick"])} for r in rows],
                        ("name", "cron", "actor", "queue", "last_tick", "next_tick"))
        return 0
    if args.once:
        ticks = clock.run_pending()
        failed = clock.failed
        clock.close()
        if args.json:
            print(_jsonable([{"schedule": t.schedule_name, "tick_at": t.tick_at, "job_id": t.job_id}
                             for t in ticks]))
        else:
            for t in ticks:
                print(f"{t.schedule_name}  {t.tick_at.isoformat()}  {t.job_id}")
            print(f"enqueued {len(ticks)} tick(s)")
        if failed:
            # (each logged above with its reason): a cron line's exit status must say it
            raise UserError(f"{len(failed)} due tick(s) not enqueued: "
                            + "; ".join(f"{name} at {tick.isoformat()}: {reason}" for name, tick, reason in failed))
        return 0
    import logging

    # INFO logs each tick this clock wins (about 150 bytes: 215 MB a day for 1,000 every-minute
    # schedules); WARNING keeps the clock's troubles and drops those.
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"clock: {len(clock.schedules)} schedule(s): {schedule_names(clock.schedules)}", flush=True)
    clock.run_forever(stop)
    return 0


def _day(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value is not None else ""


def cmd_metrics(args: argparse.Namespace) -> int:
    import signal
    import threading

    import tasks
    from tasks.metrics import serve_queue_metrics

    settings = _settings()
    _connect(_url(settings)).close()  # fail now, with one line, if the database does not answer
    host = args.host or settings.metrics_host
    try:
        server, _ = serve_queue_metrics(
            tasks.connection, args.port, host, _stats_query(settings), settings.lease_seconds, settings.postgres_broker
        )
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{args.port}: {exc.strerror}") from None
    print(f"serving queue metrics on http://{host}:{server.server_port}/metrics", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    return 0


# -- demo ------------------------------------------------------------------------


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise UserError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def cmd_demo(args: argparse.Namespace) -> int:
    from tasks.demo_run import run_demo

    return run_demo()


# -- main ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlplane", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="create or upgrade the control plane's tables (idempotent)")
    p.add_argument(
        "--lock-timeout",
        type=_seconds,
        default=2.0,
        help="seconds to wait for a table's lock before trying again (0 waits as long as it takes): a "
        "migration waiting behind a long transaction holds up every send meanwhile (default: 2)",
    )
    p.add_argument("--lock-attempts", type=_positive_int, default=10, help="tries before giving up (default: 10)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("demo", help="start a worker, send jobs and watch them in control_plane.jobs")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("db", help="the embedded PostgreSQL (used when DATABASE_URL is unset)")
    p.add_argument(
        "action",
        choices=("start", "stop", "url"),
        help="start: start it (made under CONTROLPLANE_HOME, ./.controlplane, on first use); "
        "stop: stop it; url: print its URL (for psql), starting it if needed",
    )
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("send", help="send a message to an actor and print its job id")
    p.add_argument("actor", help="actor name, e.g. provision_project")
    p.add_argument("--args", help="positional arguments, a JSON array")
    p.add_argument("--kwargs", help="keyword arguments, a JSON object")
    p.add_argument("--delay", type=_seconds, help="seconds to wait before it may run")
    p.add_argument("--priority", type=_priority, help="lower runs first (default: the actor's)")
    p.add_argument("--unique-key", help="at most one live job per key")
    p.add_argument("--queue", help="the queue of an actor no --module declares, to send it by name")
    p.add_argument("--module", action="append", help="module declaring the actor (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_send)

    jobs = sub.add_parser("jobs", help="list, show, retry and cancel jobs (control_plane.jobs)")
    jsub = jobs.add_subparsers(dest="action", required=True)
    p = jsub.add_parser("list", help="recent jobs, newest first")
    p.add_argument(
        "--status",
        choices=("pending", "retrying", "running", "completed", "failed", "cancelled"),
        help="retrying: pending jobs waiting for another attempt (found by an index, where pending "
        "reads the history)",
    )
    p.add_argument("--type", type=_actor_name, help="actor name")
    p.add_argument("--queue", type=_queue_name)
    p.add_argument(
        "--since",
        help="a PostgreSQL interval, e.g. '1 hour': jobs created since then (with --status failed: failed since then)",
    )
    p.add_argument("--limit", type=_row_limit, default=50, help="at most this many jobs (default 50)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_jobs)
    p = jsub.add_parser("show", help="one job: payload, every attempt and its error, result")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_jobs)
    p = jsub.add_parser(
        "retry",
        help="put a failed or cancelled job back in its queue (control_plane.retry_job)",
        description="Put a failed or cancelled job back in its queue, its error history kept; "
        "with --failed, every failed job (of one actor with --type, of one queue with --queue, failed within "
        "--since, the oldest failures first, at most --limit), each due at once.",
    )
    p.add_argument("id", nargs="?", help="the job's id")
    p.add_argument("--failed", action="store_true", help="retry every failed job")
    p.add_argument("--type", type=_actor_name, help="with --failed: only jobs of this actor")
    p.add_argument("--queue", type=_queue_name, help="with --failed: only jobs of this queue")
    p.add_argument("--since", help="with --failed: only jobs that failed since then, a PostgreSQL interval ('1 hour')")
    p.add_argument("--limit", type=_row_limit, help="with --failed: at most this many, the oldest failures first")
    p.add_argument("--dry-run", action="store_true", help="with --failed: say how many would be retried, retry none")
    p.set_defaults(func=cmd_jobs_retry)
    p = jsub.add_parser(
        "cancel",
        help="cancel a pending or running job (control_plane.cancel_job)",
        description="Cancel a job: a pending one at once; a running one is interrupted by its worker, "
        "woken at once (NOTIFY) or at the latest at its next heartbeat, and ends cancelled (never retried). "
        "With --queue, every pending or running job of the queue (of one actor with --type), one "
        "transaction each.",
    )
    p.add_argument("id", nargs="?", help="the job's id")
    p.add_argument("--queue", type=_queue_name, help="cancel every pending or running job of this queue")
    p.add_argument("--type", type=_actor_name, help="with --queue: only jobs of this actor")
    p.set_defaults(func=cmd_jobs_cancel)

    queues = sub.add_parser(
        "queues",
        help="pause and resume queues (control_plane.pause_queue, resume_queue)",
        description="Pause a queue: its workers take none of its jobs, and give back the ones they hold that "
        "no thread has started; running jobs go on, sends and retries go on (the jobs wait pending). Resume: "
        "its workers take its jobs again.",
    )
    qsub = queues.add_subparsers(dest="action", required=True)
    p = qsub.add_parser("pause", help="stop the workers taking a queue's jobs")
    p.add_argument("queue", type=_queue_name)
    p.add_argument("--reason", help="why, for whoever reads `controlplane queues list`")
    p.set_defaults(func=cmd_queues)
    p = qsub.add_parser("resume", help="let the workers take a paused queue's jobs again")
    p.add_argument("queue", type=_queue_name)
    p.set_defaults(func=cmd_queues)
    p = qsub.add_parser("list", help="the paused queues, since when and why")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_queues)

    p = sub.add_parser(
        "stats", help="per queue: ready, scheduled, running, failed, completed in the last minute, oldest wait"
    )
    p.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    p.add_argument("--interval", type=_interval_seconds, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--json", action="store_true", help="print JSON (one line per refresh with --watch)")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser(
        "prune",
        help="delete old finished jobs and expired results, as the daily controlplane.prune does",
        description="Delete completed and cancelled jobs finished longer ago than --completed-after, "
        "failed ones finished longer ago than --failed-after, and expired results: about 10,000 rows per "
        "transaction, so that a large history holds no snapshot open for long.",
    )
    p.add_argument(
        "--completed-after", help="a PostgreSQL interval (default: CONTROLPLANE_RETENTION_COMPLETED, '7 days')"
    )
    p.add_argument("--failed-after", help="a PostgreSQL interval (default: CONTROLPLANE_RETENTION_FAILED, '30 days')")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser(
        "clock",
        help="enqueue periodic tasks at their cron times (each tick once, however many clocks run)",
        description="Load the schedules declared with tasks.periodic (@periodic, schedule()) in the given "
        "modules, plus the built-in controlplane.prune, and enqueue each due tick once. Run one or more "
        "(the Procfile's clock: line); every tick still runs once.",
    )
    p.add_argument(
        "--module", action="extend", nargs="+", help="modules declaring schedules (--module a b, or repeated)"
    )
    p.add_argument("--once", action="store_true", help="enqueue what is due now, then exit")
    p.add_argument("--list", action="store_true", help="list the schedules, their last and next ticks, then exit")
    p.add_argument("--json", action="store_true", help="with --once or --list: print JSON")
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default="INFO",
        help="INFO (the default) logs each tick this clock enqueues; WARNING only what went wrong",
    )
    p.set_defaults(func=cmd_clock)

    p = sub.add_parser(
        "metrics",
        help="serve queue depth, lag and failure gauges for Prometheus (control_plane.queue_stats' figures)",
    )
    p.add_argument("--port", type=_port, default=9192, help="port to listen on (default 9192; 0: any free port)")
    p.add_argument("--host", help="address to listen on (default: CONTROLPLANE_METRICS_HOST, 0.0.0.0)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("workers", help="live workers: heartbeats and the jobs they hold")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_workers)
    return parser


def _seconds(raw: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 <= value <= _MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds from 0 to {_MAX_SECONDS:,}")
    return value


#: Ten years: the longest delay or interval the command line takes.
_MAX_SECONDS = 10 * 365 * 86_400


def _interval_seconds(raw: str) -> float:
    """An argparse type: a finite number of seconds, more than 0."""
    value = _seconds(raw)
    if value == 0:
        raise argparse.ArgumentTypeError(f"{raw!r}: the interval must be more than 0 seconds")
    return value


def _positive_int(raw: str) -> int:
    """An argparse type: a whole number, 1 or more."""
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number of 1 or more")
    return int(raw)


def _row_limit(raw: str) -> int:
    """An argparse type: a number of rows, 1 or more, that PostgreSQL's ``LIMIT`` takes."""
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number of 1 or more")
    return value


def _priority(raw: str) -> int:
    """An argparse type: a priority, a whole number PostgreSQL's ``integer`` holds."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if value not in queries.INT_RANGE:
        raise argparse.ArgumentTypeError(
            f"{raw!r} is out of range ({queries.INT_RANGE.start} to {queries.INT_RANGE.stop - 1})"
        )
    return value


def _port(raw: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    if not raw.isdigit() or int(raw) > 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a TCP port (0-65535)")
    return int(raw)


def _first_line(exc: BaseException) -> str:
    diag = getattr(exc, "diag", None)
    text = (getattr(diag, "message_primary", None) or str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _schema_behind(exc: BaseException) -> str | None:
    """For an error saying a table, column, schema or function does not exist: what is wrong
    when the database's schema is behind this release's (None when it is not)."""
    missing = (psycopg2.errors.UndefinedTable, psycopg2.errors.UndefinedColumn,
               psycopg2.errors.InvalidSchemaName, psycopg2.errors.UndefinedFunction)  # fmt: skip
    if not isinstance(exc, missing):
        return None
    import migrations

    try:
        found = migrations.current(_url(_settings()))
    except Exception:  # the error at hand is the one to report
        return None
    if found is None:
        return "the database has no control-plane tables yet"
    needed = migrations.head()
    if found != needed and migrations.known(found):
        return f"the database's schema is at revision {found}, this release needs {needed}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``controlplane`` console script."""
    args = build_parser().parse_args(argv)
    try:
        _check_text_arguments(args)
        code: int = args.func(args)
        return code
    except (UserError, ConfigurationError) as exc:
        _error(str(exc))
        return 1
    except (psycopg2.Error, ConnectionClosed) as exc:
        if isinstance(exc, ConnectionClosed) and not isinstance(exc.__cause__, psycopg2.Error):
            # RabbitMQ's (the Postgres broker's wraps its database error): not the database's
            _error(f"cannot connect to RabbitMQ (BROKER_URL): {_first_line(exc)}")
        elif isinstance(exc, ConnectionClosed) or db.is_connection_error(exc):
            # The database went away (or never answered) after the command started.
            reason = _first_line(exc.__cause__ or exc)
            _error(f"cannot connect to the database: {reason}")
        elif (behind := _schema_behind(exc)) is not None:
            _error(f"{behind} ({_first_line(exc)}): run `controlplane migrate`")
        else:  # including a deadlock or a cancelled statement, which psycopg2 files as OperationalError
            _error(f"the database refused: {_first_line(exc)}")
        return 1
    except BrokerConnectionError as exc:
        from tasks.broker import SchemaMissing

        if not isinstance(exc, SchemaMissing):
            raise
        _error(exc.message)  # (a send to a database never migrated, or older than this release)
        return 1
    except ssl.SSLError as exc:  # (psycopg2 wraps its own: this is RabbitMQ's amqps:// handshake)
        _error(f"cannot connect to RabbitMQ (BROKER_URL) over TLS: {_first_line(exc)}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`controlplane stats --watch | head`): stop quietly, as a
        # filter does, with nothing left to flush at exit into the closed pipe (which would print a
        # traceback). A broken pipe elsewhere (stdout still flushes) is an error like any other.
        if not _reader_gone(sys.stdout.fileno()):
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a filter the signal ended


def _each_saying_how_far(
    ids: list[str], act: Callable[[str], None], what: str, so_far: Callable[[], str], rest: str
) -> bool:
    """``_one_by_one``, saying how far it got when Ctrl-C (False) or the database (its error,
    raised for ``main`` to say) stopped it."""
    try:
        finished = _one_by_one(ids, act, what)
    except (psycopg2.Error, ConnectionClosed):  # (the server gone, a statement timeout)
        print(f"stopped: {so_far()}, before the error below; run it again to {rest}", file=sys.stderr)
        raise
    if not finished:
        print(f"interrupted: {so_far()}; run it again to {rest}", file=sys.stderr)
    return finished


def _check_text_arguments(args: argparse.Namespace) -> None:
    """Refuse an argument that is not UTF-8 text (a terminal in Latin-1: Python keeps the bytes
    as surrogates, which no statement can send): one line, not psycopg2's traceback."""
    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise UserError(f"{name.replace('_', '-')} {_printable(ascii(text))} is not valid UTF-8 text "
                                    "(is the terminal set to another encoding?)") from None


def _reader_gone(fd: int) -> bool:
    """Whether ``fd`` is a pipe's end whose reader has closed it (poll says POLLERR on Linux)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


if __name__ == "__main__":
    # ``python -m tasks.cli``: run the module's importable copy, so that the errors other modules
    # raise (``from tasks.cli import UserError``) are the classes ``main`` catches.
    from tasks.cli import main as _main

    raise SystemExit(_main())
