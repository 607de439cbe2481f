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

#: What the ``integer`` columns a send writes (priority, max_attempts) hold.
INT_RANGE = range(-(2**31), 2**31)
#: The longest delay or time to live, 100 years in milliseconds (``tasks.settings.MAX_DELAY_MS``
#: says why): a result kept longer is kept that long.
MAX_DELAY_MS = 100 * 365 * 24 * 3600 * 1000


def _expires_in(ttl_ms: str) -> str:
    """SQL for ``now()`` plus ``ttl_ms`` milliseconds (an SQL expression), at most MAX_DELAY_MS."""
    return f"now() + make_interval(secs => least({ttl_ms}, {MAX_DELAY_MS}) / 1000.0)"


def _status_after(kind: str) -> str:
    """SQL for the status a jobs row shows once an outcome of ``kind`` (an SQL expression:
    ack, nack, cancel, start, retry) is written: SETTLE writes it, RESULT_STORE checks it."""
    return (f"CASE {kind} WHEN 'ack' THEN 'completed' WHEN 'nack' THEN 'failed' "
            "WHEN 'cancel' THEN 'cancelled' WHEN 'start' THEN 'running' ELSE 'pending' END")


# -- ENQUEUE's parts that its keyless twin shares (one copy of the upsert rules) --

#: A jobs row's values, read from the message's JSON body (``doc``) in CTE ``m``.
_JOB_VALUES = """id, actor, queue,
           jsonb_build_object('args', doc -> 'args', 'kwargs', doc -> 'kwargs'),
           coalesce(doc -> 'options', '{}'::jsonb), priority, max_attempts, eta"""

#: Re-enqueueing an id that already has a job makes that job pending again, in
#: the queue, under the actor and at the priority of the message (as
#: _MESSAGE_AGAIN does for the message).
_JOB_AGAIN = """ON CONFLICT (id) DO UPDATE
       SET status = 'pending', scheduled_at = excluded.scheduled_at, options = excluded.options,
           queue = excluded.queue, type = excluded.type, priority = excluded.priority,
           completed_at = NULL, updated_at = now(),
           -- a finished job sent again starts its attempts afresh, as retry_job's (migration 0014)
           attempts_before_retry = CASE WHEN cur.status IN ('completed', 'failed', 'cancelled')
                                        THEN cur.attempts ELSE cur.attempts_before_retry END"""

#: The message rows, from CTE ``m``; re-enqueueing an id puts its message back in the queue.
#: Sent at the statement's time, not the transaction's (``now()``): inside ``enqueue_in`` a
#: transaction open for a while made a job old at its send, and ``max_age`` (the claim's age)
#: skipped it unrun.
_MESSAGES_FROM_M = """INSERT INTO control_plane.messages AS cur (id, queue, actor, priority, eta, body, enqueued_at)
    SELECT id, queue, actor, priority, eta, body, statement_timestamp() FROM m"""
_MESSAGE_AGAIN = """ON CONFLICT (id) DO UPDATE
       SET queue = excluded.queue, actor = excluded.actor, priority = excluded.priority,
           eta = excluded.eta, body = excluded.body,
           claim_token = NULL, worker = NULL, lease_expires_at = NULL, cancel_requested_at = NULL
    RETURNING cur.id, cur.queue, cur.eta"""

#: A message's priority and attempts in CTE ``m``: as the sender gave them (its message's
#: options, its own declaration of the actor), else as the actor's workers declared it
#: (``control_plane.actor_defaults``, migration 0015: a send by name of an actor the sender
#: does not declare), else 0 and the sender's default. (COALESCE reads the table only then.)
_PRIORITY = """coalesce(t.priority,
                    (SELECT d.priority FROM control_plane.actor_defaults AS d WHERE d.actor = t.actor), 0)"""
_MAX_ATTEMPTS = """coalesce(t.max_attempts,
                    (SELECT d.max_attempts FROM control_plane.actor_defaults AS d WHERE d.actor = t.actor),
                    %(default_attempts)s::int)"""

#: What a worker's consumer records of its queue's actors when it starts (see _PRIORITY);
#: in the actors' order, so that workers starting together lock the rows in one order.
DECLARE_ACTORS = """
INSERT INTO control_plane.actor_defaults AS d (actor, queue, priority, max_attempts)
SELECT * FROM unnest(%(actors)s::text[], %(queues)s::text[], %(priorities)s::int[], %(max_attempts)s::int[])
ORDER BY 1
ON CONFLICT (actor) DO UPDATE
   SET queue = excluded.queue, priority = excluded.priority, max_attempts = excluded.max_attempts,
       declared_at = now()
WHERE (d.queue, d.priority, d.max_attempts) IS DISTINCT FROM (excluded.queue, excluded.priority, excluded.max_attempts)
"""

#: ... and how long their results live (migration 0021), read where SQL stores a result without
#: a worker's Results middleware (``cancel_job``, STORE_REAPED_RESULTS): each actor's
#: ``result_ttl`` option, else the worker's ``CONTROLPLANE_RESULT_TTL_MS``. A statement of its
#: own, after DECLARE_ACTORS: a schema before 0021 refuses it (no such column), and the
#: priorities and attempts are recorded all the same.
DECLARE_RESULT_TTLS = """
UPDATE control_plane.actor_defaults AS d SET result_ttl_ms = t.ttl
FROM unnest(%(actors)s::text[], %(result_ttls)s::bigint[]) AS t(actor, ttl)
WHERE d.actor = t.actor AND d.result_ttl_ms IS DISTINCT FROM t.ttl
"""

#: Advisory lock classes (the first key; the second is ``hashtext(queue)``) of the
#: wake-up protocol: a send NOTIFYs a queue only when a consumer of it is waiting.
#: PostgreSQL serializes the commits of notifying transactions (one lock, held
#: through the WAL flush), so a NOTIFY per send caps concurrent senders
#: (``python -m bench.notify_cost``). A consumer whose last claim came back short
#: holds WAITING_LOCK shared until a claim comes back full; a send holds
#: SENDING_LOCK shared until it commits, and NOTIFYs when WAITING_LOCK is held.
#: A consumer starting to wait takes SENDING_LOCK exclusive for a moment after
#: WAITING_LOCK (ARM_WAIT), so every send either saw it waiting or committed before
#: its next claim, which then sees the message: no wake-up is lost.
SENDING_LOCK = 1668284417
WAITING_LOCK = 1668284418

#: Wake each queue that got a ready message in CTE ``msg`` (a count, to return
#: one value), if a consumer of it waits, or always when ``always_wake`` (a send
#: in the caller's transaction, which must not hold SENDING_LOCK until its commit).
_NOTIFY_READY = f"""count(pg_notify('control_plane_messages', q.queue))
        FROM (SELECT DISTINCT queue FROM msg WHERE eta <= statement_timestamp() ORDER BY queue) AS q
        WHERE CASE WHEN %(always_wake)s::boolean THEN true
                   -- first (CASE keeps the order): a consumer about to wait lets this commit first
                   WHEN pg_advisory_xact_lock_shared({SENDING_LOCK}, hashtext(q.queue))::text IS NULL THEN true
                   -- then: if no consumer holds the waiting lock, none needs waking
                   WHEN pg_try_advisory_lock({WAITING_LOCK}, hashtext(q.queue))
                        THEN NOT pg_advisory_unlock({WAITING_LOCK}, hashtext(q.queue))
                   ELSE true END"""  # noqa: S608 (module constants only, no input)

#: How long a consumer starting to wait lets the sends in flight take to commit
#: (a send held up by a row lock or a synchronous standby); past it, the ones
#: still in flight are found by its next poll. Sends wait behind it meanwhile.
ARM_WAIT_TIMEOUT_MS = 200

#: A consumer starts waiting for NOTIFYs on ``queue``: it holds WAITING_LOCK, and
#: lets the sends in flight (which may not have seen it) commit; its next claim
#: sees their messages. One round trip; the session lock stays held if the
#: wait for SENDING_LOCK times out (``LockNotAvailable``).
ARM_WAIT = f"""SELECT pg_advisory_lock_shared({WAITING_LOCK}, hashtext(%(queue)s));
SET LOCAL lock_timeout = {ARM_WAIT_TIMEOUT_MS};
SELECT pg_advisory_lock({SENDING_LOCK}, hashtext(%(queue)s));
SELECT pg_advisory_unlock({SENDING_LOCK}, hashtext(%(queue)s));"""

#: The consumer has work again (a full claim): sends need not wake it.
DISARM_WAIT = f"SELECT pg_advisory_unlock_shared({WAITING_LOCK}, hashtext(%(queue)s))"

