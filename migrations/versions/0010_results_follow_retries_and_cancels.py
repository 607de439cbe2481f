"""``retry_job`` forgets the stale result; ``cancel_job`` of a waiting job stores a Cancelled failure.

Both functions (migration 0003) left ``control_plane.results`` as it was:

* a failed job put back in its queue kept its failure there, so a caller's
  ``get_result(block=True)`` raised the old failure at once, while the job was
  pending again, instead of waiting for the new attempt;
* a job cancelled while it waited (pending, delayed or in backoff) stored
  nothing, so a caller waited out its whole timeout; a job cancelled while it
  ran stores ``Cancelled`` (its worker's Results middleware does).

The result's key is Dramatiq's: the md5 of ``dramatiq-results:<queue>:<actor>:<id>``
(``ResultBackend.build_message_key`` with the namespace ``tasks`` uses). The
Cancelled failure lives for the message's ``result_ttl`` option, else a day
(``CONTROLPLANE_RESULT_TTL_MS``'s default; SQL cannot see the workers' setting).

The functions are edited where they differ (as 0007 did), not rewritten.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from migrations import replace_in_function

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

RESULT_KEY = "md5('dramatiq-results:' || {queue} || ':' || {actor} || ':' || {id}::text)"

RETRY_BEFORE = """    PERFORM pg_notify('control_plane_messages', job.queue);
    RETURN true;"""
RETRY_AFTER = f"""    -- the failure (or cancel) stored for the attempt before is stale: a caller waits for this one
    DELETE FROM control_plane.results AS r
     WHERE r.key = {RESULT_KEY.format(queue="job.queue", actor="job.type", id="job.id")};
{RETRY_BEFORE}"""

CANCEL_BEFORE = """         WHERE j.id = cancel_job.id;
        RETURN 'cancelled';"""
CANCEL_AFTER = f"""         WHERE j.id = cancel_job.id;
        -- its caller hears it, as from a job cancelled while it ran
        INSERT INTO control_plane.results AS r (key, value, expires_at)
        SELECT {RESULT_KEY.format(queue="j.queue", actor="j.type", id="j.id")},
               convert_to(jsonb_build_object('__t', 'dramatiq.results.Result', 'exn', jsonb_build_object(
                   'type', 'Cancelled', 'msg', 'cancelled by operator while it waited'))::text, 'UTF8'),
               now() + make_interval(secs => (CASE WHEN j.options ->> 'result_ttl' ~ '^[0-9]{{1,15}}$'
                                                   THEN (j.options ->> 'result_ttl')::bigint
                                                   ELSE 86400000 END) / 1000.0)
          FROM control_plane.jobs AS j WHERE j.id = cancel_job.id
        ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at;
        RETURN 'cancelled';"""


def upgrade() -> None:
    replace_in_function("retry_job(uuid)", RETRY_BEFORE, RETRY_AFTER)
    replace_in_function("cancel_job(uuid)", CANCEL_BEFORE, CANCEL_AFTER)


def downgrade() -> None:
    replace_in_function("retry_job(uuid)", RETRY_AFTER, RETRY_BEFORE)
    replace_in_function("cancel_job(uuid)", CANCEL_AFTER, CANCEL_BEFORE)
