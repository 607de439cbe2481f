"""Two every-minute schedules for a clock of the tests (``--module tests.clock_pair_schedules``)."""

from __future__ import annotations

from tasks.periodic import schedule
from tests import actors

FIRST = schedule("* * * * *", actors.noop, args=("a",), name="tests.pair_a")
SECOND = schedule("* * * * *", actors.noop, args=("b",), name="tests.pair_b")