#: A send's eta counts from ``statement_timestamp()``, the send itself, not ``now()``: inside a
#: caller's transaction (``enqueue_in``) ``now()`` is when that transaction began, and a delay
#: would be shortened by however long it had been open. Alone, a send is its own transaction
#: and the two are the same.
#:
#: Insert (or re-insert) a batch of messages and their jobs rows, then wake the
#: workers of every queue that received a ready message. The mirror's payload
#: and options are read from the JSON body server-side: the message is encoded
#: once, in Python, and sent as text (a text array literal is far cheaper to
#: send and parse than a bytea array); it is stored as its UTF-8 bytes.
#: Re-enqueueing an existing id is an upsert (dramatiq-pg's rule).
#:
#: Unique jobs: a message with a ``unique_key`` becomes a job only if no pending
#: or running job holds that key. The jobs row is inserted first, with ON
#: CONFLICT on the unique index ``uq_jobs_live_key`` DO NOTHING (``live_key`` is
#: the key of a live job; the index decides races between sessions and machines), and a message row
#: is inserted only for the jobs rows actually inserted. Returns one row:
#: ``duplicates``, a JSON object {sent id: id of the live job holding its key};
#: that id is null when the holder was committed after this statement began (the
#: statement's snapshot cannot see it): the caller sends those messages again. A
#: re-send of a finished job's id while another job holds its key is that job's
#: duplicate too (reviving the row would break ``uq_jobs_live_key``), and so is each
#: re-send of a key after the batch's first. A holder committed while this statement
#: waited on the index breaks it all the same: the broker sends the batch again
#: (``LIVE_KEY_INDEX``).
LIVE_KEY_INDEX = "uq_jobs_live_key"
ENQUEUE = (
    """
WITH m AS (
    SELECT t.id, t.queue, t.actor, """ + _PRIORITY + """ AS priority,
           coalesce(statement_timestamp() + make_interval(secs => t.delay_ms / 1000.0), t.eta,
                    statement_timestamp()) AS eta,
           convert_to(t.body, 'UTF8') AS body, """ + _MAX_ATTEMPTS + """ AS max_attempts,
           t.unique_key, t.ord, t.body::jsonb AS doc,
           -- a re-enqueue of an id that already has a job keeps the upsert path, key or not
           t.unique_key IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM control_plane.jobs AS j WHERE j.id = t.id) AS keyed,
           -- another live job holding the key: a first send, or a finished job's re-send, is its duplicate
           (SELECT h.id FROM control_plane.jobs AS h WHERE h.live_key = t.unique_key AND h.id <> t.id) AS held_by,
           -- the batch's first message of each key is the only one that may take it
           row_number() OVER (PARTITION BY t.unique_key ORDER BY t.ord) AS key_rank
    FROM unnest(%(ids)s::uuid[], %(queues)s::text[], %(actors)s::text[], %(priorities)s::int[],
                %(etas)s::timestamptz[], %(delays)s::bigint[], %(bodies)s::text[], %(max_attempts)s::int[],
                %(unique_keys)s::text[]) WITH ORDINALITY
         AS t(id, queue, actor, priority, eta, delay_ms, body, max_attempts, unique_key, ord)
), keyed_job AS (
    -- the first message of each key in the batch; the others are its duplicates
    INSERT INTO control_plane.jobs AS cur (id, type, queue, payload, options, priority, max_attempts,
                                           scheduled_at, unique_key)
    SELECT DISTINCT ON (unique_key) """ + _JOB_VALUES + """, unique_key
    FROM m WHERE keyed
    ORDER BY unique_key, ord
    ON CONFLICT (live_key) WHERE live_key IS NOT NULL DO NOTHING
    RETURNING cur.id, cur.unique_key
), job AS (
    INSERT INTO control_plane.jobs AS cur (id, type, queue, payload, options, priority, max_attempts,
                                    scheduled_at, unique_key)
    SELECT """ + _JOB_VALUES + """, unique_key
    FROM m WHERE NOT keyed AND held_by IS NULL AND (unique_key IS NULL OR key_rank = 1)
        AND NOT EXISTS (SELECT 1 FROM keyed_job AS k WHERE k.unique_key = m.unique_key)
    """ + _JOB_AGAIN + """
    RETURNING cur.id
), msg AS (
    """ + _MESSAGES_FROM_M + """
    WHERE id IN (SELECT id FROM job UNION ALL SELECT id FROM keyed_job)
    """ + _MESSAGE_AGAIN + """
)
SELECT (SELECT """ + _NOTIFY_READY + """) AS notified,
       -- every message with a key that became no job
       (SELECT coalesce(jsonb_object_agg(m.id, coalesce(winner.id, m.held_by)), '{}'::jsonb)
        FROM m
        LEFT JOIN keyed_job AS winner ON winner.unique_key = m.unique_key
        WHERE m.unique_key IS NOT NULL
            AND m.id NOT IN (SELECT id FROM keyed_job UNION ALL SELECT id FROM job)) AS duplicates
"""  # noqa: S608 (joined from this module's constants only, no input)
)

#: What ENQUEUE_PLAIN and ENQUEUE_ONE do with the messages of their CTE ``m``.
_KEYLESS_FROM_M = (
    """, job AS (
    INSERT INTO control_plane.jobs AS cur (id, type, queue, payload, options, priority, max_attempts, scheduled_at)
    SELECT """ + _JOB_VALUES + """
    FROM m
    """ + _JOB_AGAIN + """
), msg AS (
    """ + _MESSAGES_FROM_M + """
    """ + _MESSAGE_AGAIN + """
)
SELECT """ + _NOTIFY_READY + """
"""  # noqa: S608 (joined from this module's constants only, no input)
)

#: ENQUEUE for a batch in which no message has a unique key (most sends): the
#: same rows and the same upserts, without the duplicate lookups. Returns one
#: row, the count of queues woken.
ENQUEUE_PLAIN = (
    """
WITH m AS (
    SELECT t.id, t.queue, t.actor, """ + _PRIORITY + """ AS priority,
           coalesce(statement_timestamp() + make_interval(secs => t.delay_ms / 1000.0), t.eta,
                    statement_timestamp()) AS eta,
           convert_to(t.body, 'UTF8') AS body, """ + _MAX_ATTEMPTS + """ AS max_attempts, t.body::jsonb AS doc
    FROM unnest(%(ids)s::uuid[], %(queues)s::text[], %(actors)s::text[], %(priorities)s::int[],
                %(etas)s::timestamptz[], %(delays)s::bigint[], %(bodies)s::text[], %(max_attempts)s::int[])
         AS t(id, queue, actor, priority, eta, delay_ms, body, max_attempts)
)""" + _KEYLESS_FROM_M  # noqa: S608 (joined from this module's constants only, no input)
)

#: ENQUEUE_PLAIN for one message (``actor.send``), its values as scalars under
#: ENQUEUE_PLAIN's parameter names: no array literals to build, send and parse,
#: no ``unnest``. About 50 µs less per send than ENQUEUE_PLAIN with one-element
#: arrays on the benchmark machine.
ENQUEUE_ONE = (
    """
WITH m AS (
    SELECT %(ids)s::uuid AS id, %(queues)s::text AS queue, t.actor, """ + _PRIORITY + """ AS priority,
           coalesce(statement_timestamp() + make_interval(secs => %(delays)s::bigint / 1000.0), %(etas)s::timestamptz,
                    statement_timestamp()) AS eta,
           convert_to(t.body, 'UTF8') AS body, """ + _MAX_ATTEMPTS + """ AS max_attempts, t.body::jsonb AS doc
    FROM (SELECT %(bodies)s::text AS body, %(actors)s::text AS actor, CAST(%(priorities)s AS int) AS priority,
                 CAST(%(max_attempts)s AS int) AS max_attempts) AS t
)""" + _KEYLESS_FROM_M  # noqa: S608 (joined from this module's constants only, no input)
)

#: A group child passing its group's barrier (``tasks.middleware.canvas``), counted once. The
#: barrier row is read under its lock first (so every pass, and a redelivery of one, takes the
#: barrier before the marker: one lock order); then the child's marker (``<group>@done:<message
#: id>``, ``marker``) is inserted unless an unexpired one exists, and only if it was, one is taken
#: off the barrier while more than one party is left (the update runs unreferenced: a
#: data-modifying CTE always does); at 1 the last party releases it. With ``last`` false the
#: marker is not inserted when the barrier is down to 1: a child that may be the last is not
#: counted here but in a transaction that sends the callbacks too (``last`` true). A gone barrier
#: (expired, swept) takes no lock and the marker is inserted either way. Without ``last`` its
#: commit does not wait for the WAL flush: every child passes through this one row lock, and a
#: flush in it made the children pass one flush at a time; a server crash that undoes the pass
#: undoes the job's outcome, written after it, too, so the job runs and passes again. The last
#: party's, which sends the callbacks, waits for it: undone after a callback ran, it would send
#: the callback again. Returns (counted, the barrier's count before it: NULL when the barrier is gone).
CHILD_PASS = """
WITH b AS (
    SELECT key, value FROM control_plane.rate_limits
    WHERE key = %(key)s AND expires_at > now()
    FOR UPDATE
), marker AS (
    INSERT INTO control_plane.rate_limits AS r (key, value, expires_at)
    SELECT %(marker)s, 1, now() + make_interval(secs => %(ttl_ms)s / 1000.0)
    WHERE COALESCE((SELECT value FROM b) > 1 OR %(last)s, true)
    ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
    WHERE r.expires_at <= now()
    RETURNING r.key
), passed AS (
    UPDATE control_plane.rate_limits AS r
       SET value = r.value - 1, expires_at = now() + make_interval(secs => %(ttl_ms)s / 1000.0)
    FROM b WHERE r.key = b.key AND b.value > 1 AND EXISTS (SELECT FROM marker)
    RETURNING r.key
)
SELECT EXISTS (SELECT FROM marker), (SELECT value FROM b),
       CASE WHEN NOT %(last)s THEN set_config('synchronous_commit', 'off', true) END
"""

#: Group barriers that must outlive their members' delays: each lives at least ``ttl_ms`` past the
#: moment its delayed member is due (an ``eta``, else ``delay_ms`` from the send), as it does past
#: a count. ``group.run(delay=...)`` made the barrier for ``barrier_ttl`` from the send: a delay
#: longer than that (a chord sent with a countdown of a day or more) let it expire before any member
#: ran, and its completion callbacks were never sent. A barrier gone already is left gone.
BARRIERS_OUTLIVE_DELAYS = """
UPDATE control_plane.rate_limits AS r
   SET expires_at = GREATEST(r.expires_at, COALESCE(s.eta, statement_timestamp()
                             + make_interval(secs => s.delay_ms / 1000.0)) + make_interval(secs => %(ttl_ms)s / 1000.0))
  FROM unnest(%(keys)s::text[], %(etas)s::timestamptz[], %(delays)s::bigint[]) AS s(key, eta, delay_ms)
 WHERE r.key = s.key AND r.expires_at > now()
"""

#: A message sent once (a pipeline's next step, ``tasks.middleware.canvas``): deliveries of the
#: step before it wait for each other here, then look whether the job exists.
LOCK_SEND_ONCE = "SELECT pg_advisory_xact_lock(hashtext('controlplane:send-once:' || %(id)s))"
#: The option a pipeline's next step is sent with (``tasks.middleware.canvas``): the run of
#: the step that sent it (``<message id>/<attempts before its last send>``), so that the step
#: run again sends it again and a redelivery of the same run does not; the reaper reads it too.
PIPE_SENT_BY = "pipe_sent_by"
#: A pipeline step's run (its attempts before its last send) and whether, and by which run,
#: its next step was sent.
PIPE_SENT = f"""
SELECT (SELECT attempts_before_retry FROM control_plane.jobs WHERE id = %(id)s::uuid),
       n.id IS NOT NULL, n.options ->> '{PIPE_SENT_BY}'
FROM (SELECT 1) AS one LEFT JOIN control_plane.jobs AS n ON n.id = %(next)s::uuid
"""  # noqa: S608 (a constant of this module, no input)

#: The actor and queue of some jobs (a send returns the job holding its unique key under them).
JOB_ACTORS = "SELECT id::text, type, queue FROM control_plane.jobs WHERE id = ANY(%(ids)s::uuid[])"

#: The jobs rows of some message ids, as ENQUEUE writes them (a send that lost its
#: connection looks for what it may have committed before sending again).
STORED_JOBS = "SELECT id::text, payload, options FROM control_plane.jobs WHERE id = ANY(%(ids)s::uuid[])"

