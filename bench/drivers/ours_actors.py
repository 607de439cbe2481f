"""The actor ``ours`` runs in its benchmark workers: ``dramatiq tasks bench.drivers.ours_actors``.

Importing :mod:`tasks` configures this project's broker from the environment
(``DATABASE_URL``), with its full middleware list and the ``control_plane.jobs``
mirror, exactly as users run it.
"""

from __future__ import annotations

import dramatiq

import tasks  # noqa: F401  (configures the Postgres broker)
from bench.record import record


@dramatiq.actor(actor_name="bench.noop", queue_name="bench")
def noop(sent: float = 0.0) -> None:
    """A no-op job: it only notes when it started."""
    record(sent)
