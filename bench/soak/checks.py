"""The soak's verdict: what the producers sent against what the database and the services say.

Everything is computed from SQL on the soak database (the producers' ledger is loaded into
``soak.sent`` first, the actors wrote ``soak.runs``), the server's catalogs, the stand-in
services' tenant stores and the files the workers wrote. See ``docs/reliability.md`` for
what each row means.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extras
from psycopg2 import sql

from bench.soak.producers import Sent
from tasks.redaction import SECRET_PATTERN
from tests.support import disagreements

#: The must-be-zero rows (the soak fails if one of them is not zero).
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

#: Per message the producers sent: its job (if any), its executions, and a flag per check.
SENT_VIEW = """
CREATE TEMP TABLE outcome AS
WITH base AS (
    SELECT s.id, s.kind, s.fate, s.delay_ms, s.resent, s.holder,
           s.fate IN ('committed', 'in_doubt_committed') AS committed,
           j.id IS NOT NULL AS has_job, j.status, j.last_error, coalesce(j.errors::text, '') AS errors,
           j.created_at, j.attempts,
           coalesce(r.ok, 0) AS ok_runs, coalesce(r.fail, 0) AS fail_runs, r.first_at
    FROM soak.sent AS s
    LEFT JOIN control_plane.jobs AS j ON j.id = s.id
    LEFT JOIN (SELECT message_id, count(*) FILTER (WHERE outcome = 'ok') AS ok,
                      count(*) FILTER (WHERE outcome = 'fail') AS fail, min(at) AS first_at
               FROM soak.runs GROUP BY message_id) AS r ON r.message_id = s.id
)
SELECT base.*,
       -- committed, but no job, or a finished job that never ran (or never ran to its end)
       coalesce(committed AND (NOT has_job
                               OR (kind <> 'provision' AND status IN ('completed', 'failed')
                                   AND ok_runs + fail_runs = 0)
                               OR (kind <> 'provision' AND status = 'completed' AND ok_runs = 0)), false) AS lost,
       -- a job meant to succeed that failed or was cancelled, or a permanent failure that did not fail
       coalesce(committed AND has_job AND ((kind <> 'permanent' AND status IN ('failed', 'cancelled'))
                                           OR (kind = 'permanent' AND status IN ('completed', 'cancelled'))),
                false) AS wrong,
       -- never committed, yet it became a job or ran
       coalesce(fate IN ('rolled_back', 'in_doubt_absent') AND (has_job OR ok_runs + fail_runs > 0), false) AS ran,
       coalesce(committed AND kind = 'delayed'
                AND first_at < created_at + make_interval(secs => delay_ms / 1000.0), false) AS early,
       coalesce(committed AND ok_runs > 1, false) AS twice
FROM base
"""


def _rows(cur: Any, query: str, params: Any = None) -> list[dict[str, Any]]:
    cur.execute(query, params)
    return [dict(r) for r in cur.fetchall()] if cur.description else []


def _count(cur: Any, query: str, params: Any = None) -> int:
    cur.execute(query, params)
    row = cur.fetchone()
    return int(next(iter(row.values())) if isinstance(row, dict) else row[0])


def load_ledger(conn: Any, sent: Iterable[Sent]) -> None:
    """COPY the producers' ledger into ``soak.sent``; resolve the in-doubt sends by looking."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for s in sent:
        writer.writerow([s.id, s.kind, s.fate, s.producer, "" if s.delay_ms is None else s.delay_ms, s.resent,
                         s.holder or ""])
    buffer.seek(0)
    with conn.cursor() as cur:
        cur.copy_expert(
            "COPY soak.sent (id, kind, fate, producer, delay_ms, resent, holder) FROM STDIN "
            "WITH (FORMAT csv, NULL '')",
            buffer,
        )
        # An in-doubt send (its COMMIT's answer was lost) committed if and only if its job exists.
        cur.execute(
            "UPDATE soak.sent AS s SET fate = CASE WHEN EXISTS (SELECT 1 FROM control_plane.jobs j WHERE j.id = s.id) "
            "THEN 'in_doubt_committed' ELSE 'in_doubt_absent' END WHERE fate = 'in_doubt'"
        )
    conn.commit()


