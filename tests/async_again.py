"""A user module that adds Dramatiq's AsyncIO itself, as Dramatiq's documentation says to."""

from __future__ import annotations

from dramatiq.middleware.asyncio import AsyncIO

import tasks
from tests import actors as actors

tasks.broker.add_middleware(AsyncIO())
