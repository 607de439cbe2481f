"""``async def`` actors: Dramatiq's AsyncIO middleware, on by default, stopping only its own loop.

Dramatiq runs an async actor's coroutine on one event loop thread per worker process, which
its ``AsyncIO`` middleware starts at worker boot; without it every attempt fails ("Global event
loop thread not set"), and is retried for days like any failure. This package declares it, so
``async def`` actors work as declared.

A module that also adds Dramatiq's ``AsyncIO``, as Dramatiq's documentation says to, starts a
second loop, which async actors then use. At shutdown Dramatiq's stops the loop it finds set and
clears it; this one stops the loop it started, which Dramatiq's own would have left running, and
sets back the loop it found, so that the worker still exits on SIGTERM whichever comes first (with
two of Dramatiq's, it never does). Its loop's thread is a daemon, as Dramatiq's worker threads
are: a unit test's in-process ``Worker`` that is never stopped does not keep the process alive.
"""

from __future__ import annotations

import logging
from typing import Any

import dramatiq
from dramatiq.asyncio import EventLoopThread, get_event_loop_thread, set_event_loop_thread
from dramatiq.middleware.asyncio import AsyncIO


class AsyncActors(AsyncIO):
    """Dramatiq's ``AsyncIO``, stopping at shutdown the event loop it started and no other."""

    def __init__(self) -> None:
        super().__init__()
        self.logger = logging.getLogger(__name__)  # (Dramatiq's names it after its own module)
        self._thread: EventLoopThread | None = None
        self._found: EventLoopThread | None = None

    def before_worker_boot(self, broker: dramatiq.Broker, worker: Any) -> None:
        thread = EventLoopThread(self.logger)
        thread.daemon = True
        self._thread, self._found = thread, get_event_loop_thread()
        thread.start(timeout=1.0)
        set_event_loop_thread(thread)

    def after_worker_shutdown(self, broker: dramatiq.Broker, worker: Any) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.stop()
        thread.join()
        if get_event_loop_thread() is thread:
            set_event_loop_thread(self._found)
        self._found = None
