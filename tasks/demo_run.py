"""``controlplane demo``: the README's main job, start to finish.

Migrates, starts the local stand-in admin services and a real ``dramatiq``
worker, sends a few jobs (one fails twice and retries with backoff) and one
``provision_project``, and shows their rows of ``control_plane.jobs`` as they
change; then what the provisioning created, proven by connecting to the new
database with the project's app role.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import psycopg2

from tasks.cli import UserError, _connect, _describe_target, _fetch, _settings, _url, _wait_for, print_table

STANDIN_TOKENS = {"auth": "demo-auth-token", "realtime": "demo-realtime-token", "storage": "demo-storage-token"}


def _watch(conn: Any, ids: list[str], seen: dict[str, tuple[str, int]]) -> bool:
    rows = _fetch(
        conn,
        "SELECT id::text, type, status, attempts, last_error, scheduled_at - now() AS wait "
        "FROM control_plane.jobs WHERE id = ANY(%(ids)s::uuid[]) ORDER BY created_at",
        {"ids": ids},
    )
    for r in rows:
        key = (r["status"], r["attempts"])
        if seen.get(r["id"]) != key:
            seen[r["id"]] = key
            note = ""
            if r["status"] == "pending" and r["attempts"]:
                note = f"  retry in {max(r['wait'].total_seconds(), 0.0):.1f}s after: {r['last_error']}"
            elif r["status"] == "failed":
                note = f"  {r['last_error']}"
            # The whole id, for `controlplane jobs show` (the first characters of time-ordered
            # ids are the same for jobs sent in the same second)
            print(f"  {time.strftime('%H:%M:%S')}  {r['id']}  {r['type']:<28} {r['status']:<9} "
                  f"attempts={r['attempts']}{note}")
    return len(rows) == len(ids) and all(r["status"] in ("completed", "failed") for r in rows)


def run_demo() -> int:
    """Run the demo; returns the exit status."""
    import migrations
    from tasks.provision.standin import StandinService

    settings = _settings()
    print(f"database: {_describe_target(settings)}")
    url = _url(settings, create=True)
    _connect(url).close()
    try:
        migrations.upgrade(url)
    except migrations.NewerSchema as exc:  # a newer release's schema, which this one runs on
        print(f"migrations: {exc}; left as it is")
    else:
        print(f"migrations: at revision {migrations.current(url)}")

    standins = {name: StandinService(name, token) for name, token in STANDIN_TOKENS.items()}
    for service in standins.values():
        service.start()
    print("services: stand-in auth, realtime and storage admin APIs on " +
          ", ".join(s.url for s in standins.values()))
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "CONTROLPLANE_POLL_INTERVAL": "0.5",
        "PYTHONUNBUFFERED": "1",
        **{f"{n.upper()}_SERVICE_URL": s.url for n, s in standins.items()},
        **{f"{n.upper()}_SERVICE_TOKEN": t for n, t in STANDIN_TOKENS.items()},
    }
    os.environ.update({k: v for k, v in env.items() if k.endswith(("_SERVICE_URL", "_SERVICE_TOKEN"))})
    log_path = settings.home / "demo-worker.log"
    settings.home.mkdir(parents=True, exist_ok=True)
    worker_cmd = [sys.executable, "-m", "dramatiq", "tasks", "tasks.demo", "tasks.provision",
                  "--processes", "1", "--threads", "4"]
    print(f"worker: python {' '.join(worker_cmd[1:])}  (log: {log_path})")
    with open(log_path, "w") as log:
        worker = subprocess.Popen(worker_cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        os.environ["DATABASE_URL"] = url
        import tasks
        from tasks import demo
        from tasks.broker import PostgresBroker
        from tasks.provision import provision_project, reveal_secrets

        if not isinstance(tasks.broker, PostgresBroker):
            raise SystemExit("controlplane demo runs on the PostgreSQL broker: unset BROKER_URL")
        tasks.broker.reconfigure(url)
        project_id = "demo_" + uuid.uuid4().hex[:6]
        sent: list[Any] = [demo.resize_image.send(i, 640) for i in range(1, 4)]
        sent.append(demo.charge_card.send(1001))
        provision = provision_project.send({
            "project_id": project_id, "tenant_id": "tenant-demo", "region": "eu-west-1",
            "owner_id": "user_42", "organization_id": "org_7", "api_key_count": 2,
            "services": {"auth": True, "realtime": True, "storage": True},
        })
        sent.append(provision)
        ids = [m.message_id for m in sent]
        print(f"sent {len(ids)} jobs; watching control_plane.jobs (Ctrl-C to stop)\n")
        conn = _connect(url)
        seen: dict[str, tuple[str, int]] = {}

        def everything_done() -> bool:
            step_ids = [r["id"] for r in _fetch(
                conn, "SELECT id::text FROM control_plane.jobs WHERE type LIKE 'provision_project.%%' "
                      "AND payload -> 'args' ->> 0 = %(p)s", {"p": project_id})]
            done = _watch(conn, ids + step_ids, seen)
            # The workflow failed for good and was undone (or waits for an operator): say why now,
            # rather than wait for the step jobs a successful run would have made.
            entry = _fetch(conn, "SELECT status, last_error FROM control_plane.jobs WHERE id = %(id)s",
                           {"id": provision.message_id})
            if entry and entry[0]["status"] == "failed":
                raise UserError(f"provisioning the demo project failed: {entry[0]['last_error']}")
            return done and len(step_ids) == 6

        _wait_for(everything_done, timeout=180, what="the demo jobs to finish")
        print("\nfinal state, as an operator sees it with SQL:\n")
        print("  SELECT id, type, status, attempts, last_error FROM control_plane.jobs;\n")
        rows = _fetch(
            conn,
            "SELECT id, type, status, attempts, max_attempts, last_error FROM control_plane.jobs "
            "WHERE id = ANY(%(ids)s::uuid[]) ORDER BY created_at",
            {"ids": ids},
        )
        print_table(rows, ("id", "type", "status", "attempts", "max_attempts", "last_error"))
        print(f"\nresult of the first job, through the results backend: "
              f"{sent[0].get_result(block=True, timeout=10_000)}")

        result = provision.get_result(block=True, timeout=60_000)
        print(f"\nprovisioned project {project_id}:")
        d = result["database"]
        where = f"{d['host']}:{d['port']}" if not str(d["host"]).startswith("/") else f"the socket in {d['host']}"
        print(f"  database   {d['database']} on {where}, schema {d['schema_name']}, "
              f"app role {d['user']} (owner {d['owner_role']})")
        print(f"  services   {', '.join(n for n, on in result['services'].items() if on)} "
              f"(tenant {result['tenant_id']})")
        print(f"  api keys   {', '.join(k['hint'] for k in result['api_keys'])} (only hashes are stored)")
        print(f"  metadata   region {result['region']}, owner {result['owner_id']}, "
              f"organization {result['organization_id']}, provisioned at {result['provisioned_at']}")
        secrets = reveal_secrets(tasks.settings, project_id)
        params = psycopg2.extensions.parse_dsn(url)
        params.update(dbname=d["database"], user=secrets["database_user"], password=secrets["database_password"])
        tenant = psycopg2.connect(**params)
        with tenant.cursor() as cur:
            cur.execute("SELECT current_user, current_database(), current_schema()")
            who = cur.fetchone()
        tenant.close()
        print(f"  connected  as {who[0]} to {who[1]}, search_path {who[2]} "
              f"(secrets revealed once to this caller, not printed)")
        conn.close()
    except psycopg2.Error as exc:
        raise UserError(f"the demo lost its database: {exc}") from exc
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        for service in standins.values():
            service.stop()
    print("\nworker stopped; nothing left running.")
    if settings.database_url is None:
        print(f"the embedded PostgreSQL keeps running; psql: `psql '{url}'`; stop: `controlplane db stop`")
    return 0
