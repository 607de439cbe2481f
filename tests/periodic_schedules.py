"""Schedules for the clock tests (``controlplane clock --module tests.periodic_schedules``)."""

from __future__ import annotations

from tasks.periodic import schedule
from tests import actors

EVERY_MINUTE = schedule("* * * * *", actors.noop, args=("tick",), name="tests.every_minute")
