"""Every SQL statement on ``control_plane.projects`` and ``control_plane.api_keys``, named."""

from __future__ import annotations

#: Serialise everything that claims or changes one project (held to the end of the transaction).
LOCK_PROJECT = "SELECT pg_advisory_xact_lock(hashtext('controlplane:project:' || %(project_id)s))"

#: On the control plane's database: one delivery of a project's roles step at a time (a second
#: waits, then finds the roles made), its key derived under the pepper (``secrets.lock_key``). Not on
#: the tenant server, where a tenant may read any held key in ``pg_locks`` and take it before the step
#: runs again. And in a tenant database one of its schema step at a time.
LOCK_ROLES_STEP = "SELECT pg_advisory_xact_lock(%(key)s::bigint)"
LOCK_SCHEMA_STEP = "SELECT pg_advisory_xact_lock(hashtext('controlplane:provision:schema'))"

#: Whether the project is still being provisioned by this run (its claiming job's id); run under
#: LOCK_PROJECT, which keeps a new claim of the id out until the caller's transaction ends.
IS_CURRENT_RUN = """
SELECT 1 FROM control_plane.projects
WHERE project_id = %(project_id)s AND status = 'provisioning' AND job_id IS NOT DISTINCT FROM %(run)s::uuid
"""

GET_PROJECT = """
SELECT project_id, tenant_id, payload, payload_hash, status, steps, secret_nonce, job_id,
       result, last_error, provisioned_at, waiting_job_ids::text[]
FROM control_plane.projects WHERE project_id = %(project_id)s
"""

#: The secrets' nonce (32 bytes, 244 of them random: PostgreSQL's gen_random_uuid reads its
#: strong random source) is made here, by the server: a nonce sent as a parameter would be in
#: the statement's text, where a server logging statements (``log_statement = 'mod'``, a slow
#: or failed statement) or anyone reading ``pg_stat_activity`` finds it; with the pepper it
#: gives every secret of the project, even after ``reveal_secrets`` erased it from the row.
INSERT_PROJECT = """
INSERT INTO control_plane.projects (project_id, tenant_id, payload, payload_hash, region, owner_id,
                                    organization_id, secret_nonce, secrets_expire_at, job_id, waiting_job_ids)
VALUES (%(project_id)s, %(tenant_id)s, %(payload)s, %(payload_hash)s, %(region)s, %(owner_id)s,
        %(organization_id)s, uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()),
        now() + make_interval(secs => %(secrets_ttl)s), %(job_id)s, %(waiting)s::uuid[])
RETURNING secret_nonce
"""

#: Whether the claiming job was retried by an operator (``control_plane.retry_job``, migration
#: 0014): its id may already have been the run of an earlier, undone run of the project id.
ENTRY_JOB_RETRIED = """
SELECT attempts_before_retry > 0 FROM control_plane.jobs WHERE id = %(job_id)s::uuid
"""

#: Record that a step started or finished (``event`` is 'started_at' or 'done_at').
MARK_STEP = """
UPDATE control_plane.projects
   SET steps = jsonb_set(steps, ARRAY[%(step)s],
                         coalesce(steps -> %(step)s, '{}'::jsonb)
                         || jsonb_build_object(%(event)s::text, now(), 'detail', %(detail)s::jsonb)),
       updated_at = now()
WHERE project_id = %(project_id)s AND status = 'provisioning' AND job_id IS NOT DISTINCT FROM %(run)s::uuid
RETURNING project_id
"""

#: Record that a step finished, once: a step delivered again after it finished
#: gets no row back and must not send the next step (the chain would fork).
MARK_STEP_DONE = """
UPDATE control_plane.projects
   SET steps = jsonb_set(steps, ARRAY[%(step)s],
                         coalesce(steps -> %(step)s, '{}'::jsonb)
                         || jsonb_build_object('done_at', now(), 'detail', %(detail)s::jsonb)),
       updated_at = now()
WHERE project_id = %(project_id)s AND status = 'provisioning' AND job_id IS NOT DISTINCT FROM %(run)s::uuid
  AND (steps -> %(step)s ->> 'done_at') IS NULL
RETURNING project_id
"""

INSERT_API_KEY = """
INSERT INTO control_plane.api_keys (project_id, slot, key_hash, hint)
VALUES (%(project_id)s, %(slot)s, %(key_hash)s, %(hint)s)
ON CONFLICT (project_id, slot) DO NOTHING
"""

LIST_API_KEYS = """
SELECT slot, hint, created_at, revoked_at FROM control_plane.api_keys
WHERE project_id = %(project_id)s ORDER BY slot
"""

