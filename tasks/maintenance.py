"""Built-in periodic tasks: retention.

``controlplane.prune`` runs daily (``CONTROLPLANE_PRUNE_SCHEDULE``, default
``0 3 * * *`` UTC) on the ``controlplane`` queue: it deletes what
``control_plane.prune_jobs(CONTROLPLANE_RETENTION_COMPLETED,
CONTROLPLANE_RETENTION_FAILED)`` would (completed and cancelled jobs after 7 days,
failed ones after 30 by default, and expired results), in batches, forgets schedule ticks
older than the completed retention (each schedule's latest is kept) and
deletes expired rate-limit counters.

``controlplane clock`` always loads this module; a worker runs the job when it
loads it too: ``dramatiq tasks tasks.maintenance your.module`` (the Procfile's
``worker:`` line does).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import dramatiq
import psycopg2

import tasks
from models import queries
from tasks.db import is_transient, loggable_error
from tasks.errors import PermanentError
from tasks.periodic import schedule

#: The queue of the built-in maintenance jobs.
QUEUE = "controlplane"


@dramatiq.actor(
    actor_name="controlplane.prune",
    queue_name=QUEUE,
    max_attempts=3,
    # One prune at a time: a second send while one is pending or running returns it.
    unique_key_from=lambda args, kwargs: "controlplane.prune",
)
def prune() -> dict[str, int]:
    """Delete what the retention settings say is old; returns how many rows of each kind went."""
    settings = tasks.settings
    try:
        with tasks.connection() as conn, conn.cursor() as cur:
            return prune_rows(cur, settings.retention_completed, settings.retention_failed)
    except psycopg2.DataError as exc:  # a retention setting is not an interval: retrying cannot help
        raise PermanentError(f"CONTROLPLANE_RETENTION_*: {str(exc).strip().splitlines()[0]}") from exc


logger = logging.getLogger(__name__)

#: Tries of one batch that the server rolled back to break a deadlock: a batch's DELETE locks
#: its rows in table order, a send re-sending finished jobs under their ids (a pipeline run
#: again) in its own order, and the prune was the one rolled back (8 of 8 in a review).
BATCH_TRIES = 5


def _execute(cur: Any, statement: str, params: dict[str, Any] | None = None) -> None:
    """``statement``, again after a deadlock (a batch is its own transaction: nothing half done)."""
    for attempt in range(1, BATCH_TRIES + 1):
        try:
            cur.execute(statement, params)
            return
        except psycopg2.Error as exc:
            if not is_transient(exc) or attempt == BATCH_TRIES:
                raise
            logger.info("prune: a batch was rolled back (%s); trying it again", loggable_error(exc))
            time.sleep(0.05 * attempt)


def prune_rows(cur: Any, completed: str, failed: str) -> dict[str, int]:
    """Delete finished jobs past ``completed``/``failed`` (PostgreSQL intervals) and expired results,
    schedule ticks past ``completed`` (each schedule's latest kept) and expired rate-limit
    counters; how many rows of each kind went. The daily task's work, and ``controlplane prune``'s.

    Jobs and results go ``queries.PRUNE_BATCH`` rows per statement, and ticks one schedule's per
    statement, each its own transaction on an autocommit connection (the pool's and the CLI's
    are), so that a large history never holds one snapshot open for long; what one run deleted
    stays deleted if it is cut short.
    """
    if not cur.connection.autocommit:
        # One open transaction would hold every batch's snapshot and locks until the caller commits.
        raise ValueError("prune_rows needs a cursor of an autocommit connection: each batch commits on its own")
    jobs = results = 0
    after_at: str | None = None
    while True:
        _execute(cur, queries.PRUNE_JOBS_BATCH, {"completed": completed, "failed": failed, "after_at": after_at})
        gone, seen, after_at = cur.fetchone()
        jobs += int(gone)
        if seen < queries.PRUNE_BATCH:
            break
    while True:
        _execute(cur, queries.PRUNE_RESULTS_BATCH)
        results += cur.rowcount
        if cur.rowcount < queries.PRUNE_BATCH:
            break
    ticks, after = 0, None
    while True:
        _execute(cur, queries.PRUNE_SCHEDULE_TICKS_OF_NEXT, {"older_than": completed, "after": after})
        after, gone = cur.fetchone()
        if after is None:
            break
        ticks += int(gone)
    _execute(cur, queries.RATE_LIMIT_SWEEP)
    return {"jobs_and_results": jobs + results, "jobs": jobs, "results": results, "schedule_ticks": int(ticks),
            "rate_limits": int(cur.rowcount)}


if tasks.settings.prune_schedule is not None:
    schedule(tasks.settings.prune_schedule, prune, name="controlplane.prune")

__all__ = ["QUEUE", "prune", "prune_rows"]
