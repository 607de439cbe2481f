"""Every migration's downgrade runs, with rows in the tables, and gives back the schema of the revision
before it; the chain then upgrades to head again, to the same schema.

No operator procedure downgrades (a rollback keeps the newer schema, docs/operations.md, "Upgrading"):
this keeps the downgrade functions true, so that a developer (or a rescue) can use them.
"""

from __future__ import annotations

from typing import Any

from alembic import command
from alembic.script import ScriptDirectory

import migrations
import tasks
from tasks.broker import PostgresBroker
from tests import actors
from tests.support import claim_in_process, query, settle_in_process

#: What the schema is, read from the catalogs (what `pg_dump --schema-only -n control_plane` prints,
#: without depending on a pg_dump binary): one query per kind of object, each row one object.
CATALOG = {
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid) AS default_or_expression, a.attgenerated
        FROM pg_attribute AS a JOIN pg_class AS c ON c.oid = a.attrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef AS d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = 'control_plane' AND c.relkind IN ('r', 'v', 'p') AND a.attnum > 0
          AND NOT a.attisdropped AND c.relname NOT LIKE 'alembic\\_version%'
        ORDER BY c.relname, a.attnum""",
    "relations": """
        SELECT c.relname, c.relkind, c.reloptions, c.relacl::text[], obj_description(c.oid, 'pg_class') AS comment
        FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'control_plane' AND c.relname NOT LIKE 'alembic\\_version%'
        ORDER BY c.relname""",
    "indexes": """
        SELECT indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'control_plane' AND tablename <> 'alembic_version' ORDER BY indexname""",
    "constraints": """
        SELECT c.relname, k.conname, pg_get_constraintdef(k.oid) AS definition
        FROM pg_constraint AS k JOIN pg_class AS c ON c.oid = k.conrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'control_plane' AND c.relname NOT LIKE 'alembic\\_version%'
        ORDER BY c.relname, k.conname""",
    "views": """
        SELECT viewname, definition FROM pg_views WHERE schemaname = 'control_plane' ORDER BY viewname""",
    "functions": """
        SELECT p.oid::regprocedure::text AS signature, pg_get_functiondef(p.oid) AS definition,
               obj_description(p.oid, 'pg_proc') AS comment, p.proacl::text[]
        FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = 'control_plane' ORDER BY 1""",
    "triggers": """
        SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid) AS definition
        FROM pg_trigger AS t JOIN pg_class AS c ON c.oid = t.tgrelid
        JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE n.nspname = 'control_plane' AND NOT t.tgisinternal ORDER BY 1, 2""",
    # 0009 and 0012 change who may connect to the database: what PUBLIC may do is what they change
    "database": """
        SELECT has_database_privilege('public', current_database(), 'CONNECT') AS public_connect,
               has_database_privilege('public', current_database(), 'TEMPORARY') AS public_temporary""",
}


def _schema(url: str) -> dict[str, list[dict[str, Any]]]:
    return {kind: query(url, sql) for kind, sql in CATALOG.items()}


def _revisions() -> list[str]:
    """This release's revisions, oldest first."""
    scripts = ScriptDirectory.from_config(migrations.alembic_config("postgresql://"))
    return [script.revision for script in reversed(list(scripts.walk_revisions()))]


def _jobs(url: str) -> int:
    return int(query(url, "SELECT count(*) AS n FROM control_plane.jobs")[0]["n"])