#: Lease up to ``limit`` ready messages of one queue to this worker, in
#: priority-then-eta order, skipping rows other workers hold; each with its age since it
#: was sent, by the database's clock (``max_age``: see ``PgMessageProxy``). The jobs rows are
#: not touched: a job becomes ``running`` when a worker thread starts it (SETTLE's
#: ``start`` rows, or its outcome when it finished before its start was written).
#: The broker writes the limit into the text (one prepared statement per size,
#: see ``tasks.broker._claim_size``); ``%(limit)s`` works for a plain run.
#:
#: Priority by priority (a skip scan): with one range over ``ix_messages_ready``
#: (queue, priority, eta, id), ``eta <= now()`` could not bound it, and every
#: claim read every message waiting for its delay or retry backoff in the
#: queue (46 ms with 300,000 of them, for 10 due; 0.2 ms this way). At most
#: CLAIM_PRIORITIES descents: past them (a queue with priorities by the thousand) the
#: priorities above are read in one range, as before (100,000 priorities: 20 ms, not 650).
#: A paused queue (``control_plane.queue_pauses``, migration 0017) has no priority to start from.
CLAIM_PRIORITIES = 32
#: CLAIM's look at the pauses (``CLAIM_BEFORE_PAUSES`` is CLAIM without it, for a worker that cannot
#: read them: see ``tasks.broker._PostgresConsumer._look_for_pauses``).
_NOT_PAUSED = "\n       AND NOT EXISTS (SELECT FROM control_plane.queue_pauses WHERE queue = %(queue)s)"
CLAIM = """
WITH RECURSIVE p AS (
    -- the queue's priorities, lowest first, one index descent each, at most CLAIM_PRIORITIES
    (SELECT priority, 1 AS n FROM control_plane.messages
     WHERE queue = %(queue)s AND claim_token IS NULL""" + _NOT_PAUSED + """
     ORDER BY priority LIMIT 1)
    UNION ALL
    SELECT (SELECT x.priority FROM control_plane.messages AS x
            WHERE x.queue = %(queue)s AND x.claim_token IS NULL AND x.priority > p.priority
            ORDER BY x.priority LIMIT 1), p.n + 1
    FROM p WHERE p.priority IS NOT NULL AND p.n < """ + str(CLAIM_PRIORITIES) + """
), few AS (
    -- for each, its due messages only: a range of ix_messages_ready that ends at now()
    SELECT r.id FROM p CROSS JOIN LATERAL (
        SELECT id FROM control_plane.messages
        WHERE queue = %(queue)s AND claim_token IS NULL AND priority = p.priority AND eta <= now()
        ORDER BY eta, id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED
    ) AS r
    LIMIT %(limit)s
), rest AS (
    -- a queue of more priorities than that: the ones above them in one range, only if needed
    SELECT id FROM control_plane.messages
    WHERE queue = %(queue)s AND claim_token IS NULL AND eta <= now()
      AND priority > (SELECT max(priority) FROM p) AND (SELECT count(*) FROM p) >= """ + str(CLAIM_PRIORITIES) + """
    ORDER BY priority, eta, id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), c AS (
    (SELECT id FROM few) UNION ALL (SELECT id FROM rest) LIMIT %(limit)s
), m AS (
    UPDATE control_plane.messages AS m
       SET claim_token = %(token)s, worker = %(worker)s,
           lease_expires_at = now() + make_interval(secs => %(lease)s)
    FROM c WHERE m.id = c.id
    RETURNING m.id, m.priority, m.eta, m.body, m.enqueued_at
)
SELECT id::text, body, (extract(epoch FROM now() - enqueued_at) * 1000)::bigint AS age_ms
FROM m ORDER BY priority, eta, id
"""  # noqa: S608 (joined from this module's constants only, no input)
CLAIM_BEFORE_PAUSES = CLAIM.replace(_NOT_PAUSED, "")

#: Apply a batch of outcomes: ``ack`` (done), ``nack`` (failed for good),
#: ``retry`` (back to the queue at now + delay) and ``cancel`` (interrupted by
#: ``control_plane.cancel_job``), and ``start`` (a worker thread started it:
#: the job is ``running``; the message stays claimed). Fenced by the claim
#: token: a worker that lost its lease changes nothing. A retry of a message
#: whose cancellation was requested is a cancel: the attempt failed before the
#: interrupt landed, but the job must not run again.
#:
#: An attempt is counted when the job becomes ``running``; an outcome whose job
#: is not ``running`` (a short job that finished before its start was written,
#: or a message refused before it ran) counts it itself, so a short job writes
#: its jobs row twice (pending, then its outcome), not three times. Only this
#: statement and the ones that end a claim (REAP, RELEASE) move a job out of
#: ``running``, so under a matching token ``running`` means this claim's start
#: was written. ``started_ms`` is how long ago the attempt started (null: not
#: started), measured on the worker's clock but applied to the database's.
#: Returns the ids applied.
#:
#: An outcome applies to its message held under its claim's token only. A claim a server
#: crash undid (claims commit without waiting for the WAL flush) leaves the row unclaimed,
#: and the outcome refused: another worker runs the job again (``docs/design.md``). Applying it
#: to the row still at the version its claim read (its ``xmin``) cut the jobs run twice in a
#: crash test by about a quarter, and cost every job about a tenth of the drain rate (an
#: ``OR`` in this statement and a column in the claim): withdrawn (``docs/performance.md``).
#:
#: A group member's ack carries its marker (``markers``: ``<group>@done:<message id>``, from
#: ``tasks.middleware.canvas.GroupCallbacks``), and is written only while that marker is there.
#: A member that is not the last passes its group's barrier in a statement that does not wait
#: for the WAL flush: a server crash can undo the pass while the claim before it holds, and the
#: ack written after the crash under that claim ended the member ``completed``, uncounted, its
#: group's callback never sent (a review's crash repro). Refused, the ack leaves the message
#: claimed: its lease ends, the reaper puts it back, and it runs and passes again. (A crash
#: that undid the claim undid the pass, which came after it: refused too, the message is
#: back in the queue for any worker.)
_SETTLE_CTES = """
WITH t AS (
    SELECT * FROM unnest(%(ids)s::uuid[], %(tokens)s::uuid[], %(kinds)s::text[],
                         %(delays)s::bigint[], %(bodies)s::bytea[], %(errors)s::text[],
                         %(results)s::jsonb[], %(started_ms)s::bigint[], %(markers)s::text[])
         AS t(id, token, kind, delay_ms, body, error, result, started_ms, marker)
), a AS (
    SELECT t.id, t.token, t.delay_ms, t.body, t.error, t.result, t.marker,
           now() - make_interval(secs => coalesce(t.started_ms, 0) / 1000.0) AS started_at,
           CASE WHEN t.kind = 'retry' AND m.cancel_requested_at IS NOT NULL THEN 'cancel' ELSE t.kind END AS kind
    FROM t LEFT JOIN control_plane.messages AS m ON m.id = t.id AND m.claim_token = t.token
), held AS (
    -- A start is written only while its claim holds, and the lock keeps REAP and
    -- RELEASE from taking the message back before the jobs row says running.
    SELECT m.id FROM t JOIN control_plane.messages AS m ON m.id = t.id AND m.claim_token = t.token
    WHERE t.kind = 'start'
    FOR SHARE OF m
), gone AS (
    DELETE FROM control_plane.messages AS m USING a
    WHERE a.kind NOT IN ('retry', 'start') AND m.id = a.id AND m.claim_token = a.token
      -- a group member's ack, only while the pass it made is there (see _SETTLE_CTES)
      AND (a.marker IS NULL OR EXISTS (SELECT FROM control_plane.rate_limits AS g
                                       WHERE g.key = a.marker AND g.expires_at > now()))
    RETURNING m.id, NULL::timestamptz AS eta
), back AS (
    UPDATE control_plane.messages AS m
       SET claim_token = NULL, worker = NULL, lease_expires_at = NULL,
           -- (no body: the message as it is now could not be encoded; the one stored stays)
           eta = now() + make_interval(secs => a.delay_ms / 1000.0), body = coalesce(a.body, m.body)
    FROM a WHERE a.kind = 'retry' AND m.id = a.id AND m.claim_token = a.token
      -- re-checked on the row as it is once locked: a cancellation that committed while this
      -- statement waited for the row keeps it out of the queue (the settler, finding this retry
      -- not written, writes it again as a cancel)
      AND m.cancel_requested_at IS NULL
    RETURNING m.id, m.eta
), done AS (
    SELECT id, eta FROM gone UNION ALL SELECT id, eta FROM back
    UNION ALL SELECT id, NULL FROM held
), n AS (
    -- the attempt's number: counted by its start mark when that was written
    SELECT a.*, done.eta, j.attempts + CASE WHEN j.status = 'running' THEN 0 ELSE 1 END AS attempt,
           j.status = 'running' AS counted,
           CASE WHEN j.status = 'running' THEN j.worker ELSE %(worker)s END AS worker
    FROM a JOIN done ON done.id = a.id JOIN control_plane.jobs AS j ON j.id = a.id
)"""

_SETTLE_UPDATE = """
UPDATE control_plane.jobs AS j
   SET status = """ + _status_after("n.kind") + """,
       attempts = n.attempt,
       started_at = CASE WHEN n.counted THEN j.started_at ELSE n.started_at END,
       worker = n.worker,
       completed_at = CASE WHEN n.kind IN ('retry', 'start') THEN NULL ELSE now() END,
       scheduled_at = coalesce(n.eta, j.scheduled_at),
       result = CASE WHEN n.kind = 'ack' THEN n.result ELSE j.result END,
       last_error = CASE n.kind WHEN 'ack' THEN j.last_error WHEN 'start' THEN j.last_error
                                WHEN 'cancel' THEN 'cancelled by operator' ELSE n.error END,
       errors = CASE WHEN n.kind IN ('ack', 'start') THEN j.errors
                ELSE j.errors || jsonb_build_array(jsonb_build_object(
                         'attempt', n.attempt, 'at', now(), 'error', n.error, 'worker', n.worker))
                END,
       options = CASE WHEN n.kind = 'retry' THEN coalesce(convert_from(n.body, 'UTF8')::jsonb -> 'options',
                                                          j.options)
                 ELSE j.options END,
       updated_at = now()
FROM n
WHERE j.id = n.id AND (n.kind <> 'start' OR NOT n.counted)
RETURNING j.id::text
"""

SETTLE = _SETTLE_CTES + _SETTLE_UPDATE

