"""SQLAlchemy 2.0 typed models of the control plane's tables, and the named queries on them.

The models, and SQLAlchemy with them, load on the first use of one of the
names below (PEP 562). The broker, the workers and the CLI's hot paths only
import :mod:`models.queries` and :mod:`models.project_queries`, which are SQL
text: a worker process starts without importing SQLAlchemy, about 0.4 s of CPU
less per process on the benchmark machine (``python -X importtime -c "import tasks"``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    tables = importlib.import_module("models.tables")  # defines every table on metadata
    value = getattr(tables if hasattr(tables, name) else importlib.import_module("models.base"), name)
    globals()[name] = value  # later lookups do not come back here
    return value
