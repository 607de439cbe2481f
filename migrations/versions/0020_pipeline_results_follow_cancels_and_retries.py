"""A pipeline's caller hears of a step cancelled while it waited, and not of one retried since.

A pipeline's caller waits on the result of its last message. Since 2026-12-07 a step that
fails for good in a worker, or that the reaper ends, stores its failure there too (the rest
of the pipeline never runs: ``tasks.middleware.canvas``). Two paths are SQL functions:

* ``cancel_job`` of a step that waited (pending, delayed, in backoff) stored a ``Cancelled``
  failure for the step only: the pipeline's caller waited out its timeout. It now stores one
  for the pipeline's last message too, naming the step;
* ``retry_job`` of a failed or cancelled step forgot the step's stale result only: the
  pipeline's caller would have heard the old failure at once while the retried step, and
  the steps after it, ran. It now forgets the pipeline's last result too.

``control_plane.pipeline_end(options)`` finds the last message from a step's options (each
step carries the next one as ``pipe_target``, which carries the one after it). Its result's
key is Dramatiq's, as 0010's: the md5 of ``dramatiq-results:<queue>:<actor>:<id>``.

The functions are edited where they differ (as 0010 did), not rewritten.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-07
"""

from __future__ import annotations

from migrations import create_functions, drop_functions, replace_in_function

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

PIPELINE_END = """
CREATE OR REPLACE FUNCTION control_plane.pipeline_end(options jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    target jsonb := options -> 'pipe_target';
BEGIN
    IF jsonb_typeof(target) IS DISTINCT FROM 'object' THEN
        RETURN NULL;  -- not a pipeline's step, or its last
    END IF;
    WHILE jsonb_typeof(target #> '{options,pipe_target}') = 'object' LOOP
        target := target #> '{options,pipe_target}';
    END LOOP;
    RETURN target;
END
$$
"""

COMMENTS = {
    "pipeline_end(jsonb)": "The last message (as Message.asdict() encodes it) of the pipeline whose step has "
    "these options; NULL for a message that is no step, or the last.",
}

#: The key of the result of the pipeline's last message ``e`` (a ``pipeline_end``).
END_KEY = (
    "md5('dramatiq-results:' || (e ->> 'queue_name') || ':' || (e ->> 'actor_name') || ':' || (e ->> 'message_id'))"
)

RETRY_BEFORE = """    DELETE FROM control_plane.results AS r
     WHERE r.key = md5('dramatiq-results:' || job.queue || ':' || job.type || ':' || job.id::text);"""
RETRY_AFTER = f"""    DELETE FROM control_plane.results AS r
     WHERE r.key = md5('dramatiq-results:' || job.queue || ':' || job.type || ':' || job.id::text)
        -- and the failure it told its pipeline's caller, whose steps run again from this one
        OR r.key = (SELECT {END_KEY} FROM control_plane.pipeline_end(job.options) AS e);"""

CANCEL_BEFORE = """          FROM control_plane.jobs AS j WHERE j.id = cancel_job.id
        ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at;
        RETURN 'cancelled';"""
CANCEL_AFTER = f"""          FROM control_plane.jobs AS j WHERE j.id = cancel_job.id
        ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at;
        -- and so does the caller of the pipeline it is a step of, which stops here
        INSERT INTO control_plane.results AS r (key, value, expires_at)
        SELECT {END_KEY},
               convert_to(jsonb_build_object('__t', 'dramatiq.results.Result', 'exn', jsonb_build_object(
                   'type', 'Cancelled',
                   'msg', 'the pipeline stopped at ' || j.type || ' (job ' || j.id::text
                          || '): cancelled by operator while it waited'))::text, 'UTF8'),
               now() + make_interval(secs => (CASE WHEN e #>> '{{options,result_ttl}}' ~ '^[0-9]{{1,15}}$'
                                                   THEN (e #>> '{{options,result_ttl}}')::bigint
                                                   ELSE 86400000 END) / 1000.0)
          FROM control_plane.jobs AS j, control_plane.pipeline_end(j.options) AS e
         WHERE j.id = cancel_job.id AND {END_KEY} IS NOT NULL
        ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at;
        RETURN 'cancelled';"""


def upgrade() -> None:
    create_functions([PIPELINE_END], COMMENTS)
    replace_in_function("retry_job(uuid)", RETRY_BEFORE, RETRY_AFTER)
    replace_in_function("cancel_job(uuid)", CANCEL_BEFORE, CANCEL_AFTER)


def downgrade() -> None:
    replace_in_function("cancel_job(uuid)", CANCEL_AFTER, CANCEL_BEFORE)
    replace_in_function("retry_job(uuid)", RETRY_AFTER, RETRY_BEFORE)
    drop_functions(list(COMMENTS))