#: SETTLE for a batch that carries results for the results backend (``store_results``):
#: each is stored with its job's outcome, in the same statement, so a caller that
#: ``get_result`` answers reads ``control_plane.jobs`` already ended (and its unique key
#: free), and a result whose outcome was not written (a lost lease) is not stored. Apart,
#: so that the batches without results, nearly all, take no lock on ``results``.
SETTLE_STORING_RESULTS = _SETTLE_CTES + """, stored AS (
    INSERT INTO control_plane.results (key, value, expires_at)
    SELECT s.key, s.value, """ + _expires_in("s.ttl_ms") + """
    FROM unnest(%(result_ids)s::uuid[], %(result_keys)s::text[], %(result_values)s::bytea[],
                %(result_ttls)s::bigint[]) AS s(id, key, value, ttl_ms)
    JOIN done ON done.id = s.id
    ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
)""" + _SETTLE_UPDATE  # noqa: S608 (joined from this module's constants only, no input)

#: Give back messages this worker holds but will not finish (graceful shutdown,
#: consumer restart). ``started`` true means an attempt ran and was interrupted:
#: it counts (unless its start mark already counted it), with an entry in ``errors``.
#: A message whose cancellation was requested is not given back: its job ends cancelled.
#: An interrupted attempt that used up its job's attempts is not given back either (a job
#: cut by every deploy would run forever): its lease ends at once, marked ``epoch`` (1970: a
#: release's, not a lost worker's), and a reap ends the job as it ends a lost worker's (REAP:
#: its failure hooks, its callers' result): the releasing consumer's own, right after, which
#: declares the job's actors (another pool's worker might not), or any worker's next.
RELEASE = """
WITH a AS (
    SELECT t.id, t.token, t.started,
           coalesce(t.started AND j.attempts + CASE WHEN j.status <> 'running' THEN 1 ELSE 0 END
                                  - j.attempts_before_retry >= j.max_attempts, false) AS spent
    FROM unnest(%(ids)s::uuid[], %(tokens)s::uuid[], %(started)s::boolean[]) AS t(id, token, started)
    LEFT JOIN control_plane.jobs AS j ON j.id = t.id
), r AS (
    UPDATE control_plane.messages AS m
       SET claim_token = CASE WHEN a.spent THEN m.claim_token END,
           worker = CASE WHEN a.spent THEN m.worker END,
           lease_expires_at = CASE WHEN a.spent THEN 'epoch'::timestamptz END
    FROM a WHERE m.id = a.id AND m.claim_token = a.token AND m.cancel_requested_at IS NULL
    RETURNING m.id, m.queue, m.eta, a.spent
), x AS (
    DELETE FROM control_plane.messages AS m USING a
    WHERE m.id = a.id AND m.claim_token = a.token AND m.cancel_requested_at IS NOT NULL
    RETURNING m.id
), j AS (
    UPDATE control_plane.jobs AS j
       SET status = CASE WHEN r.spent THEN 'running' ELSE 'pending' END, updated_at = now(),
           started_at = CASE WHEN r.spent THEN coalesce(j.started_at, now()) END,
           -- a started attempt counts, if its start mark (which counted it) was not written yet
           attempts = j.attempts + CASE WHEN a.started AND j.status <> 'running' THEN 1 ELSE 0 END,
           last_error = CASE WHEN a.started AND NOT r.spent
                             THEN 'interrupted: the worker shut down before the job finished'
                             ELSE j.last_error END,
           errors = CASE WHEN a.started AND NOT r.spent
                         THEN j.errors || jsonb_build_array(jsonb_build_object(
                             'attempt', j.attempts + CASE WHEN j.status <> 'running' THEN 1 ELSE 0 END,
                             'at', now(), 'worker', %(worker)s::text,
                             'error', 'interrupted: the worker shut down before the job finished'))
                         ELSE j.errors END
    FROM a JOIN r ON r.id = a.id WHERE j.id = a.id
), jx AS (
    UPDATE control_plane.jobs AS j
       SET status = 'cancelled', completed_at = now(), updated_at = now(), last_error = 'cancelled by operator'
    FROM x WHERE j.id = x.id
)
SELECT pg_notify('control_plane_messages', q.queue)
FROM (SELECT DISTINCT queue FROM r WHERE eta <= now() AND NOT spent) AS q
"""

#: Which of some jobs the RELEASE just run in this transaction ended cancelled: those it ended at
#: its ``now()``, this transaction's. Not every job cancelled among them: a claim the reaper took (a
#: process stopped past its lease, its messages given back unstarted) may be of a job the reaper
#: ended cancelled, sending its hooks then; the giving back must not send them again.
CANCELLED_AMONG = """SELECT id::text FROM control_plane.jobs
WHERE id = ANY(%(ids)s::uuid[]) AND status = 'cancelled' AND completed_at = now()"""

#: Extend the leases of the claims this worker holds, and record its heartbeat.
#: Returns the ids of held messages whose cancellation an operator requested
#: (``control_plane.cancel_job``): the worker interrupts them.
#:
#: A message another transaction has locked is skipped, not waited for: that is
#: this worker's settler writing its outcome (or an operator cancelling it) right
#: now. Waiting made a cycle: the settler locks its messages in the order they
#: finished, the heartbeat in table order, and two statements that each hold a
#: row the other wants deadlock. Returns, second, how many held messages were
#: skipped so: the worker heartbeats again soon, not a whole interval later.
HEARTBEAT = """
WITH l AS (
    SELECT id FROM control_plane.messages
    WHERE id = ANY(%(ids)s::uuid[]) AND claim_token = ANY(%(tokens)s::uuid[])
    FOR NO KEY UPDATE SKIP LOCKED
), h AS (
    UPDATE control_plane.messages AS m
       SET lease_expires_at = now() + make_interval(secs => %(lease)s)
    FROM l WHERE m.id = l.id
    RETURNING m.id, m.cancel_requested_at
)
INSERT INTO control_plane.worker_heartbeats AS w (id, hostname, pid, queues, heartbeat_at)
VALUES (%(worker)s, %(hostname)s, %(pid)s, %(queues)s::text[], now())
ON CONFLICT (id) DO UPDATE
   SET heartbeat_at = now(), queues = excluded.queues
RETURNING (SELECT coalesce(array_agg(id::text), '{}') FROM h WHERE cancel_requested_at IS NOT NULL),
          (SELECT count(*) FROM control_plane.messages
           WHERE id = ANY(%(ids)s::uuid[]) AND claim_token = ANY(%(tokens)s::uuid[]))
          - (SELECT count(*) FROM h) AS skipped,
          EXISTS (SELECT FROM control_plane.queue_pauses WHERE queue = %(queue)s) AS paused
"""
#: HEARTBEAT for a worker that cannot read the pauses: ``paused`` is always false (a queue is named).
HEARTBEAT_BEFORE_PAUSES = HEARTBEAT.replace(
    "EXISTS (SELECT FROM control_plane.queue_pauses WHERE queue = %(queue)s)", "%(queue)s IS NULL"
)

#: The NOTIFY payload prefix with which ``control_plane.cancel_job`` asks the
#: workers of a queue to heartbeat now (``cancel:<queue>``), not at the next interval.
CANCEL_NOTIFY_PREFIX = "cancel:"

#: Put back the messages of workers whose lease expired (killed, machine lost),
#: record why in the mirror, forget workers silent for long, and wake the queues.
#: A message whose cancellation was requested is not put back: its job ends cancelled.
#: Nor is one whose job has used up its attempts (a job that kills its worker would
#: otherwise take down one worker per lease forever): its job ends failed. The jobs
#: ended so come back (id, fate, error, attempts) with their messages' bodies, for their
#: failure hooks (sent in the reap's transaction) and ``STORE_REAPED_RESULTS`` (a statement
#: of its own, in the same transaction under a savepoint and a 1 s lock timeout, else after it:
#: here, an insert into ``results`` would make every reap wait for any lock on that table).
#: A job marked running fails once its attempts reach ``max_attempts``. One that was not
#: (claimed, and maybe never started: a dying worker's prefetch is charged an attempt too)
#: fails only at twice that: a job that kills its worker within
#: ``RUNNING_MARK_DELAY_SECONDS`` still ends, an innocent bystander of a few deaths does not.
#: Whether the claimed message ``m`` (job ``j``) returned and its pipeline or group hook
#: committed what it sends (``tasks.middleware.canvas``): its next step sent by this run of
#: it, or its marker as a group's counted child. Its worker died before its own outcome
#: was written; failing it now would undo (``on_failure``, compensation) a job whose
#: pipeline went on, and running it again could fail it (its caller told the pipeline stopped,
#: though its next steps ran; an operator's retry sending them again), or a cancel end it
#: ``cancelled``. So it ends ``completed``, whatever attempts it has left, cancelled or not.
#: Read from the job's options (the message's, as its send wrote them): a body that is not
#: UTF-8 JSON (written by hand, or by a foreign producer) would fail the whole reap.
_UUID = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_OUTCOME_TOOK_EFFECT = """(EXISTS (SELECT 1 FROM control_plane.jobs AS n
                        WHERE n.id = CASE WHEN j.options #>> '{pipe_target,message_id}' ~* '""" + _UUID + """'
                                          THEN (j.options #>> '{pipe_target,message_id}')::uuid END
                          AND n.options ->> '""" + PIPE_SENT_BY + """' = m.id || '/' || j.attempts_before_retry)
                 OR EXISTS (SELECT 1 FROM control_plane.rate_limits AS g
                            WHERE g.key = (j.options ->> 'group_completion_uuid') || '@done:' || m.id
                              AND g.expires_at > now()))"""  # noqa: S608 (constants only)

#: The most expired claims one REAP takes. A reap that takes that many is run again at once
#: (``_PostgresConsumer._housekeeping``): once per interval, a dead worker's 20,000 claims (40 queues
#: of 512, a 64-thread process) came back a thousand every 5 s, the last 100 s after the others.
REAP_BATCH = 1000

