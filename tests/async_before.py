"""A user module that inserts Dramatiq's AsyncIO before this package's (``before=``)."""

from __future__ import annotations

from dramatiq.middleware.asyncio import AsyncIO

import tasks
from tasks.middleware import AsyncActors
from tests import actors as actors

tasks.broker.add_middleware(AsyncIO(), before=AsyncActors)
