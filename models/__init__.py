"""SQLAlchemy 2.0 typed models of the control plane's tables, and the named queries on them."""

from __future__ import annotations

from models.base import SCHEMA, Base, metadata
from models.tables import (
    JOB_STATUSES,
    PROJECT_STATUSES,
    ApiKey,
    Job,
    Message,
    Project,
    RateLimit,
    Result,
    ScheduleTick,
    Worker,
)

__all__ = [
    "JOB_STATUSES",
    "PROJECT_STATUSES",
    "SCHEMA",
    "ApiKey",
    "Base",
    "Job",
    "Message",
    "Project",
    "RateLimit",
    "Result",
    "ScheduleTick",
    "Worker",
    "metadata",
]