REAP = """
WITH r AS (
    SELECT m.id, m.worker, m.lease_expires_at = 'epoch' AS released,
           CASE WHEN """ + _OUTCOME_TOOK_EFFECT + """ THEN 'done'
                WHEN m.cancel_requested_at IS NOT NULL THEN 'cancel'
                WHEN j.attempts - j.attempts_before_retry >= j.max_attempts
                     AND (j.status = 'running' OR j.attempts - j.attempts_before_retry >= 2 * j.max_attempts)
                THEN 'fail'
                ELSE 'requeue' END AS fate
    FROM control_plane.messages AS m LEFT JOIN control_plane.jobs AS j ON j.id = m.id
    WHERE m.claim_token IS NOT NULL AND m.lease_expires_at < now()
    ORDER BY m.lease_expires_at
    LIMIT """ + str(REAP_BATCH) + """
    FOR UPDATE OF m SKIP LOCKED
), m AS (
    UPDATE control_plane.messages AS m
       SET claim_token = NULL, worker = NULL, lease_expires_at = NULL
    FROM r WHERE m.id = r.id AND r.fate = 'requeue'
    RETURNING m.id, m.queue, r.worker, r.released
), x AS (
    DELETE FROM control_plane.messages AS m USING r WHERE m.id = r.id AND r.fate <> 'requeue'
    RETURNING m.id, r.worker, r.fate, m.body, r.released
), lost AS (
    -- The lost claim counts as an attempt (unless its start mark counted it):
    -- its worker may have started it without the mark being written.
    SELECT l.id, coalesce(l.worker, 'unknown') AS worker, l.fate, l.body,
           j.attempts + CASE WHEN j.status = 'running' THEN 0 ELSE 1 END AS attempt,
           CASE WHEN l.released  -- (RELEASE's: an attempt a shutdown interrupted, its last)
                THEN 'interrupted: the worker shut down before the job finished'
                ELSE 'lease expired: worker ' || coalesce(l.worker, 'unknown') || ' stopped heartbeating'
           END AS error,
           CASE WHEN l.released THEN '' ELSE ' (killed or cut off)' END AS why
    FROM (SELECT id, worker, 'requeue' AS fate, NULL::bytea AS body, released FROM m
          UNION ALL SELECT id, worker, fate, body, released FROM x) AS l
    JOIN control_plane.jobs AS j ON j.id = l.id
), j AS (
    UPDATE control_plane.jobs AS j
       SET status = CASE lost.fate WHEN 'cancel' THEN 'cancelled' WHEN 'fail' THEN 'failed'
                                   WHEN 'done' THEN 'completed' ELSE 'pending' END,
           completed_at = CASE WHEN lost.fate = 'requeue' THEN j.completed_at ELSE now() END,
           scheduled_at = CASE WHEN lost.fate = 'requeue' THEN now() ELSE j.scheduled_at END,
           updated_at = now(),
           attempts = lost.attempt,
           worker = lost.worker,
           last_error = CASE lost.fate
                        WHEN 'cancel' THEN 'cancelled by operator'
                        WHEN 'fail' THEN lost.error || lost.why || ' on attempt ' || lost.attempt
                             || '; not re-queued, its attempts are used up (max_attempts '
                             || j.max_attempts || ')'
                        WHEN 'done' THEN j.last_error
                        ELSE lost.error || lost.why || '; the job was re-queued' END,
           errors = j.errors || jsonb_build_array(jsonb_build_object(
                        'attempt', lost.attempt, 'at', now(), 'worker', lost.worker,
                        'error', lost.error
                                 || CASE lost.fate
                                    WHEN 'cancel' THEN ' after its cancellation was requested'
                                    WHEN 'done' THEN ' after it returned and its pipeline or group went on'
                                    ELSE '' END)
                    -- a claim whose start was never written: counted here, but not as an attempt
                    -- that ran (ATTEMPTS_BEFORE), since most such are a lost worker's prefetch
                    || CASE WHEN j.status = 'running' THEN '{}'::jsonb ELSE '{"started": false}'::jsonb END)
    FROM lost WHERE j.id = lost.id
    RETURNING j.id, lost.fate, lost.body, j.last_error, j.attempts - j.attempts_before_retry AS attempts,
              j.max_attempts
), w AS (
    DELETE FROM control_plane.worker_heartbeats
    WHERE heartbeat_at < now() - make_interval(secs => %(forget_after)s)
)
SELECT (SELECT count(*) FROM m),
       (SELECT count(pg_notify('control_plane_messages', q.queue)) FROM (SELECT DISTINCT queue FROM m) AS q),
       (SELECT coalesce(jsonb_agg(jsonb_build_object('id', id, 'fate', fate, 'error', last_error,
                                                     'attempts', attempts, 'max_attempts', max_attempts)
                                  ORDER BY id), '[]')
        FROM j WHERE fate IN ('fail', 'cancel')),
       (SELECT coalesce(array_agg(body ORDER BY id), '{}') FROM j WHERE fate IN ('fail', 'cancel')),
       -- how many expired claims it took: REAP_BATCH, there may be more
       (SELECT count(*) FROM r)
"""  # noqa: S608 (joined from this module's constants only, no input)

#: What a caller blocked in ``get_result`` hears of jobs ``REAP`` ended: ``WorkerLost`` for a
#: failed one, ``Cancelled`` for a cancelled one, under the key ``control_plane.cancel_job``
#: stores a cancel's under (migration 0010). It lives as the job's own result would: the
#: message's ``result_ttl``, else its actor's as its workers declared it (migration 0021; read
#: through ``to_jsonb``, so that on a schema before it this reads NULL instead of failing),
#: else ``default_ttl_ms`` (the reaper's ``CONTROLPLANE_RESULT_TTL_MS``).
STORE_REAPED_RESULTS = """
INSERT INTO control_plane.results AS r (key, value, expires_at)
SELECT md5('dramatiq-results:' || j.queue || ':' || j.type || ':' || j.id::text),
       convert_to(jsonb_build_object('__t', 'dramatiq.results.Result', 'exn', jsonb_build_object(
           'type', CASE j.status WHEN 'failed' THEN 'WorkerLost' ELSE 'Cancelled' END,
           'msg', j.last_error))::text, 'UTF8'),
       """ + _expires_in("""CASE WHEN j.options ->> 'result_ttl' ~ '^[0-9]{1,15}$'
                                THEN (j.options ->> 'result_ttl')::bigint
                                ELSE coalesce((SELECT (to_jsonb(d) ->> 'result_ttl_ms')::bigint
                                               FROM control_plane.actor_defaults AS d WHERE d.actor = j.type),
                                              %(default_ttl_ms)s::bigint) END""") + """
FROM control_plane.jobs AS j
WHERE j.id = ANY(%(ids)s::uuid[]) AND j.status IN ('failed', 'cancelled')
ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
"""  # noqa: S608 (joined from this module's constants only, no input)

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
       attempts = j.attempts + 1, errors = j.errors || excluded.errors
"""

#: The lease keeper's (``tasks/lease_keeper.py``): extend the leases of every claim of worker
#: ``worker`` and record its heartbeat, while its own threads cannot (a job holding the GIL).
#: Through ``ix_messages_lease`` (claimed messages only). A message another transaction has
#: locked is skipped, as by HEARTBEAT: its settler is writing its outcome. Returns how many
#: leases it extended.
KEEP_LEASES = """
WITH l AS (
    SELECT id FROM control_plane.messages
    WHERE claim_token IS NOT NULL AND worker = %(worker)s
    FOR NO KEY UPDATE SKIP LOCKED
), k AS (
    UPDATE control_plane.messages AS m
       SET lease_expires_at = now() + make_interval(secs => %(lease)s)
    FROM l WHERE m.id = l.id
    RETURNING 1
), h AS (
    UPDATE control_plane.worker_heartbeats SET heartbeat_at = now() WHERE id = %(worker)s
)
SELECT count(*) FROM k
"""

#: How many of a consumer's claims the reaper took from worker ``worker`` in the last ``secs``
#: seconds (after a heartbeat that came too late). Read from the jobs' errors, which REAP
#: appends to: a claim no longer in ``control_plane.messages`` may as well have been settled
#: by this worker's settler since the consumer listed it (an ack deletes the row, a retry
#: clears its claim), which is no lost claim.
REAPED_SINCE = """
SELECT count(*) FROM control_plane.jobs AS j
WHERE j.id = ANY(%(ids)s::uuid[])
  AND EXISTS (SELECT FROM jsonb_array_elements(j.errors) AS e
              WHERE e->>'worker' = %(worker)s AND e->>'error' LIKE 'lease expired:%%'
                AND (e->>'at')::timestamptz >= now() - make_interval(secs => %(secs)s))
"""

#: A claim whose lease ran out in its worker's eyes (no heartbeat within a lease), asked of before
#: a thread starts its message: a row when it is still this worker's, its lease extended; none when
#: the reaper took it (put back, maybe run elsewhere).
RENEW_CLAIM = """
UPDATE control_plane.messages SET lease_expires_at = now() + make_interval(secs => %(lease)s)
WHERE id = %(id)s AND claim_token = %(token)s
RETURNING 1
"""

#: Forget a worker that shut down cleanly.
WORKER_GONE = "DELETE FROM control_plane.worker_heartbeats WHERE id = %(worker)s"

#: The results backend.
RESULT_GET = """
SELECT value FROM control_plane.results WHERE key = %(key)s AND expires_at > now()
"""

#: Forget results (pipelines run again: their callers wait for the new runs').
RESULT_FORGET = "DELETE FROM control_plane.results WHERE key = ANY(%(keys)s::text[])"

#: Why a result is not there, for the caller's exception: its job's status and when it ended
#: (the jobs row, if any), and when its result expired (if its row is still there, unpruned).
RESULT_MISSING_WHY = """
SELECT j.status, j.completed_at, r.expires_at
FROM (SELECT) AS one
LEFT JOIN control_plane.jobs AS j ON j.id = %(id)s::uuid
LEFT JOIN control_plane.results AS r ON r.key = %(key)s AND r.expires_at <= now()
"""

#: Store results (distinct keys) apart from a SETTLE: the results backend's on a connection
#: of its own or a caller's, a pipeline or group step's in its hook, the broker's writer's.
#: A result given a job id (``jobs``) is stored only while that job's row shows the status an
#: outcome of the kind given with it leaves and the worker given (``kinds``, ``workers``): the
#: result of an outcome whose settle may have been committed with its reply lost, stored only
#: if that settle was (and not if the lease was lost meanwhile: the row then shows another
#: worker's run).
RESULT_STORE = """
INSERT INTO control_plane.results (key, value, expires_at)
SELECT s.key, s.value, """ + _expires_in("s.ttl_ms") + """
FROM unnest(%(keys)s::text[], %(values)s::bytea[], %(ttls)s::bigint[], %(jobs)s::uuid[], %(kinds)s::text[],
            %(workers)s::text[]) AS s(key, value, ttl_ms, job, kind, worker)