REVOKE_API_KEYS = """
UPDATE control_plane.api_keys SET revoked_at = now()
WHERE project_id = %(project_id)s AND revoked_at IS NULL
"""

#: The secrets can be revealed for ``secrets_ttl`` from now: counted from the claim, a provision
#: that took longer (a service out for a day, provisioning paused meanwhile) went active with
#: secrets already expired, that nobody could ever read, and no way to make new ones.
ACTIVATE = """
UPDATE control_plane.projects
   SET status = 'active', provisioned_at = coalesce(provisioned_at, now()), result = %(result)s,
       last_error = NULL, updated_at = now(),
       secrets_expire_at = CASE WHEN secret_nonce IS NOT NULL THEN now() + make_interval(secs => %(secrets_ttl)s)
                           END
WHERE project_id = %(project_id)s AND status = 'provisioning' AND job_id IS NOT DISTINCT FROM %(run)s::uuid
RETURNING provisioned_at, job_id, waiting_job_ids::text[]
"""

SET_PROJECT_RESULT = """
UPDATE control_plane.projects SET result = %(result)s, updated_at = now() WHERE project_id = %(project_id)s
"""

#: Services a registration was attempted with (so compensation knows what to deregister).
TOUCH_SERVICE = """
UPDATE control_plane.projects
   SET steps = jsonb_set(steps, '{touched_services}',
                         (SELECT coalesce(jsonb_agg(DISTINCT s), '[]'::jsonb)
                          FROM jsonb_array_elements_text(coalesce(steps -> 'touched_services', '[]'::jsonb)
                                                         || to_jsonb(%(service)s::text)) AS s)),
       updated_at = now()
WHERE project_id = %(project_id)s AND job_id IS NOT DISTINCT FROM %(run)s::uuid AND status = 'provisioning'
"""

UNTOUCH_SERVICE = """
UPDATE control_plane.projects
   SET steps = jsonb_set(steps, '{touched_services}',
                         coalesce(steps -> 'touched_services', '[]'::jsonb) - %(service)s::text),
       updated_at = now()
WHERE project_id = %(project_id)s AND job_id IS NOT DISTINCT FROM %(run)s::uuid
"""

#: Start compensating a project that is still being provisioned (never an active one).
BEGIN_COMPENSATION = """
UPDATE control_plane.projects
   SET status = 'compensating', last_error = %(error)s, updated_at = now()
WHERE project_id = %(project_id)s AND status IN ('provisioning', 'compensating')
  AND (%(run)s::uuid IS NULL OR job_id = %(run)s::uuid)
RETURNING payload, job_id::text, coalesce(steps -> 'touched_services', '[]'::jsonb)
"""

#: Compensation finished: free the name (api_keys go with the row).
DELETE_PROJECT = """
DELETE FROM control_plane.projects
WHERE project_id = %(project_id)s AND status = 'compensating' AND job_id IS NOT DISTINCT FROM %(run)s::uuid
RETURNING job_id, waiting_job_ids::text[]
"""

MARK_NEEDS_OPERATOR = """
UPDATE control_plane.projects
   SET status = 'needs_operator', last_error = %(error)s, updated_at = now()
WHERE project_id = %(project_id)s AND status IN ('provisioning', 'compensating')
  AND (%(run)s::uuid IS NULL OR job_id = %(run)s::uuid)
RETURNING job_id, waiting_job_ids::text[]
"""

#: A later provision_project job of the same payload waits for the outcome with the first
#: (``job_id``); run under LOCK_PROJECT, as everything that delivers the outcome is.
ADD_WAITING_JOB = """
UPDATE control_plane.projects
   SET waiting_job_ids = array_append(waiting_job_ids, %(job_id)s::uuid)
WHERE project_id = %(project_id)s AND status IN ('provisioning', 'compensating')
  AND job_id IS DISTINCT FROM %(job_id)s::uuid AND NOT %(job_id)s::uuid = ANY(waiting_job_ids)
"""

#: Erase the secrets' nonce of projects past their secrets' expiry that no step needs any more
#: (active, being undone, or waiting for an operator): nobody can derive those secrets again.
FORGET_EXPIRED_SECRETS = """
UPDATE control_plane.projects SET secret_nonce = NULL, secrets_expire_at = NULL, updated_at = now()
WHERE secret_nonce IS NOT NULL AND secrets_expire_at < now() AND status <> 'provisioning'
RETURNING project_id
"""

