"""Dramatiq's pipelines and group callbacks, made safe against a message delivered twice.

Delivery is at least once: a worker killed after a job's work but before its
outcome was written gets the message delivered again. Dramatiq's middleware
acts on each delivery:

* ``GroupCallbacks`` counted the redelivered child a second time on the group's
  barrier: the completion callback fired before the last child had run, and
  again when it had;
* ``Pipelines`` sent the next step again, under its fixed id, which put a step
  that had already completed back in the queue (and every step after it).

On the Postgres broker both now act once per message, in one transaction with
what they send: a group child is counted with a marker row of its own
(``<group>@done:<message id>`` in ``control_plane.rate_limits``, for the
barrier's TTL: a redelivery comes within a lease), in one statement of its own
for a child that is not the last, and the callbacks are sent in the transaction that
counts the last one; a pipeline's next step is sent only if this run of the step has not sent
it yet (under an advisory lock on the id, so two deliveries at once send it once; a
pipeline run again, its finished steps re-sent under their ids, is a new run). Either
commits with its sends, or neither happens. A hook's failure is not redelivered
(the message is acknowledged after its hooks whatever they raise), so a
deadlock is tried again here, three times, and a database out of reach (a
restart, a crash's recovery) for up to ten minutes. Past that, or on any other
failure (a next step or a callback that cannot be sent: a result JSON cannot hold,
an option stored by a release that did not check it, a ``before_enqueue`` hook that
refuses it with a ``MiddlewareError``), the job ends ``failed`` with a ``FollowUpNotSent`` error that says what was
not sent and why, and a pipeline's caller hears it at once; Dramatiq's hooks logged
it and the job was ``completed``, the pipeline or group stopped with nothing an
operator queries saying so. Its ``on_final_failure`` hook is sent (not ``on_failure``: its
actor returned). ``retry_job`` runs the job again, and its hook. A
pipeline's later steps and a group's callbacks are checked when the pipeline or
group is sent (``check_follow_ups``), so most such faults are the caller's error
at the send. A barrier gone before its last child
(expired: children retried past ``barrier_ttl``) sends no callback, and says so,
where Dramatiq's fired it at the next child and again at each one after. A
pipeline step redelivered after its next step's job was pruned (days later)
sends it again. A step whose worker died after its hook committed, on its last
attempt, is marked ``completed`` by the reaper, not failed (``REAP`` in
``models/queries.py``): its pipeline or group went on.

A pipeline step whose result cannot be sent on (JSON or PostgreSQL cannot hold
it) breaks the chain: Dramatiq logged it and the caller of
``pipeline.get_result`` waited out its timeout. The step now fails, as above, and
its caller hears why (under another broker, the last message's result is a
``NotSerializable`` failure saying so). So with a step that fails for good
(its last attempt raised, ran past its time limit, was cancelled, skipped by
``max_age``, or its worker was lost): the rest of the pipeline never runs, and
its caller hears the step's failure at once, as a Celery chain's caller does,
with the step named (``the pipeline stopped at ACTOR (job ID): ...``).

With another broker (``BROKER_URL``) sends cannot join a transaction: Dramatiq's
behaviour, unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

import dramatiq
import psycopg2
from dramatiq.message import Message
from dramatiq.middleware import group_callbacks as dramatiq_groups
from dramatiq.middleware import pipelines as dramatiq_pipelines
from dramatiq.results import Results

from models import queries
from tasks import db
from tasks.errors import Conflict, FollowUpNotSent, NotSerializable
from tasks.middleware.jobs_mirror import describe_error
from tasks.prepared import Statement
from tasks.redaction import persistable

if TYPE_CHECKING:
    from tasks.broker import PostgresBroker

logger = logging.getLogger(__name__)

T = TypeVar("T")


#: The option a pipeline's next step is sent with (see ``models.queries.PIPE_SENT_BY``).
PIPE_SENT_BY = queries.PIPE_SENT_BY

#: A group member's pass, prepared on the pool's autocommit connections: PostgreSQL spent
#: about four times as long planning this statement as running it (0.5 against 0.14 ms).
_CHILD_PASS = Statement("control_plane_child_pass", queries.CHILD_PASS)

#: Tries of a hook's transaction that the server rolled back (a deadlock), or whose wait for a lock
#: timed out: its failure cannot be
#: retried by redelivery (the message is acked after its hooks whatever they raise).
TRIES = 3
#: A hook's statement that gave up waiting (a ``lock_timeout`` or ``statement_timeout`` of the
#: role's or the server's, behind a barrier's row lock held long): tried again as a deadlock is.
_GIVEN_UP_WAITING = (psycopg2.errors.LockNotAvailable, psycopg2.errors.QueryCanceled)
#: How long a hook's transaction is tried again while the database cannot be reached (a restart,
#: a crash's recovery, a failover), as the settler tries its outcomes: three tries in 0.6 s lost
#: the group's callbacks or the pipeline's next steps at any restart, their jobs ``completed``
#: (a helper's review crashed the server 23 times). A try again is safe: the markers count a
#: child once and send a next step once, even when a lost answer hid a commit.
OUTAGE_SECONDS = 600.0


def _in_one_transaction(broker: Any, work: Callable[[Any], T], *, one_statement: bool = False) -> T:
    """Run ``work(conn)`` in one transaction on a pooled connection; again on a transient failure,
    and while the database cannot be reached, for ``OUTAGE_SECONDS``.

    With ``one_statement`` the work is a single statement, its own transaction (autocommit):
    no ``BEGIN`` and ``COMMIT`` round trips, and no lock it takes held across them."""
    deadline = time.monotonic() + OUTAGE_SECONDS
    attempt = 0
    while True:
        attempt += 1
        try:
            if one_statement:
                with broker.connection() as conn:
                    return work(conn)
            with db.transaction(broker.connection) as conn:
                return work(conn)
        except psycopg2.Error as exc:
            if db.is_connection_error(exc):
                if time.monotonic() > deadline:
                    raise
                logger.warning("%s; trying again (try %d, for %.0f s more)", db.loggable_error(exc), attempt + 1,
                               max(deadline - time.monotonic(), 0))  # fmt: skip
            elif (db.is_transient(exc) or isinstance(exc, _GIVEN_UP_WAITING)) and attempt < TRIES:
                logger.warning("%s; trying again (%d of %d)", db.loggable_error(exc), attempt + 1, TRIES)
            else:
                raise
            time.sleep(min(0.1 * 2**attempt, 5.0))


def _store_its_result(conn: Any, message: Any) -> None:
    """Store the result ``message`` carries for its outcome (``tasks.results``) in this hook's transaction.

    A step whose hook sent its pipeline on (or counted it in its group) and whose worker
    died before its outcome was written is completed by the reaper: its result must not
    have died with the worker. It is then seen a moment before the step's jobs row ends,
    and the outcome does not write it again. While another session holds
    ``control_plane.results`` (past ``RESULTS_LOCK_TIMEOUT``), the result is left to the
    outcome, which does not wait for that table either: this worker thread must not.
    """
    from tasks.broker import RESULTS_LOCK_TIMEOUT, store_results

    stored = getattr(message, "stored_result", None)
    if stored is None:
        return
    message.result_stored_by_hook = False  # (a claimed message: this hook's transaction may be tried again)
    with conn.cursor() as cur:
        if not db.within_lock_timeout(cur, "its_result", RESULTS_LOCK_TIMEOUT, lambda: store_results(cur, [stored])):
            return
    message.result_stored_by_hook = True


def _went_on(message: Any) -> None:
    """The hook's transaction committed: a result it stored is not the outcome's to write."""
    if getattr(message, "result_stored_by_hook", False):
        message.stored_result = None


def _follow_up_failed(broker: dramatiq.Broker, message: Any, what: str, exc: Exception) -> None:
    """The job ``message`` ran, but ``what`` (its pipeline's next step, its count on its group's
    barrier) failed past its hook's tries: the job ends ``failed`` with a :class:`FollowUpNotSent`
    saying so, its result that failure, and a pipeline's caller hears it (``before_nack``).

    Dramatiq logs a hook's exception and acknowledges the message: the job was ``completed``,
    its pipeline stopped or its group's callbacks never sent, and nothing an operator queries
    said so. ``retry_job`` of the failed job runs it again, and its hook with it."""
    from tasks.middleware.retries import Retries

    if not hasattr(message, "fail"):
        raise exc  # a bare Message (no delivery: nothing to fail)
    # (a database error's str() quotes the statement's parameters and the server's DETAIL)
    cause = db.loggable_error(exc) if isinstance(exc, psycopg2.Error) else describe_error(exc, message, broker)
    failure = FollowUpNotSent(f"the job ran, but {what}: {cause}")
    message.stuff_exception(failure)
    message.error_text = describe_error(failure, message, broker)
    message.fail()
    logger.error("%s", message.error_text)
    # It failed for good: its on_final_failure hook is sent, as for a job whose retries are spent
    # (not on_failure, Dramatiq's hook of an attempt that raised: this one's actor returned).
    for middleware in broker.middleware:
        if isinstance(middleware, Retries):
            try:
                middleware.send_final_failure(broker, message, failure)
            except Exception as send_error:
                logger.error("its on_final_failure hook could not be sent: %s", db.loggable_error(send_error))


def _sent_as_itself(sent: Message[Any], queued: Message[Any], what: str, no_part_of: str, keep_off: str) -> None:
    """Raise ``Conflict`` when the send of a follow-up ``sent`` returned another job, ``queued``: a
    duplicate of a live job holding its unique key, which is no ``no_part_of`` (it was sent
    before, and has none of this run's results nor what comes after). Raised in the hook's
    transaction, it rolls back with the marker or count: a retry of the job, once the holder
    ended, sends it again."""
    if queued.message_id != sent.message_id:
        raise Conflict(
            f"job {queued.message_id} holds its unique key {queued.options.get('unique_key')!r}: {what} would be "
            f"that job, which is no {no_part_of}; keep unique keys off {keep_off}"
        )


def _postgres(broker: dramatiq.Broker) -> TypeGuard[PostgresBroker]:
    from tasks.broker import PostgresBroker

    return isinstance(broker, PostgresBroker)


def _group_marker(group: str, message_id: str) -> str:
    """A group member's marker row (``control_plane.rate_limits``): counted on its barrier."""
    return f"{group}@done:{message_id}"


def _this_runs_send(cur: Any, step_id: str, next_id: str) -> tuple[str, bool]:
    """This run of the pipeline step ``step_id`` (its marker: its id and its attempts when it was
    last sent; a re-sent finished step, a pipeline run again, starts a new run, a redelivery does
    not), and whether it sent its next step ``next_id`` already (so did a send before the marker
    existed, which has none)."""
    cur.execute(queries.PIPE_SENT, {"id": step_id, "next": next_id})
    run, exists, sent_by = cur.fetchone()
    marker = f"{step_id}/{run}"
    return marker, bool(exists) and sent_by in (None, marker)


class GroupCallbacks(dramatiq_groups.GroupCallbacks):
    """A group's completion callbacks, sent once: each child counted once, with the sends."""

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        group = message.options.get("group_completion_uuid")
        callbacks = message.options.get("group_completion_callbacks")
        if exception is not None or not (group and callbacks) or not _postgres(broker):
            super().after_process_message(broker, message, result=result, exception=exception)  # type: ignore[no-untyped-call]
            return
        try:
            if getattr(message, "stored_result", None) is not None:
                # Committed before the child is counted: a child counted is completed by the
                # reaper if its worker dies, and its result must not have died with the worker.
                _in_one_transaction(broker, lambda conn: _store_its_result(conn, message))
                _went_on(message)
            # Every child but the last passes in one statement of its own: all of them take the
            # barrier's row lock, and holding it across the client's COMMIT (with the worker's
            # other threads holding the GIL) made a group with a callback drain at a ninth of the
            # rate of one without. One that may be the last is counted with its callbacks' sends.
            prepare = broker.settings.prepared_statements
            if not _in_one_transaction(broker, lambda conn: self._pass(conn, message, group, prepare),
                                       one_statement=True):  # fmt: skip
                _in_one_transaction(broker, lambda conn: self._pass_last(broker, conn, message, group, callbacks))
        except Exception as exc:
            _follow_up_failed(broker, message, f"it could not be counted in its group {group}, whose completion "
                                               "callbacks wait for it", exc)  # fmt: skip
            return
        # Its ack is written only while this marker is there: a pass (committed without the WAL
        # flush) that a server crash undid while the claim held is not taken for done.
        with contextlib.suppress(AttributeError):  # (a bare Message, frozen: no ack to write)
            message.group_marker = _group_marker(group, message.message_id)

    def _pass(self, conn: Any, message: Any, group: str, prepare: bool) -> bool:
        """Count ``message`` on its group's barrier in one statement, unless it may be the last
        party: whether it is done with (counted now or before, or its barrier gone)."""
        counted, before = self._count(conn, message, group, last=False, prepare=prepare)
        return counted or before is None or before > 1

    def _pass_last(self, broker: Any, conn: Any, message: Any, group: str, callbacks: list[dict[str, Any]]) -> None:
        """Count ``message`` even as its group's last party, and if it is, send the callbacks."""
        from tasks.broker import enqueue_in

        counted, before = self._count(conn, message, group, last=True)
        if counted and before is not None and before <= 1:
            with enqueue_in(conn):
                for callback in callbacks:
                    sent: Message[Any] = Message(**callback)
                    _sent_as_itself(sent, broker.enqueue(sent),
                                    f"the completion callback ({sent.actor_name}, job {sent.message_id})",
                                    "callback of this group", "groups' callbacks")  # fmt: skip

    def _count(
        self, conn: Any, message: Any, group: str, *, last: bool, prepare: bool = False
    ) -> tuple[bool, int | None]:
        """``queries.CHILD_PASS``: whether this delivery counted the child, and the barrier's
        count before (None: the barrier is gone). Prepared with ``prepare`` on an autocommit
        connection (the last party's pass is in a transaction: plain)."""
        with conn.cursor() as cur:
            # The child's marker lives the barrier's TTL from now: a redelivery comes within a lease.
            _CHILD_PASS.execute(cur, {"marker": _group_marker(group, message.message_id), "key": group,
                                      "ttl_ms": self.barrier_ttl, "last": last}, prepare=prepare)  # fmt: skip
            counted, before, _ = cur.fetchone()
        if counted and before is None:
            # Gone: expired (children retried past barrier_ttl) or swept. Dramatiq would fire the
            # callbacks now, before the group is done, and again at each later child: not here.
            logger.warning(
                "group %s: its barrier expired before all its children finished (barrier_ttl %d ms); "
                "its completion callbacks are not sent",
                group,
                self.barrier_ttl,
            )
        return counted, before


class Pipelines(dramatiq_pipelines.Pipelines):
    """A pipeline's next step, sent once; a result that cannot be sent on fails the pipeline's result."""

    def after_process_message(
        self,
        broker: dramatiq.Broker,
        message: Any,
        *,
        result: Any = None,
        exception: BaseException | None = None,
    ) -> None:
        target = message.options.get("pipe_target")
        if exception is not None or message.failed or target is None:
            return
        next_message: Message[Any] = Message(**target)
        pipe_ignore = next_message.options.get("pipe_ignore") or broker.get_actor(message.actor_name).options.get(
            "pipe_ignore"
        )
        if not pipe_ignore:
            next_message = next_message.copy(args=(*next_message.args, result))
        if _postgres(broker):
            try:
                self._send_once(broker, message, next_message)
            except Exception as exc:  # (its caller is told by before_nack, as of any step that failed)
                _follow_up_failed(broker, message, f"its pipeline's next step ({next_message.actor_name}, job "
                                                   f"{next_message.message_id}) could not be sent", exc)  # fmt: skip
            return
        try:
            broker.enqueue(next_message, delay=next_message.options.get("delay"))
        except NotSerializable as exc:
            self._fail_the_pipeline(broker, next_message, exc)
            raise

    @staticmethod
    def _send_once(broker: Any, message: Any, next_message: Message[Any]) -> None:
        from tasks.broker import enqueue_in

        def send(conn: Any) -> None:
            _store_its_result(conn, message)
            with conn.cursor() as cur:
                # Two deliveries at once wait here for each other; the second finds the job.
                cur.execute(queries.LOCK_SEND_ONCE, {"id": next_message.message_id})
                marker, sent = _this_runs_send(cur, message.message_id, next_message.message_id)
            if sent:
                return
            with enqueue_in(conn):
                queued = broker.enqueue(
                    next_message.copy(options={**next_message.options, PIPE_SENT_BY: marker}),
                    delay=next_message.options.get("delay"),
                )
            _sent_as_itself(next_message, queued, "the step", "step of this pipeline", "pipelines' steps")

        _in_one_transaction(broker, send)
        _went_on(message)

    def before_nack(self, broker: dramatiq.Broker, message: Any) -> None:
        """A step failed for good: the rest of its pipeline never runs, so the caller waiting on
        the last message's result hears why now, not at the end of its timeout. Before the
        step's outcome is written: an operator's retry of the step (which needs it failed)
        then always comes after, and forgets this failure (migration 0020)."""
        try:
            last = pipeline_end(message)
        except (TypeError, ValueError, AttributeError):
            return  # a next step that is no message (written by hand): no caller waits on it
        if last is None or not message.failed or self._sent_on_by_this_run(broker, message):
            return
        error = getattr(message, "error_text", None) or (
            describe_error(message._exception, message, broker) if message._exception is not None else "Rejected"
        )
        kind, _, text = error.partition(": ")
        _tell_the_pipelines_caller(broker, last, kind, stopped_at(message.actor_name, message.message_id,
                                                                  text or kind or "it failed"))  # fmt: skip

    @staticmethod
    def _sent_on_by_this_run(broker: dramatiq.Broker, message: Any) -> bool:
        """Whether this run of the step ``message`` sent its next step: its pipeline went on. (A
        worker cut off past its lease, whose step was put back before its hook committed the
        send: the step's delivery again that fails must not tell the caller the pipeline stopped
        while its next steps run. The reaper ends such a step ``completed`` when it sees the send.)"""
        if not _postgres(broker):
            return False
        try:
            with broker.connection() as conn, conn.cursor() as cur:
                _, sent = _this_runs_send(cur, message.message_id, message.options["pipe_target"]["message_id"])
        except (psycopg2.Error, KeyError, TypeError) as exc:
            logger.warning("could not tell whether pipeline step %s went on (%s)", message.message_id,
                           db.loggable_error(exc))  # fmt: skip
            return False
        if not sent:
            return False
        logger.warning("pipeline step %s failed on a delivery after this run of it had sent its next step: "
                       "the pipeline went on, its caller is not told it stopped", message.message_id)
        return True

    @staticmethod
    def _fail_the_pipeline(broker: dramatiq.Broker, next_message: Message[Any], exc: NotSerializable) -> None:
        """Store the failure as the result of the pipeline's last message, which its caller waits on."""
        last = pipeline_end(next_message) or next_message
        _tell_the_pipelines_caller(
            broker, last, type(exc).__name__, f"the pipeline stopped before {next_message.actor_name}: {exc}"
        )


def forget_last_runs_results(broker: dramatiq.Broker, first_steps: list[Message[Any]]) -> None:
    """Pipelines run (again): their callers wait for this run's result, not for the last run's,
    which Dramatiq's gave at once while this run's steps were still to come. (The Postgres
    broker calls it for the messages it sends with a next step and not sent by a step.)"""
    from tasks.results import PostgresBackend

    lasts = []
    for first in first_steps:
        try:
            last = pipeline_end(first)
        except (TypeError, ValueError, AttributeError):
            continue  # a next step that is no message (written by hand): no caller waits on it
        if last is not None:
            lasts.append(last)
    for middleware in broker.middleware:
        if isinstance(middleware, Results) and isinstance(middleware.backend, PostgresBackend) and lasts:
            if not middleware.backend.forget(lasts):
                logger.warning("%d pipeline(s) sent while control_plane.results is locked: the caller of one "
                               "that ran before may get that run's result until this run's comes (last messages: %s)",
                               len(lasts), ", ".join(last.message_id for last in lasts))


def pipeline_end(message: Message[Any]) -> Message[Any] | None:
    """The last message of the pipeline whose step ``message`` is (None: it is the last, or no step)."""
    target = message.options.get("pipe_target")
    if target is None:
        return None
    last: Message[Any] = Message(**target)
    while last.options.get("pipe_target") is not None:
        last = Message(**last.options["pipe_target"])
    return last


def stopped_at(actor_name: str, job_id: str, why: str) -> str:
    """What a pipeline's caller hears of the step that stopped it (0020's SQL says it the same way)."""
    return f"the pipeline stopped at {actor_name} (job {job_id}): {why}"


def pipeline_failure(
    results: Results, last: Message[Any], kind: str, text: str, broker: dramatiq.Broker
) -> tuple[str, Any, int]:
    """The key, the failure (as ``wrap_exception`` writes one, ``kind`` the type's name) and the
    lifetime of the result that tells the caller of ``last`` its pipeline stopped: the one
    ``last``'s own result would have had (``tasks.broker.result_ttl_for``)."""
    from tasks.broker import result_ttl_for

    wrapped = {"__t": "dramatiq.results.Result", "exn": {"type": kind or "Exception", "msg": persistable(text)}}
    return results.backend.build_message_key(last), wrapped, result_ttl_for(results, last, broker)


def _tell_the_pipelines_caller(broker: dramatiq.Broker, last: Message[Any], kind: str, text: str) -> None:
    """Store a failure as the result of the pipeline's last message ``last``, at once (on the
    Postgres backend, waiting for the results table as briefly as an outcome does)."""
    from tasks.results import PostgresBackend

    for middleware in broker.middleware:
        if isinstance(middleware, Results):  # none: nobody waits on a result
            key, wrapped, ttl = pipeline_failure(middleware, last, kind, text, broker)
            backend = middleware.backend
            try:
                if isinstance(backend, PostgresBackend):
                    backend.store_soon(key, wrapped, ttl, broker)
                else:
                    backend._store(key, wrapped, ttl)
            except Exception as store_error:  # the hook's own failure is what is reported
                logger.warning("could not store the pipeline's failure: %s", db.loggable_error(store_error))


__all__ = [
    "PIPE_SENT_BY",
    "GroupCallbacks",
    "Pipelines",
    "forget_last_runs_results",
    "pipeline_end",
    "pipeline_failure",
    "stopped_at",
]