WHERE s.job IS NULL
   OR EXISTS (SELECT 1 FROM control_plane.jobs AS j
              WHERE j.id = s.job AND j.status = """ + _status_after("s.kind") + """ AND j.worker = s.worker)
ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
"""  # noqa: S608 (joined from this module's constants only, no input)

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

# -- operators: what the ``controlplane`` CLI runs (the same functions serve psql) --

#: Cancel a job (``control_plane.cancel_job``): ``cancelled`` (it was waiting),
#: ``cancelling`` (it runs: its worker interrupts it), or NULL (nothing to cancel).
CANCEL_JOB = "SELECT control_plane.cancel_job(%(id)s::uuid)"

#: The live jobs of a queue (of one actor, or all), oldest first: what ``jobs cancel --queue`` cancels.
#: From the message table, which holds exactly them.
LIVE_JOB_IDS = """
SELECT id::text FROM control_plane.messages
WHERE queue = %(queue)s AND (%(type)s::text IS NULL OR actor = %(type)s::text)
ORDER BY eta, id
"""

#: Put a failed or cancelled job back in its queue; false when it is in no such state.
RETRY_JOB = "SELECT control_plane.retry_job(%(id)s::uuid)"

PAUSE_QUEUE = "SELECT control_plane.pause_queue(%(queue)s, %(reason)s)"

#: Whether ``control_plane.queue_pauses`` is there (migration 0017), and this role may read it.
PAUSES_READABLE = """SELECT t IS NOT NULL, CASE WHEN t IS NOT NULL THEN has_table_privilege(t, 'SELECT') ELSE false END
FROM to_regclass('control_plane.queue_pauses') AS t"""

RESUME_QUEUE = "SELECT control_plane.resume_queue(%(queue)s)"

#: Whether a queue is one this deployment knows: an actor its workers declared sends to it, or
#: it holds messages (a pause of a misspelt name would hold nothing back).
#: The queue the workers declared an actor on (``control_plane.actor_defaults``): a send or a
#: schedule by name to another queue would wait for good for a worker of that queue.
ACTOR_DECLARED_QUEUE = "SELECT queue FROM control_plane.actor_defaults WHERE actor = %(actor)s"

QUEUE_KNOWN = """SELECT EXISTS (SELECT FROM control_plane.actor_defaults WHERE queue = %(queue)s)
    OR EXISTS (SELECT FROM control_plane.messages WHERE queue = %(queue)s)"""

#: The paused queues, oldest pause first.
PAUSED_QUEUES = "SELECT queue, paused_at, reason FROM control_plane.queue_pauses ORDER BY paused_at, queue"

#: The failed jobs (of one type and queue, or all), oldest failure first, the first ``limit`` (NULL:
#: all): what ``jobs retry --failed`` retries. Through ``ix_jobs_failed_at`` (or, by queue,
#: ``ix_jobs_queue_failed_at``).
FAILED_JOB_IDS = """
SELECT id::text FROM control_plane.jobs
WHERE failed_at IS NOT NULL AND (%(type)s::text IS NULL OR type = %(type)s::text)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
  AND (%(since)s::interval IS NULL OR failed_at >= now() - %(since)s::interval)
ORDER BY failed_at, id
LIMIT %(limit)s
"""

#: A job's status, to explain why an operation did nothing.
JOB_STATUS = "SELECT status FROM control_plane.jobs WHERE id = %(id)s::uuid"

#: Rows deleted per statement by the prune (``tasks.maintenance.prune_rows``).
PRUNE_BATCH = 10_000

#: One batch of the prune: the next ``PRUNE_BATCH`` jobs in ``created_at`` order after
#: ``after_at`` (text, as the last batch returned it: a ``datetime`` cannot hold
#: ``-infinity`` or a year BC; NULL for the first batch), with every job that shares the
#: last one's ``created_at`` (``WITH TIES``: the jobs of one transaction share its
#: ``now()``; a keyset over ``created_at, id`` re-read the whole tie group for each batch,
#: since the index has no ``id``, 9.8 s for 600,000 ties), among those created before
#: the later of the two retention cut-offs (a job cannot have finished before it was
#: created), and of them deletes the finished ones past their retention, as
#: ``control_plane.prune_jobs`` does. Returns how many went, how many were looked at (fewer
#: than a batch: the end), and the last ``created_at`` looked at (the next batch's start).
#: The rows are deleted by their place (``ctid``): joined on ``id``, the planner hashes the
#: whole history for each batch. A row updated since (``retry_job``) has another place and stays.
#: Each batch is its own transaction: one ``DELETE`` of a large history would hold a snapshot
#: for its whole length, and every claim meanwhile walks the dead entries of the jobs
#: drained since (docs/operations.md, "A long transaction slows every queue").
PRUNE_JOBS_BATCH = f"""
WITH batch AS (
    SELECT j.ctid, j.created_at FROM control_plane.jobs AS j
    WHERE (%(after_at)s::timestamptz IS NULL OR j.created_at > %(after_at)s::timestamptz)
      AND j.created_at < greatest(now() - %(completed)s::interval, now() - %(failed)s::interval)
    ORDER BY j.created_at
    FETCH FIRST {PRUNE_BATCH} ROWS WITH TIES
), gone AS (
    DELETE FROM control_plane.jobs AS j
    WHERE j.ctid = ANY (ARRAY(SELECT b.ctid FROM batch AS b))
      AND ((j.status IN ('completed', 'cancelled')
            AND coalesce(j.completed_at, j.updated_at) < now() - %(completed)s::interval)
           OR (j.status = 'failed' AND coalesce(j.completed_at, j.updated_at) < now() - %(failed)s::interval))
    RETURNING 1
)
SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM batch), (SELECT max(b.created_at)::text FROM batch AS b)
"""  # noqa: S608 (a module constant, no input)

#: One batch of expired results; the prune repeats it until a batch comes back short. The keys
#: as an array (an InitPlan on ``ix_results_expires_at``, then ``pk_results``): as ``key IN
#: (SELECT ...)`` the planner hashed the whole table for each batch (258 ms a batch beside a
#: million results).
PRUNE_RESULTS_BATCH = f"""
DELETE FROM control_plane.results
WHERE key = ANY (ARRAY(SELECT key FROM control_plane.results WHERE expires_at <= now()
                       ORDER BY expires_at LIMIT {PRUNE_BATCH} FOR UPDATE SKIP LOCKED))
"""  # noqa: S608 (a module constant, no input)

#: Per queue: ready, scheduled, running, failed, completed in the last minute, oldest wait.
QUEUE_STATS = "SELECT * FROM control_plane.queue_stats ORDER BY queue"

#: QUEUE_STATS's rows under the Postgres broker, without reading the whole
#: history: the view counts live jobs by scanning every row of ``jobs``; the
#: message table holds exactly the live ones. A claimed message is ``running``
#: once its job is (a prefetched one is still ready, as in the view), failures
#: come from ``ix_jobs_queue_failed_at`` (migration 0018, an index-only scan) and recent
#: completions from the BRIN index of migration 0006. Without that index (PostgreSQL
#: before 16) the count reads all of ``jobs``, about 150 ms per million rows at every
#: scrape: past ``STATS_COMPLETED_SCAN_MAX_ROWS`` (PostgreSQL's estimate of the table's
#: rows) it is not counted, and ``completed_last_minute`` is NULL. Lists
#: the queues with live, failed or just-completed jobs and those that the
#: heartbeating workers' brokers declare, and the paused ones (``paused``, a column the
#: view has not: pauses are the Postgres broker's); a queue with only old finished jobs is
#: left out. One difference: a job re-queued by REAP (its worker died) counts
#: its wait from its message's ``eta``, when it first became due; the view,
#: from the reap, which sets ``scheduled_at``.
STATS_COMPLETED_SCAN_MAX_ROWS = 1_000_000

#: Run before the stats (``SET LOCAL`` in their transaction, or ``SET`` on a connection of
#: their own): the plan of the completions' count is priced
#: as a scan of the whole history, even where it reads nothing (the index, or not counted),
#: and PostgreSQL then compiled the statement (JIT) and started parallel workers: 91 ms
#: against 24 for the stats beside 3 million jobs on PostgreSQL 15.
STATS_SETTINGS = ("jit = off", "max_parallel_workers_per_gather = 0")
STATS_SESSION = "; ".join(f"SET LOCAL {setting}" for setting in STATS_SETTINGS)


def _completions_counted(completed_scan_max_rows: int) -> str:
    """The SQL condition under which the stats count the last minute's completions: the BRIN index
    is there and valid, or the history is within ``completed_scan_max_rows`` by PostgreSQL's estimate."""
    return f"""(EXISTS (SELECT FROM pg_index WHERE indexrelid = to_regclass('control_plane.ix_jobs_completed_at_brin')
                                   AND indisvalid)
     OR coalesce((SELECT c.reltuples FROM pg_class AS c
                  WHERE c.oid = 'control_plane.jobs'::regclass), 0) <= {int(completed_scan_max_rows)})"""  # noqa: S608


def queue_stats_via_messages(completed_scan_max_rows: int) -> str:
    """``QUEUE_STATS_VIA_MESSAGES`` with another bound on the history it reads without the BRIN index."""
    return _QUEUE_STATS_VIA_MESSAGES.replace("{completions_counted}", _completions_counted(completed_scan_max_rows))


#: Whether ``QUEUE_STATS_VIA_MESSAGES`` counts the last minute's completions: for a ``stats``
#: that has no row to show it on.
STATS_COMPLETIONS_COUNTED = f"SELECT {_completions_counted(STATS_COMPLETED_SCAN_MAX_ROWS)} AS counted"