@dataclass
class ProjectFacts:
    """What exists for the soak's projects, everywhere they can leave traces."""

    projects: dict[str, str]
    databases: set[str]
    roles: set[str]
    registrations: dict[str, set[str]]
    key_counts: dict[str, int]


def project_facts(cur: Any, run_id: str, tenants: dict[str, set[str]]) -> ProjectFacts:
    like = run_id + r"\_%"
    projects = {r["project_id"]: r["status"] for r in _rows(
        cur, "SELECT project_id, status FROM control_plane.projects WHERE project_id LIKE %s", (like,))}
    databases = {r["datname"][2:] for r in _rows(
        cur, "SELECT datname FROM pg_database WHERE datname LIKE %s", ("p\\_" + like,))}
    roles = {r["rolname"] for r in _rows(cur, "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", ("p\\_" + like,))}
    key_counts = {r["project_id"]: int(r["n"]) for r in _rows(
        cur, "SELECT project_id, count(*) AS n FROM control_plane.api_keys WHERE project_id LIKE %s "
             "AND revoked_at IS NULL GROUP BY project_id", (like,))}
    registrations = {name: {t for t in ids if t.startswith(run_id + "_")} for name, ids in tenants.items()}
    return ProjectFacts(projects, databases, roles, registrations, key_counts)


