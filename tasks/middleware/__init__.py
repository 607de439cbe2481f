"""Dramatiq middleware of the control plane, one class per module."""

from __future__ import annotations

from tasks.middleware.async_actors import AsyncActors
from tasks.middleware.callbacks import Callbacks
from tasks.middleware.cancellation import Cancellation
from tasks.middleware.canvas import GroupCallbacks, Pipelines
from tasks.middleware.jobs_mirror import JobsMirror, StandaloneMirror, describe_error
from tasks.middleware.log_context import LogContext
from tasks.middleware.option_checks import OptionChecks, SendOptionChecks
from tasks.middleware.retries import UNLIMITED_ATTEMPTS, Retries, max_attempts_for
from tasks.middleware.time_ordered_ids import TimeOrderedActor, TimeOrderedIds, time_ordered_id
from tasks.middleware.unique_keys import UniqueKeys

__all__ = [
    "UNLIMITED_ATTEMPTS",
    "AsyncActors",
    "Callbacks",
    "Cancellation",
    "GroupCallbacks",
    "JobsMirror",
    "LogContext",
    "OptionChecks",
    "Pipelines",
    "Retries",
    "SendOptionChecks",
    "StandaloneMirror",
    "TimeOrderedActor",
    "TimeOrderedIds",
    "UniqueKeys",
    "describe_error",
    "max_attempts_for",
    "time_ordered_id",
]