_QUEUE_STATS_VIA_MESSAGES = """
WITH live AS (
    SELECT queue, eta, CASE WHEN eta <= now() THEN 'ready' ELSE 'scheduled' END AS state
    FROM control_plane.messages WHERE claim_token IS NULL
    UNION ALL
    -- claimed: a few per worker thread, each job looked up by id
    SELECT m.queue, m.eta,
           CASE WHEN (SELECT j.status FROM control_plane.jobs AS j WHERE j.id = m.id) = 'running'
                THEN 'running' ELSE 'ready' END
    FROM control_plane.messages AS m
    WHERE m.claim_token IS NOT NULL
), live_stats AS (
    SELECT queue,
           count(*) FILTER (WHERE state = 'ready') AS ready,
           count(*) FILTER (WHERE state = 'scheduled') AS scheduled,
           count(*) FILTER (WHERE state = 'running') AS running,
           min(eta) FILTER (WHERE state = 'ready') AS oldest_ready
    FROM live GROUP BY queue
), failed AS (
    SELECT queue, count(*) AS n FROM control_plane.jobs WHERE failed_at IS NOT NULL GROUP BY queue
), counted AS (
    -- (an InitPlan: false, and the count below reads nothing)
    SELECT {completions_counted} AS yes
), completed AS (
    SELECT queue, count(*) AS n FROM control_plane.jobs
    WHERE (SELECT yes FROM counted) AND completed_at > now() - interval '1 minute' AND status = 'completed'
    GROUP BY queue
), queues AS (
    SELECT queue FROM live_stats UNION SELECT queue FROM failed UNION SELECT queue FROM completed
    UNION SELECT unnest(queues) FROM control_plane.worker_heartbeats
    UNION SELECT queue FROM control_plane.queue_pauses
)
SELECT q.queue,
       coalesce(l.ready, 0) AS ready, coalesce(l.scheduled, 0) AS scheduled, coalesce(l.running, 0) AS running,
       coalesce(f.n, 0) AS failed,
       CASE WHEN (SELECT yes FROM counted) THEN coalesce(c.n, 0) END AS completed_last_minute,
       coalesce(extract(epoch FROM now() - l.oldest_ready), 0)::double precision AS oldest_ready_age_seconds,
       p.queue IS NOT NULL AS paused
FROM queues AS q
LEFT JOIN live_stats AS l USING (queue)
LEFT JOIN failed AS f USING (queue)
LEFT JOIN completed AS c USING (queue)
LEFT JOIN control_plane.queue_pauses AS p USING (queue)
ORDER BY q.queue
"""
QUEUE_STATS_VIA_MESSAGES = queue_stats_via_messages(STATS_COMPLETED_SCAN_MAX_ROWS)

#: Live workers, their heartbeats and how many messages each holds.
WORKERS = """
SELECT id, hostname, pid, queues, started_at, heartbeat_at,
       extract(epoch FROM silent_for)::double precision AS silent_seconds, in_flight
FROM control_plane.workers ORDER BY hostname, pid
"""

# -- periodic tasks: the clock (tasks.periodic) -----------------------------------

#: The latest tick recorded for each of some schedules: one probe of the primary key's end per
#: schedule. Grouped, it read every tick kept (a week of 1,000 every-minute schedules is 10
#: million rows: about 1.7 s for each clock at each minute; 849 ms against 17 on 4.3 million).
SCHEDULE_LAST_TICKS = """
SELECT n.name AS schedule_name, t.tick_at
FROM unnest(%(names)s::text[]) AS n (name)
CROSS JOIN LATERAL (SELECT max(l.tick_at) AS tick_at FROM control_plane.schedule_ticks AS l
                    WHERE l.schedule_name = n.name) AS t
WHERE t.tick_at IS NOT NULL
"""

#: Claim one tick of a schedule, in the clock's transaction (the job's message
#: is inserted in the same one). The primary key (schedule_name, tick_at)
#: decides between clocks: a second clock's insert waits for the first one's
#: transaction, then does nothing, and returns no row: only the winner
#: enqueues. A tick older than one already recorded is never claimed (a late
#: clock cannot run a tick that a newer one superseded).
CLAIM_TICK = """
INSERT INTO control_plane.schedule_ticks (schedule_name, tick_at, job_id)
SELECT %(name)s, %(tick_at)s, %(job_id)s::uuid
WHERE NOT EXISTS (SELECT 1 FROM control_plane.schedule_ticks
                  WHERE schedule_name = %(name)s AND tick_at > %(tick_at)s)
  -- never a tick ahead of the database's clock (a clock whose host runs ahead, of an older release)
  AND %(tick_at)s::timestamptz <= statement_timestamp() + interval '5 seconds'
ON CONFLICT (schedule_name, tick_at) DO NOTHING
RETURNING tick_at
"""

#: The job a claimed tick ended up with (the live job holding its unique key, when it had one).
SET_TICK_JOB = """
UPDATE control_plane.schedule_ticks SET job_id = %(job_id)s::uuid
WHERE schedule_name = %(name)s AND tick_at = %(tick_at)s
"""

#: Forget one schedule's ticks older than an age, but always keep its latest (it tells the
#: clock which tick ran last): the next schedule after ``after`` (NULL: the first), found by
#: the primary key; returns its name (NULL: none left) and how many of its ticks went. One
#: schedule per statement, each its own transaction: as one ``DELETE`` of every schedule's,
#: a day of 1,000 every-minute schedules took 12 s in one snapshot (2,883,000 ticks: 23 s).
PRUNE_SCHEDULE_TICKS_OF_NEXT = """
WITH next AS (
    SELECT min(s.schedule_name) AS name FROM control_plane.schedule_ticks AS s
    WHERE %(after)s::text IS NULL OR s.schedule_name > %(after)s::text
), gone AS (
    DELETE FROM control_plane.schedule_ticks AS t USING next
    WHERE t.schedule_name = next.name AND t.tick_at < now() - %(older_than)s::interval
      AND t.tick_at < (SELECT max(l.tick_at) FROM control_plane.schedule_ticks AS l
                       WHERE l.schedule_name = next.name)
    RETURNING 1
)
SELECT (SELECT name FROM next), (SELECT count(*) FROM gone)
"""

# -- rate limits (tasks.rate_limits): Dramatiq's RateLimiterBackend on a table ------
#
# A row whose expires_at has passed counts as absent: every statement reads
# ``CASE WHEN r.expires_at > now() THEN r.value ELSE 0 END`` as the live value,
# and writes refresh expires_at, as Redis' SET ... PX does.

#: Set ``key`` to ``value`` unless a live row has it. Returns a row when it did.
RATE_LIMIT_ADD = """
INSERT INTO control_plane.rate_limits AS r (key, value, expires_at)
VALUES (%(key)s, %(value)s, now() + make_interval(secs => %(ttl_ms)s / 1000.0))
ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at
WHERE r.expires_at <= now()
RETURNING r.value
"""

#: Add ``amount`` (negative to decrement) to ``key`` if the result stays within
#: [minimum, maximum] (a NULL bound: none); a missing or expired key counts as 0. Returns a
#: row when it did. An existing row is updated under its row lock, so concurrent callers are
#: applied one after the other, each against the value the previous one left; only when no
#: row was updated is one inserted, and only with a value within the bounds, so a row deleted
#: while this statement waited for it (the expired-row sweep, an operator) counts as missing,
#: never as a licence to store an out-of-bounds value.
RATE_LIMIT_ADJUST = """
WITH bumped AS (
    UPDATE control_plane.rate_limits AS r
       SET value = CASE WHEN r.expires_at > now() THEN r.value ELSE 0 END + %(amount)s::bigint,
           expires_at = now() + make_interval(secs => %(ttl_ms)s / 1000.0)
     WHERE r.key = %(key)s
       AND (%(minimum)s::bigint IS NULL
            OR CASE WHEN r.expires_at > now() THEN r.value ELSE 0 END + %(amount)s::bigint >= %(minimum)s::bigint)
       AND (%(maximum)s::bigint IS NULL
            OR CASE WHEN r.expires_at > now() THEN r.value ELSE 0 END + %(amount)s::bigint <= %(maximum)s::bigint)
    RETURNING r.value
), created AS (
    INSERT INTO control_plane.rate_limits AS r (key, value, expires_at)
    SELECT %(key)s, %(amount)s::bigint, now() + make_interval(secs => %(ttl_ms)s / 1000.0)
    WHERE NOT EXISTS (SELECT 1 FROM bumped)
      AND %(amount)s::bigint BETWEEN coalesce(%(minimum)s::bigint, %(amount)s::bigint)
                                 AND coalesce(%(maximum)s::bigint, %(amount)s::bigint)
    ON CONFLICT (key) DO UPDATE
       SET value = CASE WHEN r.expires_at > now() THEN r.value ELSE 0 END + excluded.value,
           expires_at = excluded.expires_at
     WHERE (%(minimum)s::bigint IS NULL
            OR CASE WHEN r.expires_at > now() THEN r.value ELSE 0 END + excluded.value >= %(minimum)s::bigint)
       AND (%(maximum)s::bigint IS NULL
            OR CASE WHEN r.expires_at > now() THEN r.value ELSE 0 END + excluded.value <= %(maximum)s::bigint)
    RETURNING r.value
)
SELECT value FROM bumped UNION ALL SELECT value FROM created
"""

#: A ``BucketRateLimiter``'s key named by the database's clock: ``<name>@<start of the bucket,
#: ms>``. Dramatiq names it by the host's clock, and a host 5 s ahead opened the next bucket
#: (a fresh count) while the others still counted in this one: twice the limit in a minute.
_BUCKET_KEY = ("(%(bucket_name)s || '@' || (floor(extract(epoch FROM statement_timestamp()) * 1000"
               " / %(bucket_ms)s::bigint) * %(bucket_ms)s::bigint)::bigint)")
RATE_LIMIT_ADD_BUCKET = RATE_LIMIT_ADD.replace("%(key)s", _BUCKET_KEY)
RATE_LIMIT_ADJUST_BUCKET = RATE_LIMIT_ADJUST.replace("%(key)s", _BUCKET_KEY)

#: Add ``amount`` to ``key`` unless the sum of ``keys`` (a sliding window's
#: buckets, ``key`` among them) would pass ``maximum``. Two statements sent as
#: one query string, hence one implicit transaction: the advisory lock on the
#: window (``group``) serialises its callers, and the upsert, which takes a new
#: snapshot, then sees every bucket its predecessors wrote. With ``window`` (seconds)
#: the buckets are the database's seconds, ``group@<epoch second>`` as Dramatiq names
#: them, not the caller's: hosts whose clocks differ count in the same window.
RATE_LIMIT_INCR_AND_SUM = """
SELECT pg_advisory_xact_lock(hashtext('control_plane.rate_limits'), hashtext(%(group)s));
WITH t AS (
    SELECT floor(extract(epoch FROM clock_timestamp()))::bigint AS s
), k AS (
    SELECT CASE WHEN %(window)s::int IS NULL THEN %(key)s ELSE %(group)s || '@' || t.s END AS key,
           CASE WHEN %(window)s::int IS NULL THEN %(keys)s::text[]
                ELSE ARRAY(SELECT %(group)s || '@' || (t.s - i) FROM generate_series(0, %(window)s::int - 1) AS i)
           END AS keys
    FROM t
), others AS (
    SELECT coalesce(sum(r.value), 0)::bigint AS total FROM control_plane.rate_limits AS r, k
    WHERE r.key = ANY(k.keys) AND r.key <> k.key AND r.expires_at > now()
)
INSERT INTO control_plane.rate_limits AS r (key, value, expires_at)
SELECT k.key, %(amount)s::bigint, now() + make_interval(secs => %(ttl_ms)s / 1000.0)
FROM others, k WHERE others.total + %(amount)s::bigint <= %(maximum)s::bigint
ON CONFLICT (key) DO UPDATE
   SET value = CASE WHEN r.expires_at > now() THEN r.value ELSE 0 END + excluded.value,
       expires_at = excluded.expires_at
 WHERE CASE WHEN r.expires_at > now() THEN r.value ELSE 0 END + excluded.value
       + (SELECT total FROM others) <= %(maximum)s::bigint
RETURNING r.value
"""

