"""Answers the server could give at once go out together, at the end of the event-loop tick.

An answer that needs Redis waits for its batch (``pipeline``), so the answers of one tick
are built and written one after the other. An answer the kill switches or the local cache
give at once (the whole of a flood) would otherwise be built and written in the middle of
reading the tick's requests, each interleaved with the next one's parsing. ``TickBarrier``
lets those wait for the end of the tick, so the server reads and decides a tick's requests
first and answers them after: the same work, in runs of one kind (``make bench``, flood:
about a quarter more answers per second). The wait is one pass of the loop, not a timer.
"""

from __future__ import annotations

import asyncio

__all__ = ["TickBarrier"]


class TickBarrier:
    """Futures that resolve together once the current event-loop tick has run."""

    __slots__ = ("_loop", "_waiting")

    def __init__(self) -> None:
        self._waiting: list[asyncio.Future[None]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def wait(self) -> asyncio.Future[None]:
        """A future resolved with every other one asked for in this tick."""
        loop = asyncio.get_running_loop()
        waiting = self._waiting
        if waiting is None or loop is not self._loop:  # (a list of a stopped loop is dropped)
            waiting = self._waiting = []
            self._loop = loop
            loop.call_soon(self._release, waiting)
        future = loop.create_future()
        waiting.append(future)
        return future

    def _release(self, waiting: list[asyncio.Future[None]]) -> None:
        if self._waiting is waiting:
            self._waiting = None
        for future in waiting:
            if not future.done():  # its request may have been cancelled meanwhile
                future.set_result(None)
