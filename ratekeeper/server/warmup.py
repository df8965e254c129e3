"""A worker warms up before it takes connections; ``/readyz`` asks whether every worker has.

A cold worker's first checks would open Redis connections and load scripts while clients
wait, or meet a Redis not yet reachable and be decided by the fail modes. So a worker first
asks until Redis answers with the scripts loaded (``warm_up``), every ``RETRY`` seconds, and
only then accepts. Redis may truly be down: after the warm-up limit the worker serves anyway,
and says so; it goes on asking, and counts as warm once Redis answers.

Whether the server as a whole should take traffic is a question about all its workers: the
runner puts the answer's source under ``WORKERS`` (the workers' shared accept slots), and
``/readyz`` asks it. An app served some other way (a test client) has none: its one process
is the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

__all__ = ["RETRY", "WORKERS", "Workers", "keep_warming", "warm_up"]

log = logging.getLogger("ratekeeper.server.warmup")

RETRY = 0.1  # seconds between two questions to Redis while warming up


class Workers(Protocol):
    """What ``/readyz`` asks of the server's workers."""

    def unready(self) -> str | None:
        """Why the server should not take traffic now; None when it should."""


WORKERS = web.AppKey("workers", Workers)


async def warm_up(ready: Callable[[], Awaitable[bool]], limit: float,
                  stopping: asyncio.Event) -> bool:
    """Ask ``ready`` (``Limiter.ready``) until it says True (then True), for at most
    ``limit`` seconds, or until ``stopping`` is set (then False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not stopping.is_set():
        left = deadline - loop.time()
        if left <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left):
                if await ready():
                    return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), min(RETRY, max(0.0, deadline - loop.time())))
    return False


async def keep_warming(ready: Callable[[], Awaitable[bool]], warmed: Callable[[], None]
                       ) -> None:
    """After a warm-up that ran out: ask ``ready`` every RETRY seconds until it says True,
    then call ``warmed``."""
    while not await ready():
        await asyncio.sleep(RETRY)
    log.info("Redis answers with the scripts loaded: this worker is warm")
    warmed()
