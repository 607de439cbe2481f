"""Every SQL statement the broker and the mirror run, named, in one place.

Each statement that changes a message also changes its ``control_plane.jobs``
row *in the same statement* (data-modifying CTEs): one round trip, one
transaction, so the broker and the mirror can never disagree, whatever kills a
worker between two statements.

Parameters are psycopg2 ``%(name)s`` placeholders; arrays are passed as Python
lists and unnested server-side so that a batch costs one round trip.
"""

from __future__ import annotations

NOTIFY_CHANNEL = "control_plane_messages"

#: Insert (or re-insert) a batch of messages and their jobs rows, then wake the
#: workers of every queue that received a ready message. The mirror's payload
#: and options are read from the JSON body server-side: the message is encoded
#: once, in Python. Re-enqueueing an existing id is an upsert (dramatiq-pg's rule).
ENQUEUE = """
WITH m AS (
    SELECT t.id, t.queue, t.actor, t.priority,
           coalesce(now() + make_interval(secs => t.delay_ms / 1000.0), t.eta, now()) AS eta, t.body,
           t.max_attempts, t.unique_key, convert_from(t.body, 'UTF8')::jsonb AS doc
    FROM unnest(%(ids)s::uuid[], %(queues)s::text[], %(actors)s::text[], %(priorities)s::int[],
                %(etas)s::timestamptz[], %(delays)s::bigint[], %(bodies)s::bytea[], %(max_attempts)s::int[],
                %(unique_keys)s::text[])
         AS t(id, queue, actor, priority, eta, delay_ms, body, max_attempts, unique_key)
), msg AS (
    INSERT INTO control_plane.messages AS cur (id, queue, actor, priority, eta, body)
    SELECT id, queue, actor, priority, eta, body FROM m
    ON CONFLICT (id) DO UPDATE
       SET queue = excluded.queue, actor = excluded.actor, priority = excluded.priority,
           eta = excluded.eta, body = excluded.body,
           claim_token = NULL, worker = NULL, lease_expires_at = NULL
    RETURNING cur.id, cur.queue, cur.eta
), job AS (
    INSERT INTO control_plane.jobs AS cur (id, type, queue, payload, options, priority, max_attempts,
                                    scheduled_at, unique_key)
    SELECT id, actor, queue,
           jsonb_build_object('args', doc -> 'args', 'kwargs', doc -> 'kwargs'),
           coalesce(doc -> 'options', '{}'::jsonb), priority, max_attempts, eta, unique_key
    FROM m
    ON CONFLICT (id) DO UPDATE
       SET status = 'pending', scheduled_at = excluded.scheduled_at, options = excluded.options,
           completed_at = NULL, updated_at = now()
)
SELECT pg_notify('control_plane_messages', q.queue)
FROM (SELECT DISTINCT queue FROM msg WHERE eta <= now()) AS q
"""

#: Lease up to ``limit`` ready messages of one queue to this worker, in
#: priority-then-eta order, skipping rows other workers hold; mark them running.
CLAIM = """
WITH c AS (
    SELECT id FROM control_plane.messages
    WHERE queue = %(queue)s AND claim_token IS NULL AND eta <= now()
    ORDER BY priority, eta, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), m AS (
    UPDATE control_plane.messages AS m
       SET claim_token = %(token)s, worker = %(worker)s,
           lease_expires_at = now() + make_interval(secs => %(lease)s)
    FROM c WHERE m.id = c.id
    RETURNING m.id, m.priority, m.eta, m.body
), j AS (
    UPDATE control_plane.jobs AS j
       SET status = 'running', attempts = j.attempts + 1, started_at = now(),
           completed_at = NULL, updated_at = now(), worker = %(worker)s
    FROM m WHERE j.id = m.id
)
SELECT id::text, body FROM m ORDER BY priority, eta, id
"""

