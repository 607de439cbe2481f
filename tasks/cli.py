"""The ``controlplane`` command: migrate, demo, send, inspect jobs, manage the embedded database."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import psycopg2

from tasks import db
from tasks.errors import ConfigurationError
from tasks.settings import Settings


class UserError(Exception):
    """A mistake the user can fix; printed as one line, exit status 1."""


def _settings() -> Settings:
    return Settings.from_env()


def _url(settings: Settings) -> str:
    try:
        return db.database_url(settings)
    except Exception as exc:  # the embedded server failed to start
        raise UserError(f"cannot start the embedded PostgreSQL: {exc}") from exc


def _connect(url: str) -> Any:
    try:
        return db.connect(url, autocommit=True, application_name="controlplane-cli")
    except psycopg2.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "connection refused"
        raise UserError(f"cannot connect to the database: {first}") from exc


def _describe_target(settings: Settings) -> str:
    if settings.database_url is None:
        return f"embedded PostgreSQL (data in {settings.home / 'pgdata'})"
    from sqlalchemy.engine import make_url

    return "DATABASE_URL " + make_url(settings.database_url).render_as_string(hide_password=True)


# -- migrate -------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    import migrations

    settings = _settings()
    url = _url(settings)
    _connect(url).close()
    migrations.upgrade(url)
    print(f"migrated {_describe_target(settings)} to revision {migrations.current(url)}")
    return 0


# -- db --------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    settings = _settings()
    if args.action == "url":
        print(_url(settings))
    elif args.action == "start":
        _url(settings)
        print(f"running: {_describe_target(settings)}")
    elif args.action == "stop":
        if settings.database_url is not None:
            raise UserError("DATABASE_URL is set: that server is not ours to stop")
        print("stopped" if db.stop_embedded(settings.home) else "the embedded server was not running")
    return 0


# -- send ------------------------------------------------------------------------


def _json_arg(raw: str | None, name: str, kind: type) -> Any:
    if raw is None:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UserError(f"{name} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    if not isinstance(value, kind):
        raise UserError(f"{name} must be a JSON {'array' if kind is list else 'object'}")
    return value


def cmd_send(args: argparse.Namespace) -> int:
    import importlib

    import dramatiq

    import tasks

    for module in args.module or []:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UserError(f"cannot import module {module!r}: {exc}") from None
    send_args = _json_arg(args.args, "--args", list)
    send_kwargs = _json_arg(args.kwargs, "--kwargs", dict)
    options: dict[str, Any] = {}
    if args.priority is not None:
        options["priority"] = args.priority
    if args.unique_key:
        options["unique_key"] = args.unique_key
    actor = tasks.broker.actors.get(args.actor)
    if actor is not None:
        message = actor.message_with_options(args=tuple(send_args), kwargs=send_kwargs, **options)
    else:
        # An actor declared only in the workers' code: address it by name.
        message = dramatiq.Message(
            queue_name=args.queue,
            actor_name=args.actor,
            args=tuple(send_args),
            kwargs=send_kwargs,
            options=options,
        )
    try:
        sent = tasks.broker.enqueue(message, delay=int(args.delay * 1000) if args.delay else None)
    except TypeError as exc:
        raise UserError(str(exc)) from None
    print(json.dumps({"id": sent.message_id}) if args.json else sent.message_id)
    return 0


# -- jobs ------------------------------------------------------------------------

_LIST_COLUMNS = ("id", "type", "queue", "status", "attempts", "max_attempts", "scheduled_at", "last_error")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone().strftime("%H:%M:%S.%f")[:-3]
    return str(value)


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
    conn = _connect(_url(_settings()))
    try:
        if args.action == "list":
            where, params = ["true"], {}
            for column in ("status", "type", "queue"):
                value = getattr(args, column)
                if value:
                    where.append(f"{column} = %({column})s")
                    params[column] = value
            if args.since:
                where.append("created_at >= now() - %(since)s::interval")
                params["since"] = args.since
            rows = _fetch(
                conn,
                f"SELECT {', '.join(_LIST_COLUMNS)} FROM control_plane.jobs WHERE {' AND '.join(where)} "  # noqa: S608
                "ORDER BY created_at DESC LIMIT %(limit)s",
                {**params, "limit": args.limit},
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


def _show(job: dict[str, Any]) -> str:
    lines = [f"{k:>13}: {_fmt(job[k])}" for k in job if k not in ("payload", "options", "errors", "result")]
    lines.append(f"{'payload':>13}: {json.dumps(job['payload'])}")
    lines.append(f"{'result':>13}: {json.dumps(job['result'])}")
    lines.append(f"{'attempts log':>13}:")
    for entry in job["errors"] or []:
        lines.append(f"{'':>15}#{entry.get('attempt')} at {entry.get('at')}: {entry.get('error')}")
    return "\n".join(lines)


# -- demo ------------------------------------------------------------------------


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise UserError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def cmd_demo(args: argparse.Namespace) -> int:
    import migrations

    settings = _settings()
    print(f"database: {_describe_target(settings)}")
    url = _url(settings)
    _connect(url).close()
    migrations.upgrade(url)
    print(f"migrations: at revision {migrations.current(url)}")

    env = {
        **os.environ,
        "DATABASE_URL": url,
        "CONTROLPLANE_POLL_INTERVAL": "0.5",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = settings.home / "demo-worker.log"
    settings.home.mkdir(parents=True, exist_ok=True)
    worker_cmd = [sys.executable, "-m", "dramatiq", "tasks", "tasks.demo", "--processes", "1", "--threads", "4"]
    print(f"worker: {' '.join(worker_cmd[1:])}  (log: {log_path})")
    with open(log_path, "w") as log:
        worker = subprocess.Popen(worker_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        os.environ["DATABASE_URL"] = url
        from tasks import demo

        sent: list[Any] = [demo.resize_image.send(i, 640) for i in range(1, 4)]
        sent.append(demo.charge_card.send(1001))
        ids = [m.message_id for m in sent]
        print(f"sent {len(ids)} jobs; watching control_plane.jobs (Ctrl-C to stop)\n")
        conn = _connect(url)
        seen: dict[str, tuple[str, int]] = {}

        def all_done() -> bool:
            rows = _fetch(
                conn,
                "SELECT id::text, type, status, attempts, last_error, scheduled_at - now() AS wait "
                "FROM control_plane.jobs WHERE id = ANY(%(ids)s::uuid[])",
                {"ids": ids},
            )
            for r in rows:
                key = (r["status"], r["attempts"])
                if seen.get(r["id"]) != key:
                    seen[r["id"]] = key
                    note = ""
                    if r["status"] == "pending" and r["attempts"]:
                        wait = max(r["wait"].total_seconds(), 0.0)
                        note = f"  retry in {wait:.1f}s after: {r['last_error']}"
                    print(
                        f"  {time.strftime('%H:%M:%S')}  {r['id'][:8]}  {r['type']:<18} "
                        f"{r['status']:<9} attempts={r['attempts']}{note}"
                    )
            return len(rows) == len(ids) and all(r["status"] in ("completed", "failed") for r in rows)

        _wait_for(all_done, timeout=120, what="the demo jobs to finish")
        print("\nfinal state, as an operator sees it with SQL:\n")
        print("  SELECT id, type, status, attempts, last_error FROM control_plane.jobs;\n")
        rows = _fetch(
            conn,
            "SELECT id, type, status, attempts, max_attempts, last_error, result FROM control_plane.jobs "
            "WHERE id = ANY(%(ids)s::uuid[]) ORDER BY created_at",
            {"ids": ids},
        )
        print_table(rows, ("id", "type", "status", "attempts", "max_attempts", "last_error", "result"))
        result = sent[0].get_result(block=True, timeout=10_000)
        print(f"\nresult of the first job through the results backend: {result}")
        conn.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
    print("worker stopped; nothing left running.")
    if settings.database_url is None:
        print(f"the embedded PostgreSQL keeps running; psql: `psql '{url}'`; stop: `controlplane db stop`")
    return 0


# -- main ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="controlplane", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("migrate", help="create or upgrade the control plane's tables (idempotent)")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("demo", help="start a worker, send jobs and watch them in control_plane.jobs")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("db", help="the embedded PostgreSQL (used when DATABASE_URL is unset)")
    p.add_argument("action", choices=("start", "stop", "url"))
    p.set_defaults(func=cmd_db)

    p = sub.add_parser("send", help="send a message to an actor and print its job id")
    p.add_argument("actor", help="actor name, e.g. provision_project")
    p.add_argument("--args", help="positional arguments, a JSON array")
    p.add_argument("--kwargs", help="keyword arguments, a JSON object")
    p.add_argument("--delay", type=float, help="seconds to wait before it may run")
    p.add_argument("--priority", type=int, help="lower runs first (default: the actor's)")
    p.add_argument("--unique-key", help="at most one live job per key")
    p.add_argument("--queue", default="default", help="queue, for actors not importable here")
    p.add_argument("--module", action="append", help="module declaring the actor (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_send)

    jobs = sub.add_parser("jobs", help="inspect control_plane.jobs")
    jsub = jobs.add_subparsers(dest="action", required=True)
    p = jsub.add_parser("list", help="recent jobs, newest first")
    p.add_argument("--status", choices=("pending", "running", "completed", "failed", "cancelled"))
    p.add_argument("--type", help="actor name")
    p.add_argument("--queue")
    p.add_argument("--since", help="a PostgreSQL interval, e.g. '1 hour'")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_jobs)
    p = jsub.add_parser("show", help="one job: payload, every attempt and its error, result")
    p.add_argument("id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_jobs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``controlplane`` console script."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except (UserError, ConfigurationError) as exc:
        print(f"controlplane: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