def _role_project(role: str) -> str:
    base = role[2:]
    for suffix in ("_owner", "_app"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def orphan_report(facts: ProjectFacts, api_key_count: int) -> dict[str, list[str]]:
    """Resources of projects that are not active, and active projects missing a resource."""
    active = {p for p, status in facts.projects.items() if status == "active"}
    found: dict[str, list[str]] = {
        "databases": sorted(d for d in facts.databases if d not in active),
        "roles": sorted(r for r in facts.roles if _role_project(r) not in active),
        "registrations": sorted(f"{name}:{t}" for name, ids in facts.registrations.items()
                                for t in ids if t not in active),
        "incomplete_active": [],
    }
    for project in sorted(active):
        missing = []
        if project not in facts.databases:
            missing.append("database")
        for suffix in ("_owner", "_app"):
            if f"p_{project}{suffix}" not in facts.roles:
                missing.append("role" + suffix)
        missing += [f"registration:{name}" for name, ids in facts.registrations.items() if project not in ids]
        if facts.key_counts.get(project, 0) != api_key_count:
            missing.append(f"api_keys({facts.key_counts.get(project, 0)})")
        if missing:
            found["incomplete_active"].append(f"{project}: {', '.join(missing)}")
    return found


# -- secrets ------------------------------------------------------------------------------------

_SCRAM = re.compile(r"SCRAM-SHA-256\$")


def table_texts(conn: Any) -> Iterator[tuple[str, str]]:
    """Every row of every control_plane table as text (bytea decoded as escaped text)."""
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        yield from _table_texts(cur)


def _table_texts(cur: Any) -> Iterator[tuple[str, str]]:
    tables = [r["table_name"] for r in _rows(
        cur, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'control_plane' "
             "AND table_type = 'BASE TABLE' ORDER BY table_name")]
    for table in tables:
        columns = _rows(cur, "SELECT column_name, data_type FROM information_schema.columns "
                             "WHERE table_schema = 'control_plane' AND table_name = %s ORDER BY ordinal_position",
                        (table,))
        parts = [
            sql.SQL("coalesce(encode({}, 'escape'), '')").format(sql.Identifier(c["column_name"]))
            if c["data_type"] == "bytea"
            else sql.SQL("coalesce({}::text, '')").format(sql.Identifier(c["column_name"]))
            for c in columns
        ]
        query = sql.SQL("SELECT concat_ws(E'\\t', {}) FROM control_plane.{}").format(
            sql.SQL(", ").join(parts), sql.Identifier(table))
        with cur.connection.cursor(name=f"scan_{table}") as named:
            named.itersize = 5000
            named.execute(query)
            for (text,) in named:
                yield f"control_plane.{table}", text


def scan(sources: Iterable[tuple[str, str]], known: dict[str, str]) -> dict[str, dict[str, int]]:
    """Count, per source, matches of the API-key pattern, SCRAM verifiers and each known secret.

    ``sources`` yields (where, text) pairs; texts of one source are searched in blocks of
    about a megabyte, so that a table of 100,000 rows costs a few regex passes, not 100,000.
    """
    secrets = {secret: label for label, secret in known.items() if secret}
    known_re = re.compile("|".join(re.escape(s) for s in sorted(secrets, key=len, reverse=True))) if secrets else None
    hits: dict[str, dict[str, int]] = {}

    def search(where: str, text: str) -> None:
        found: dict[str, int] = {}
        for label, pattern in (("api key pattern", SECRET_PATTERN), ("SCRAM-SHA-256$", _SCRAM)):
            n = len(pattern.findall(text))
            if n:
                found[label] = n
        if known_re is not None:
            for match in known_re.finditer(text):
                label = secrets[match.group(0)]
                found[label] = found.get(label, 0) + 1
        for label, n in found.items():
            hits.setdefault(where, {})
            hits[where][label] = hits[where].get(label, 0) + n

    block: list[str] = []
    size = 0
    current = None
    for where, text in sources:
        if where != current or size > 1 << 20:
            if block and current is not None:
                search(current, "\n".join(block))
            block, size, current = [], 0, where
        block.append(text)
        size += len(text)
    if block and current is not None:
        search(current, "\n".join(block))
    return hits


def file_texts(paths: Iterable[Path], label: str) -> Iterator[tuple[str, str]]:
    for path in paths:
        if path.exists():
            yield f"{label} {path.name}", path.read_text(errors="replace")


# -- the verdict --------------------------------------------------------------------------------


def analyse(
    conn: Any,
    *,
    url: str,
    run_id: str,
    tenants: dict[str, set[str]],
    api_key_count: int,
    rolled_back_projects: list[str],
    committed_projects: list[str],
) -> dict[str, Any]:
    """Every count of the result table except memory and secrets, with evidence samples."""
    out: dict[str, Any] = {}
    with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
        cur.execute(SENT_VIEW)
        cur.execute("CREATE INDEX ON outcome (id)")
        fates = {r["fate"]: int(r["n"]) for r in _rows(cur, "SELECT fate, count(*) AS n FROM outcome GROUP BY fate")}
        out["sent"] = sum(fates.values())
        out["fates"] = fates
        out["by_kind"] = _rows(
            cur,
            "SELECT kind, count(*) FILTER (WHERE committed) AS committed, "
            "count(*) FILTER (WHERE committed AND status = 'completed') AS completed, "
            "count(*) FILTER (WHERE committed AND status = 'failed') AS failed, "
            "count(*) FILTER (WHERE fate = 'rolled_back') AS rolled_back, "
            "count(*) FILTER (WHERE fate = 'deduplicated') AS deduplicated "
            "FROM outcome GROUP BY kind ORDER BY kind",
        )
        out["committed"] = _count(cur, "SELECT count(*) FROM outcome WHERE committed")
        out["completed"] = _count(cur, "SELECT count(*) FROM outcome WHERE committed AND status = 'completed'")
        out["failed_as_designed"] = _count(
            cur,
            "SELECT count(*) FROM outcome WHERE committed AND kind = 'permanent' AND status = 'failed' "
            "AND last_error LIKE 'PermanentError:%%'",
        )
        out["lost"] = _count(cur, "SELECT count(*) FROM outcome WHERE lost")
        out["lost_sample"] = _rows(cur, "SELECT id::text, kind, fate, status FROM outcome WHERE lost LIMIT 20")
        out["failed_not_by_design"] = _count(cur, "SELECT count(*) FROM outcome WHERE wrong")
        out["failed_not_by_design_sample"] = _rows(
            cur, "SELECT id::text, kind, status, attempts, last_error FROM outcome WHERE wrong LIMIT 20")
        ran = _count(cur, "SELECT count(*) FROM outcome WHERE ran")
        out["ran_from_rolled_back_sample"] = _rows(
            cur, "SELECT id::text, kind, fate, status, ok_runs, fail_runs FROM outcome WHERE ran LIMIT 20")
        out["rolled_back"] = fates.get("rolled_back", 0)
        # a rolled-back provision_project must have left nothing: no project row, database, role or tenant
        facts = project_facts(cur, run_id, tenants)
        traces = []
        for project in rolled_back_projects:
            where = [w for w, present in (
                ("projects", project in facts.projects),
                ("database", project in facts.databases),
                ("roles", any(_role_project(r) == project for r in facts.roles)),
                ("registrations", any(project in ids for ids in facts.registrations.values())),
            ) if present]
            if where:
                traces.append(f"{project}: {', '.join(where)}")
        out["rolled_back_provision_traces"] = traces
        out["ran_from_rolled_back"] = ran + len(traces)

        # at-least-once: a job whose effect was recorded more than once, and why it ran again
        twice = _rows(cur, "SELECT kind, ok_runs, resent, errors FROM outcome WHERE twice")
        causes: dict[str, int] = {}
        for row in twice:
            errors = row["errors"]
            if "lease expired" in errors:
                cause = "lease expired (worker killed, cut off or stalled after the effect)"
            elif "interrupted" in errors:
                cause = "worker shut down (SIGTERM) after the effect"
            elif row["resent"]:
                cause = "producer re-sent after a lost connection"
            elif any(name in errors for name in ("OperationalError", "InterfaceError", "ConnectionClosed")):
                # (not the transient kind's designed "ConnectionError: soak: ..." failures)
                cause = "the effect's answer was lost with its connection; the attempt failed and was retried"
            else:
                cause = "no trace in the job's history (unexplained: investigate)"
            causes[cause] = causes.get(cause, 0) + 1
        out["completed_twice"] = len(twice)
        out["completed_twice_extra_runs"] = sum(int(r["ok_runs"]) - 1 for r in twice)
        out["completed_twice_causes"] = causes
        out["completed_twice_sample"] = _rows(
            cur,
            "SELECT id::text, kind, ok_runs, attempts, resent, errors FROM outcome WHERE twice ORDER BY id LIMIT 5",
        )

        out["delayed_ran_early"] = _count(cur, "SELECT count(*) FROM outcome WHERE early")
        out["delayed_ran_early_sample"] = _rows(
            cur, "SELECT id::text, delay_ms, created_at::text, first_at::text FROM outcome WHERE early LIMIT 10")
        out["delayed_checked"] = _count(
            cur, "SELECT count(*) FROM outcome WHERE committed AND kind = 'delayed' AND first_at IS NOT NULL")

        out["deduplicated"] = fates.get("deduplicated", 0)
        # A unique send returns the live holder of its key: a committed job, or one sent earlier in
        # the same transaction (gone if that transaction rolled back). Anything else is a phantom.
        out["deduplicated_to_own_rolled_back"] = _count(
            cur,
            "SELECT count(*) FROM outcome o WHERE fate = 'deduplicated' AND EXISTS "
            "(SELECT 1 FROM soak.sent s WHERE s.id = o.holder AND s.fate IN ('rolled_back', 'in_doubt_absent'))",
        )
        out["deduplicated_to_phantom"] = _count(
            cur,
            "SELECT count(*) FROM outcome o WHERE fate = 'deduplicated' "
            "AND NOT EXISTS (SELECT 1 FROM control_plane.jobs j WHERE j.id = o.holder) "
            "AND NOT EXISTS (SELECT 1 FROM soak.sent s WHERE s.id = o.holder "
            "                AND s.fate IN ('rolled_back', 'in_doubt_absent'))",
        )

        # left running or stuck: anything still waiting, running or half-done
        stuck_jobs = _rows(
            cur,
            "SELECT status, type, count(*) AS n FROM control_plane.jobs WHERE status IN ('pending', 'running') "
            "GROUP BY status, type ORDER BY status, type",
        )
        messages_left = _count(cur, "SELECT count(*) FROM control_plane.messages")
        stuck_projects = {p: s for p, s in facts.projects.items() if s != "active"}
        out["stuck_jobs"] = stuck_jobs
        out["messages_left"] = messages_left
        out["stuck_projects"] = stuck_projects
        out["stuck"] = sum(int(r["n"]) for r in stuck_jobs) + messages_left + len(stuck_projects)
        out["stuck_sample"] = _rows(
            cur,
            "SELECT id::text, type, status, attempts, worker, last_error FROM control_plane.jobs "
            "WHERE status IN ('pending', 'running') ORDER BY updated_at LIMIT 10",
        )

        # the same full outer join as every end-to-end test (tests/support.py)
        rows = disagreements(url)
        out["disagreements"] = len(rows)
        out["disagreements_sample"] = rows[:20]

        orphans = orphan_report(facts, api_key_count)
        out["orphans_detail"] = orphans
        out["orphans"] = sum(len(v) for v in orphans.values())
        active = sorted(p for p, s in facts.projects.items() if s == "active")
        out["projects"] = {
            "committed": len(committed_projects),
            "active": len([p for p in committed_projects if p in active]),
            "rolled_back": len(rolled_back_projects),
            "databases": len(facts.databases),
            "roles": len(facts.roles),
            "registrations": {name: len(ids) for name, ids in facts.registrations.items()},
        }
        out["active_projects"] = active
        out["provision_entry_failed"] = _rows(
            cur,
            "SELECT id::text, status, last_error FROM outcome WHERE committed AND kind = 'provision' "
            "AND status <> 'completed'",
        )
        out["provision_steps"] = _rows(
            cur,
            "SELECT type, count(*) AS jobs, sum(attempts) AS attempts, count(*) FILTER (WHERE status = 'failed') "
            "AS failed FROM control_plane.jobs WHERE type LIKE 'provision\\_project%%' GROUP BY type ORDER BY type",
        )
        # provision_project's chain should "neither skip nor fork" (docs/provisioning.md): a step of a
        # project that exists as more than one job is a fork; keep the evidence (every step job of
        # such a project, in order)
        forks = _rows(
            cur,
            "SELECT payload #>> '{args,0}' AS project_id, type, count(*) AS jobs, "
            "array_agg(id::text ORDER BY created_at) AS ids FROM control_plane.jobs "
            "WHERE type LIKE 'provision\\_project.%%' "
            "AND type NOT IN ('provision_project.compensate', 'provision_project.compensation_failed') "
            "GROUP BY 1, 2 HAVING count(*) > 1 ORDER BY 1, 2",
        )
        out["provision_forks"] = forks
        out["provision_fork_evidence"] = _rows(
            cur,
            "SELECT payload #>> '{args,0}' AS project_id, type, id::text, status, attempts, "
            "created_at::text, started_at::text, completed_at::text, worker, result::text, errors::text "
            "FROM control_plane.jobs WHERE type LIKE 'provision\\_project.%%' "
            "AND payload #>> '{args,0}' = ANY(%s) ORDER BY 1, created_at",
            (sorted({f["project_id"] for f in forks})[:3],),
        )
        out["attempt_errors"] = _rows(
            cur,
            "SELECT substring(e ->> 'error' from '^[^:(]*') AS error, count(*) AS n "
            "FROM control_plane.jobs, jsonb_array_elements(errors) AS e GROUP BY 1 ORDER BY 2 DESC LIMIT 15",
        )
        out["executions"] = _count(cur, "SELECT count(*) FROM soak.runs")
    conn.commit()
    return out