#: Apply a batch of outcomes: ``ack`` (done), ``nack`` (failed for good) and
#: ``retry`` (back to the queue at now + delay). Fenced by the claim token: a
#: worker that lost its lease changes nothing. Returns the ids applied.
SETTLE = """
WITH a AS (
    SELECT * FROM unnest(%(ids)s::uuid[], %(tokens)s::uuid[], %(kinds)s::text[],
                         %(delays)s::bigint[], %(bodies)s::bytea[], %(errors)s::text[],
                         %(results)s::jsonb[])
         AS t(id, token, kind, delay_ms, body, error, result)
), gone AS (
    DELETE FROM control_plane.messages AS m USING a
    WHERE a.kind <> 'retry' AND m.id = a.id AND m.claim_token = a.token
    RETURNING m.id, NULL::timestamptz AS eta
), back AS (
    UPDATE control_plane.messages AS m
       SET claim_token = NULL, worker = NULL, lease_expires_at = NULL,
           eta = now() + make_interval(secs => a.delay_ms / 1000.0), body = a.body
    FROM a WHERE a.kind = 'retry' AND m.id = a.id AND m.claim_token = a.token
    RETURNING m.id, m.eta
), done AS (
    SELECT id, eta FROM gone UNION ALL SELECT id, eta FROM back
)
UPDATE control_plane.jobs AS j
   SET status = CASE a.kind WHEN 'ack' THEN 'completed' WHEN 'nack' THEN 'failed' ELSE 'pending' END,
       completed_at = CASE WHEN a.kind = 'retry' THEN NULL ELSE now() END,
       scheduled_at = coalesce(done.eta, j.scheduled_at),
       result = CASE WHEN a.kind = 'ack' THEN a.result ELSE j.result END,
       last_error = CASE WHEN a.kind = 'ack' THEN j.last_error ELSE a.error END,
       errors = CASE WHEN a.kind = 'ack' THEN j.errors
                ELSE j.errors || jsonb_build_array(jsonb_build_object(
                         'attempt', j.attempts, 'at', now(), 'error', a.error, 'worker', j.worker))
                END,
       options = CASE WHEN a.kind = 'retry' THEN coalesce(convert_from(a.body, 'UTF8')::jsonb -> 'options',
                                                          j.options)
                 ELSE j.options END,
       updated_at = now()
FROM a JOIN done ON done.id = a.id
WHERE j.id = a.id
RETURNING j.id::text
"""

#: Give back messages this worker holds but will not finish (graceful shutdown,
#: consumer restart). ``started`` false means the message never ran, so the
#: attempt counted at claim time is returned too.
RELEASE = """
WITH a AS (
    SELECT * FROM unnest(%(ids)s::uuid[], %(tokens)s::uuid[], %(started)s::boolean[])
         AS t(id, token, started)
), r AS (
    UPDATE control_plane.messages AS m
       SET claim_token = NULL, worker = NULL, lease_expires_at = NULL
    FROM a WHERE m.id = a.id AND m.claim_token = a.token
    RETURNING m.id, m.queue, m.eta
), j AS (
    UPDATE control_plane.jobs AS j
       SET status = 'pending', updated_at = now(), started_at = NULL,
           attempts = CASE WHEN a.started THEN j.attempts ELSE greatest(j.attempts - 1, 0) END,
           last_error = CASE WHEN a.started THEN 'interrupted: the worker shut down before the job finished'
                        ELSE j.last_error END
    FROM a JOIN r ON r.id = a.id WHERE j.id = a.id
)
SELECT pg_notify('control_plane_messages', q.queue)
FROM (SELECT DISTINCT queue FROM r WHERE eta <= now()) AS q
"""

#: Extend the leases of the claims this worker holds, and record its heartbeat.
HEARTBEAT = """
WITH h AS (
    UPDATE control_plane.messages
       SET lease_expires_at = now() + make_interval(secs => %(lease)s)
    WHERE claim_token = ANY(%(tokens)s::uuid[])
    RETURNING id
)
INSERT INTO control_plane.worker_heartbeats AS w (id, hostname, pid, queues, heartbeat_at)
VALUES (%(worker)s, %(hostname)s, %(pid)s, %(queues)s::text[], now())
ON CONFLICT (id) DO UPDATE
   SET heartbeat_at = now(), queues = excluded.queues
RETURNING (SELECT count(*) FROM h)
"""