def _fill(url: str) -> None:
    """Rows in every table, through the broker where it writes them: pending (some keyed, one delayed),
    completed, failed then retried (its attempts_before_retry set), cancelled (its Cancelled result
    stored), running (a claimed message), and a project, API keys, rate limits, a schedule's tick,
    the pepper's fingerprint, actor defaults, a worker's heartbeat."""
    broker = tasks.broker
    assert isinstance(broker, PostgresBroker)
    broker.reconfigure(url)
    try:
        pending = [actors.noop.send(i).message_id for i in range(4)]
        actors.keyed_sink.send(1, 2)
        actors.noop.send_with_options(args=(9,), delay=3_600_000)
        consumer, held = claim_in_process()
        settle_in_process(consumer, held, "ack")
        consumer, held = claim_in_process()
        settle_in_process(consumer, held, "nack")
        failed = held.message_id
    finally:
        broker.close()
    query(url, "SELECT control_plane.retry_job(%s)", (failed,))
    query(url, "SELECT control_plane.cancel_job(%s)", (pending[-1],))
    query(
        url,
        """
        WITH claimed AS (
            UPDATE control_plane.messages SET claim_token = gen_random_uuid(), worker = 'w1',
                   lease_expires_at = now() + interval '30 seconds'
            WHERE id = (SELECT id FROM control_plane.messages WHERE claim_token IS NULL AND eta <= now()
                        ORDER BY id LIMIT 1)
            RETURNING id)
        UPDATE control_plane.jobs AS j SET status = 'running', started_at = now(), attempts = attempts + 1,
               worker = 'w1'
        FROM claimed WHERE j.id = claimed.id;
        INSERT INTO control_plane.worker_heartbeats (id, hostname, pid, queues) VALUES ('w1', 'h', 1, '{default}');
        INSERT INTO control_plane.projects (project_id, tenant_id, payload, payload_hash, status, region,
                                            waiting_job_ids)
        VALUES ('p1', 't1', '{"name": "p"}', 'h1', 'active', 'eu', ARRAY[gen_random_uuid()]),
               ('p2', 't2', '{}', 'h2', 'provisioning', 'us', '{}');
        INSERT INTO control_plane.api_keys (project_id, slot, key_hash, hint) VALUES ('p1', 0, 'k0', 'ab');
        INSERT INTO control_plane.rate_limits (key, value, expires_at)
        VALUES ('a', 3, now() + interval '1 hour'), ('b', 1, now() - interval '1 hour');
        INSERT INTO control_plane.schedule_ticks (schedule_name, tick_at) VALUES ('s', date_trunc('minute', now()));
        INSERT INTO control_plane.deployment (name, value) VALUES ('pepper_fingerprint', 'f');
        INSERT INTO control_plane.actor_defaults (actor, queue, priority, max_attempts) VALUES ('a', 'q', 3, 9);
        """,
    )
    states = {r["status"] for r in query(url, "SELECT DISTINCT status FROM control_plane.jobs")}
    assert states == {"pending", "running", "completed", "cancelled"}, states  # the failed one was retried
    assert query(url, "SELECT count(*) AS n FROM control_plane.jobs WHERE attempts_before_retry > 0")[0]["n"] == 1


def test_every_downgrade_gives_back_the_schema_before_it_with_rows_in_the_tables(empty_db: str) -> None:
    # Given the schema of each revision, as an upgrade one revision at a time leaves it
    revisions = _revisions()
    upgraded: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for revision in revisions:
        migrations.upgrade(empty_db, revision)
        upgraded[revision] = _schema(empty_db)
    # and rows of every kind in the tables at head
    _fill(empty_db)
    jobs = _jobs(empty_db)
    config = migrations.alembic_config(empty_db)  # the libpq URL, as docs/operations.md's recipe gives it
    # When it is downgraded one revision at a time, down to nothing
    for before, revision in reversed(list(zip([None, *revisions[:-1]], revisions, strict=True))):
        command.downgrade(config, "-1")
        # Then each downgrade leaves the revision before it, its schema as its upgrade left it,
        # and the jobs in place (until the first revision's downgrade drops their table)
        assert migrations.current(empty_db) == before, f"downgrade of {revision}"
        if before is None:
            got = _schema(empty_db)
            left = got["relations"] + got["functions"]
            assert left == [], f"downgrade of {revision} leaves {left}"
        else:
            got = _schema(empty_db)
            for kind, rows in upgraded[before].items():
                assert got[kind] == rows, f"downgrade of {revision}: its {kind} differ from revision {before}'s"
            assert _jobs(empty_db) == jobs, f"downgrade of {revision} lost jobs"
    # And the whole chain upgrades again, to the same schema
    migrations.upgrade(empty_db)
    assert _schema(empty_db) == upgraded[revisions[-1]]


def test_a_downgrade_and_upgrade_keep_the_jobs_and_their_indexes_right(empty_db: str) -> None:
    # Given a database at head with rows of every kind
    migrations.upgrade(empty_db)
    schema = _schema(empty_db)
    _fill(empty_db)
    config = migrations.alembic_config(empty_db)
    before = query(empty_db, "SELECT id, status, unique_key, live_key, failed_at, retry_at FROM control_plane.jobs "
                             "ORDER BY id")  # fmt: skip
    # When it goes down to before 0005 (the generated columns) and back
    command.downgrade(config, "0004")
    migrations.upgrade(empty_db)
    # Then the schema is head's, and every job is there with the same generated values
    assert _schema(empty_db) == schema
    after = query(empty_db, "SELECT id, status, unique_key, live_key, failed_at, retry_at FROM control_plane.jobs "
                            "ORDER BY id")  # fmt: skip
    assert after == before
