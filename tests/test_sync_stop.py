"""StateSync.stop ends its tasks even when redis-py swallows a cancellation."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from ratekeeper.control.audit import AuditLog
from ratekeeper.control.flagstore import FlagStore
from ratekeeper.control.sync import StateSync
from ratekeeper.decision.cache import LocalCache
from ratekeeper.decision.flags import FlagBoard


async def test_stop_always_ends_the_listener(redis: aioredis.Redis, key_prefix: str) -> None:
    """A cancel that lands inside pubsub.get_message(timeout=...) can be swallowed by
    redis-py, which then goes on listening; with a 1-5 ms read timeout that race is hit
    often (about 2 stops in 5 hung before the fix). Every stop here must finish."""
    for i in range(25):
        sync = StateSync(redis, f"{key_prefix}:events", FlagStore(redis, f"{key_prefix}:{{flags}}"),
                         FlagBoard({}), LocalCache(10), AuditLog(redis, f"{key_prefix}:{{audit}}"),
                         wall=lambda: 0.0, interval=0.001 * (1 + i % 5))
        await sync.start()
        await asyncio.sleep(0.002 * (i % 4))
        stopping = asyncio.create_task(sync.stop())
        done, _ = await asyncio.wait({stopping}, timeout=5)
        assert done, f"stop() did not return (round {i})"
        assert sync._tasks == []