#: Take the secrets' nonce, once: the caller reads the secrets, then they are gone.
TAKE_SECRET_NONCE = """
UPDATE control_plane.projects AS p SET secret_nonce = NULL, secrets_expire_at = NULL, updated_at = now()
FROM (SELECT project_id, secret_nonce, secrets_expire_at FROM control_plane.projects
      WHERE project_id = %(project_id)s FOR UPDATE) AS old
WHERE p.project_id = old.project_id AND old.secret_nonce IS NOT NULL
RETURNING old.secret_nonce, old.secrets_expire_at > now() AS fresh, p.status, p.payload
"""

#: Projects mid-workflow with no live job to move them on (a pending step cancelled by an
#: operator, a message deleted by hand): the sweeper hands them to compensation.
_ORPHANED_PROJECTS = """
SELECT p.project_id, p.job_id::text FROM control_plane.projects AS p
WHERE p.status IN ('provisioning', 'compensating')
  AND p.updated_at < now() - make_interval(secs => %(older_than)s)
  AND NOT EXISTS (
      SELECT 1 FROM {live_jobs}
      WHERE j.status IN ('pending', 'running')
        AND (j.type = 'provision_project' OR j.type LIKE 'provision_project.%%')
        AND p.project_id IN (j.payload #>> '{{args,0}}', j.payload #>> '{{args,0,project_id}}',
                             j.payload #>> '{{args,0,args,0}}', j.payload #>> '{{args,0,args,0,args,0}}'))
ORDER BY p.updated_at
LIMIT 100
"""
#: With any broker (RabbitMQ's): one scan of the jobs history (it has no index on ``status``),
#: hashed for every stuck project, and none while no project is stuck: 34 to 110 ms at 100,000
#: jobs with 1 and 10 stuck (a review's measure, EXPLAIN ANALYZE), once per sweep.
ORPHANED_PROJECTS = _ORPHANED_PROJECTS.format(live_jobs="control_plane.jobs AS j")
#: With the Postgres broker, whose message table holds exactly the live jobs: through that small table.
ORPHANED_PROJECTS_VIA_MESSAGES = _ORPHANED_PROJECTS.format(
    live_jobs="control_plane.messages AS m JOIN control_plane.jobs AS j ON j.id = m.id"
)

#: Callers' jobs that still show the accepted handle as their result: candidates whose outcome
#: may have been delivered before their own completion was written (which then wrote the handle
#: over it). Through ``ix_jobs_type_created_at``, within the results' lifetime.
STALE_ENTRY_JOBS = """
SELECT id::text FROM control_plane.jobs
WHERE type = 'provision_project' AND created_at > now() - make_interval(secs => %(within)s)
  AND status = 'completed' AND result ->> 'status' IN ('provisioning', 'compensating')
ORDER BY created_at
LIMIT 1000
"""

#: The workflow's outcome, written onto the jobs its callers got from send(): a failure clears
#: the handle they completed with (``{"status": "provisioning"}`` beside ``failed`` misled).
RECORD_ON_ENTRY_JOBS = """
UPDATE control_plane.jobs
   SET result = CASE WHEN %(error)s::text IS NULL THEN coalesce(%(result)s, result) END,
       status = CASE WHEN %(error)s::text IS NULL THEN status ELSE 'failed' END,
       last_error = coalesce(%(error)s, last_error),
       errors = CASE WHEN %(error)s::text IS NULL THEN errors
                ELSE errors || jsonb_build_array(jsonb_build_object(
                         'attempt', attempts, 'at', now(), 'error', %(error)s::text)) END,
       updated_at = now()
WHERE id = ANY(%(job_ids)s::uuid[]) AND status IN ('completed', 'failed')
"""


#: The deployment's API key pepper fingerprint: this one if it has none yet (the first use of a
#: pepper in this database), else the one recorded (migration 0013).
PEPPER_FINGERPRINT = """
WITH first AS (
    INSERT INTO control_plane.deployment (name, value) VALUES ('api_key_pepper_fingerprint', %(fingerprint)s)
    ON CONFLICT (name) DO NOTHING
    RETURNING value
)
SELECT value FROM first
UNION ALL
SELECT value FROM control_plane.deployment WHERE name = 'api_key_pepper_fingerprint'
"""

RECORDED_PEPPER = "SELECT value FROM control_plane.deployment WHERE name = 'api_key_pepper_fingerprint'"

#: Whether the deployment has made any API key (with some pepper) yet.
ANY_API_KEY = "SELECT 1 FROM control_plane.api_keys LIMIT 1"

#: The stored hash of a project's first key: what a reveal checks its derivation against.
FIRST_KEY_HASH = "SELECT key_hash FROM control_plane.api_keys WHERE project_id = %(project_id)s AND slot = 1"
