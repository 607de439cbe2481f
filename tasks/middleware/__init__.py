"""Dramatiq middleware of the control plane, one class per module."""

from __future__ import annotations

from tasks.middleware.jobs_mirror import JobsMirror, describe_error
from tasks.middleware.log_context import LogContext
from tasks.middleware.retries import Retries, max_attempts_for

__all__ = ["JobsMirror", "LogContext", "Retries", "describe_error", "max_attempts_for"]
