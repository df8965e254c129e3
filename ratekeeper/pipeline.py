"""Coalescing: the script calls made in one event-loop tick go to Redis as one pipeline.

Under load many requests reach their script call in the same tick of the event loop. Sent
one by one, each takes a pooled connection, a write and a read of its own; coalesced, they
share one write and one read, and Redis parses them in one go. Exactness is unchanged:
every EVALSHA in a pipeline is still atomic on its own, and Redis runs them in the order
they were queued, which is the order the callers asked.

``Coalescer`` has the shape of a registered redis-py script (``sha``, ``script`` and an
awaitable ``__call__(keys=..., args=...)``), so it stands in for one: ``coalesced(scripts,
redis)`` swaps it in for the check script of a ``Scripts``. Errors reach each caller as
redis-py raised them (a connection error fails every call of the batch, a script error
only its own call), so the limiter's translation of Redis errors stays where it is.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from redis.exceptions import NoScriptError

from .scripts import Scripts

__all__ = ["Coalescer", "coalesced"]

Arg = str | int | bytes
Call = tuple[Sequence[str], Sequence[Arg], "asyncio.Future[Any]"]

# A tick rarely holds more than the server's concurrency; the cap bounds one write's size.
MAX_BATCH = 512


class Coalescer:
    """Runs one Lua script for many callers, one pipeline per event-loop tick."""

    __slots__ = ("_queue", "_scheduled", "_tasks", "batches", "calls", "max_batch",
                 "redis", "script", "sha")

    def __init__(self, redis: Any, script: Any, *, max_batch: int = MAX_BATCH) -> None:
        self.redis = redis
        self.script: str | bytes = script.script
        self.sha: str = script.sha
        self.max_batch = max_batch
        self.calls = 0  # script calls made, for metrics and tests
        self.batches = 0  # pipelines sent
        self._queue: list[Call] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, keys: Sequence[str] = (), args: Iterable[Arg] = (),
                 client: Any = None) -> asyncio.Future[Any]:
        """Queue one call; the future resolves to what the script returned."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((keys, tuple(args), future))
        if len(self._queue) >= self.max_batch:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._queue = self._queue, []
        if not batch:
            return
        task = asyncio.ensure_future(self._run(batch))
        # the loop keeps only weak references to tasks
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[Call]) -> None:
        self.calls += len(batch)
        self.batches += 1
        try:
            results = await self._send(batch)
        except asyncio.CancelledError:
            for _, _, future in batch:
                future.cancel()
            raise
        except BaseException as exc:  # every caller sees the transport's failure
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller gave up (its deadline passed)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _send(self, batch: Sequence[Call]) -> list[Any]:
        results = await self._pipeline(batch)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            # Redis lost its script cache (a restart, a failover, SCRIPT FLUSH); those calls
            # did not run, so loading the script and sending them again is safe.
            await self.redis.script_load(self.script)
            again = await self._pipeline([batch[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, batch: Sequence[Call]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        sha = self.sha
        for keys, args, _ in batch:
            pipe.evalsha(sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))


def coalesced(scripts: Scripts, redis: Any) -> Scripts:
    """``scripts`` with its check script called through a Coalescer."""
    return dataclasses.replace(scripts, check=Coalescer(redis, scripts.check))