#: Put back the messages of workers whose lease expired (killed, machine lost),
#: record why in the mirror, forget workers silent for long, and wake the queues.
REAP = """
WITH r AS (
    SELECT id FROM control_plane.messages
    WHERE claim_token IS NOT NULL AND lease_expires_at < now()
    ORDER BY lease_expires_at
    LIMIT 1000
    FOR UPDATE SKIP LOCKED
), m AS (
    UPDATE control_plane.messages AS m
       SET claim_token = NULL, worker = NULL, lease_expires_at = NULL
    FROM r WHERE m.id = r.id
    RETURNING m.id, m.queue
), j AS (
    UPDATE control_plane.jobs AS j
       SET status = 'pending', updated_at = now(), scheduled_at = now(),
           last_error = 'lease expired: worker ' || coalesce(j.worker, 'unknown')
                        || ' stopped heartbeating (killed or cut off); the job was re-queued',
           errors = j.errors || jsonb_build_array(jsonb_build_object(
                        'attempt', j.attempts, 'at', now(), 'worker', j.worker,
                        'error', 'lease expired: worker ' || coalesce(j.worker, 'unknown')
                                 || ' stopped heartbeating'))
    FROM m WHERE j.id = m.id
), w AS (
    DELETE FROM control_plane.worker_heartbeats
    WHERE heartbeat_at < now() - make_interval(secs => %(forget_after)s)
)
SELECT (SELECT count(*) FROM m),
       (SELECT count(pg_notify('control_plane_messages', q.queue)) FROM (SELECT DISTINCT queue FROM m) AS q)
"""

#: A row whose body cannot be decoded: take it out of the queue and record why.
#: The mirror row may not exist (the row was written by hand), so upsert it.
REJECT_MALFORMED = """
WITH d AS (
    DELETE FROM control_plane.messages WHERE id = %(id)s AND claim_token = %(token)s
    RETURNING id, queue, actor, priority
)
INSERT INTO control_plane.jobs AS j (id, type, queue, status, priority, attempts, max_attempts,
                                     last_error, errors, completed_at)
SELECT id, actor, queue, 'failed', priority, 1, 1, %(error)s,
       jsonb_build_array(jsonb_build_object('attempt', 1, 'at', now(), 'error', %(error)s)), now()
FROM d
ON CONFLICT (id) DO UPDATE
   SET status = 'failed', last_error = excluded.last_error, completed_at = now(), updated_at = now(),
       errors = j.errors || excluded.errors
"""

#: Forget a worker that shut down cleanly.
WORKER_GONE = "DELETE FROM control_plane.worker_heartbeats WHERE id = %(worker)s"

#: The results backend.
RESULT_GET = """
SELECT value FROM control_plane.results WHERE key = %(key)s AND expires_at > now()
"""

RESULT_STORE = """
INSERT INTO control_plane.results (key, value, expires_at)
VALUES (%(key)s, %(value)s, now() + make_interval(secs => %(ttl_ms)s / 1000.0))
ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
"""

#: Forget every message of a queue (Dramatiq's ``flush``); the mirror keeps the history.
FLUSH_QUEUE = """
WITH d AS (DELETE FROM control_plane.messages WHERE queue = ANY(%(queues)s::text[]) RETURNING id)
UPDATE control_plane.jobs AS j
   SET status = 'cancelled', completed_at = now(), updated_at = now(),
       last_error = 'flushed: the queue was emptied'
FROM d WHERE j.id = d.id AND j.status IN ('pending', 'running')
"""

#: Messages still waiting or running in some queues (Dramatiq's ``join``).
COUNT_OUTSTANDING = """
SELECT count(*) FROM control_plane.messages WHERE queue = ANY(%(queues)s::text[])
"""