#: The NOTIFY channel of barrier events (``wait_notify``); the payload is the event key.
RATE_LIMIT_CHANNEL = "control_plane_rate_limits"

#: Publish an event on ``key`` (kept for ``ttl_ms``, so a late waiter sees it) and wake its waiters.
RATE_LIMIT_NOTIFY = """
WITH e AS (
    INSERT INTO control_plane.rate_limits AS r (key, value, expires_at)
    VALUES (%(key)s, 1, now() + make_interval(secs => %(ttl_ms)s / 1000.0))
    ON CONFLICT (key) DO UPDATE SET value = 1, expires_at = excluded.expires_at
    RETURNING r.key
)
SELECT pg_notify('control_plane_rate_limits', e.key) FROM e
"""

#: Whether an event was published on ``key`` (and has not expired).
RATE_LIMIT_EVENT = """
SELECT 1 FROM control_plane.rate_limits WHERE key = %(key)s AND expires_at > now() AND value > 0
"""

#: Delete expired counters, a batch at a time, skipping rows being written.
RATE_LIMIT_SWEEP_BATCH = 10_000
RATE_LIMIT_SWEEP = f"""
DELETE FROM control_plane.rate_limits
WHERE key IN (SELECT key FROM control_plane.rate_limits WHERE expires_at < now()
              ORDER BY expires_at LIMIT {RATE_LIMIT_SWEEP_BATCH} FOR UPDATE SKIP LOCKED)
"""  # noqa: S608 (a module constant, no input)

# -- the jobs mirror without the Postgres broker (BROKER_URL=amqp://...) ------------
#
# With the Postgres broker, the mirror rides on ENQUEUE, CLAIM and SETTLE above.
# With another broker, tasks.middleware.jobs_mirror writes these on its own
# connection, one statement per event of a message's life.

#: A message was sent. A row that already exists is left alone: a worker may have
#: started (or finished) the message before the sender got here, and a delayed
#: message moved to its queue by a worker is the same job.
MIRROR_ENQUEUED = """
INSERT INTO control_plane.jobs (id, type, queue, payload, options, priority, max_attempts, scheduled_at)
VALUES (%(id)s::uuid, %(actor)s, %(queue)s, %(payload)s::jsonb, %(options)s::jsonb, %(priority)s,
        %(max_attempts)s, coalesce(%(eta)s::timestamptz, now()))
ON CONFLICT (id) DO NOTHING
"""

#: An attempt started: running, one more attempt (the row is created if the send's write was lost or is late).
#: A row still running the same delivery (the same ``retries`` count: not a retry whose record
#: is late) is RabbitMQ delivering the message again after its worker was lost: that attempt
#: is recorded as lost, as the Postgres broker's reaper records an expired lease. When that lost
#: attempt was the job's last, nothing is written and no row returned: the worker fails the
#: job without running it (``MIRROR_FAILED``), as the reaper ends one (RabbitMQ's redelivery
#: never counts as a retry: a job that kills its worker was delivered, and killed one, forever).
_DELIVERED_AGAIN = ("%(redelivered)s IS NOT FALSE AND j.status = 'running'"
                    " AND coalesce(j.options ->> 'retries', '0') = coalesce(excluded.options ->> 'retries', '0')")
MIRROR_STARTED = """
INSERT INTO control_plane.jobs AS j (id, type, queue, payload, options, priority, max_attempts,
                                     status, attempts, started_at, worker)
VALUES (%(id)s::uuid, %(actor)s, %(queue)s, %(payload)s::jsonb, %(options)s::jsonb, %(priority)s,
        %(max_attempts)s, 'running', 1, now(), %(worker)s)
ON CONFLICT (id) DO UPDATE
   SET status = 'running', attempts = j.attempts + 1, started_at = now(), completed_at = NULL,
       updated_at = now(), worker = excluded.worker,
       -- a finished job starting again was sent again (or its ack lost): its attempts count afresh,
       -- as a finished job sent again on the Postgres broker (the send's own record may come late)
       attempts_before_retry = CASE WHEN j.status IN ('completed', 'failed', 'cancelled')
                                    THEN j.attempts ELSE j.attempts_before_retry END,
       last_error = CASE WHEN """ + _DELIVERED_AGAIN + """
                         THEN 'delivered again: worker ' || coalesce(j.worker, 'unknown')
                              || ' did not finish the attempt (killed, or cut off from RabbitMQ)'
                         ELSE j.last_error END,
       errors = CASE WHEN """ + _DELIVERED_AGAIN + """
                     THEN j.errors || jsonb_build_array(jsonb_build_object(
                              'attempt', j.attempts, 'at', now(), 'worker', j.worker,
                              'error', 'worker ' || coalesce(j.worker, 'unknown')
                                       || ' did not finish the attempt (killed, or cut off from RabbitMQ)'))
                     ELSE j.errors END
   WHERE NOT (""" + _DELIVERED_AGAIN + """ AND j.attempts - j.attempts_before_retry >= j.max_attempts)
RETURNING attempts
"""

#: The attempts of a job's run before the one now failing (``tasks.middleware.retries``), by the
#: jobs mirror, which counts those whose worker was lost (the reaper's, or a delivery again over
#: a ``running`` row): the message's ``retries`` counts only the failures Dramatiq retried.
#: The attempt now failing is counted once its start is written (``running``). A claim the
#: reaper took back before its start was written (``"started": false`` in ``errors``) is not
#: counted: most such are prefetched jobs of a worker lost running another (design.md).
ATTEMPTS_BEFORE = """
SELECT j.attempts - j.attempts_before_retry - CASE WHEN j.status = 'running' THEN 1 ELSE 0 END
       - (SELECT count(*) FROM jsonb_array_elements(CASE jsonb_typeof(j.errors) WHEN 'array' THEN j.errors END) AS e
          WHERE e -> 'started' = 'false'::jsonb
            AND CASE jsonb_typeof(e -> 'attempt') WHEN 'number' THEN (e ->> 'attempt')::numeric END
                > j.attempts_before_retry)
FROM control_plane.jobs AS j WHERE j.id = %(id)s::uuid
"""

#: The attempt succeeded.
MIRROR_COMPLETED = """
UPDATE control_plane.jobs
   SET status = 'completed', result = %(result)s::jsonb, completed_at = now(), updated_at = now()
WHERE id = %(id)s::uuid
"""

#: The attempt failed and will be retried after ``delay_ms``. The row is set ``pending``
#: only while it is still that attempt's (``attempt``, as ``MIRROR_STARTED`` returned it;
#: NULL when its start could not be recorded): the retry was published first, and a late
#: write would turn the retry's own start, or its completion, back into ``pending``. The
#: attempt's error is kept in ``errors`` either way.
MIRROR_RETRY = """
WITH t AS (
    SELECT id, CASE WHEN %(attempt)s::int IS NULL THEN status IN ('pending', 'running')
                    ELSE status = 'running' AND attempts = %(attempt)s END AS current
    FROM control_plane.jobs WHERE id = %(id)s::uuid FOR UPDATE
)
UPDATE control_plane.jobs AS j
   SET status = CASE WHEN t.current THEN 'pending' ELSE j.status END,
       last_error = CASE WHEN t.current THEN %(error)s ELSE j.last_error END,
       completed_at = CASE WHEN t.current THEN NULL ELSE j.completed_at END,
       scheduled_at = CASE WHEN t.current THEN now() + make_interval(secs => %(delay_ms)s / 1000.0)
                           ELSE j.scheduled_at END,
       options = CASE WHEN t.current THEN %(options)s::jsonb ELSE j.options END,
       updated_at = now(),
       errors = j.errors || jsonb_build_array(jsonb_build_object(
                    'attempt', coalesce(%(attempt)s::int, j.attempts), 'at', now(), 'error', %(error)s,
                    'worker', %(worker)s::text))
FROM t WHERE j.id = t.id
"""

#: The job failed for good: ``failed`` unless a later attempt holds the row (see ``MIRROR_RETRY``).
MIRROR_FAILED = """
WITH t AS (
    SELECT id, %(attempt)s::int IS NULL OR attempts = %(attempt)s AS current
    FROM control_plane.jobs WHERE id = %(id)s::uuid FOR UPDATE
)
UPDATE control_plane.jobs AS j
   SET status = CASE WHEN t.current THEN 'failed' ELSE j.status END,
       last_error = CASE WHEN t.current THEN %(error)s ELSE j.last_error END,
       completed_at = CASE WHEN t.current THEN now() ELSE j.completed_at END,
       updated_at = now(),
       errors = j.errors || jsonb_build_array(jsonb_build_object(
                    'attempt', coalesce(%(attempt)s::int, j.attempts), 'at', now(), 'error', %(error)s,
                    'worker', coalesce(%(worker)s::text, j.worker)))
FROM t WHERE j.id = t.id
"""

# -- metrics (tasks.metrics) --------------------------------------------------------

#: Live workers (Postgres broker only: RabbitMQ workers do not heartbeat here).
#: Worker processes that heartbeated within ``silent_after`` seconds (a lease: past it their
#: claims are taken back). A row of one killed outright stays until a live worker's reaper
#: forgets it; with every worker dead, nothing would, so the count must not rely on that.
LIVE_WORKERS = """
SELECT count(*) FROM control_plane.workers WHERE silent_for < make_interval(secs => %(silent_after)s)
"""


# -- controlplane migrate -------------------------------------------------------------

#: The other sessions holding locks on the control plane's tables, longest-running transaction first.
LOCK_HOLDERS = """
SELECT a.pid, a.usename, a.application_name, a.state,
       date_trunc('second', now() - coalesce(a.xact_start, a.query_start))::text AS for, a.query
FROM pg_stat_activity AS a
WHERE a.pid <> pg_backend_pid()
  AND a.pid IN (SELECT l.pid FROM pg_locks AS l
                JOIN pg_class AS c ON c.oid = l.relation
                JOIN pg_namespace AS n ON n.oid = c.relnamespace
                WHERE n.nspname = 'control_plane' AND l.granted)
ORDER BY a.xact_start NULLS LAST
"""
