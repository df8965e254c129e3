"""The most-denied subjects per rule over the last hour, counted in bounded memory.

Denials are counted in this process and flushed to Redis about once a second, so a flood of
denied requests costs a few Redis commands per second, not one per denial. In Redis each
rule has one sorted set per 5-minute bucket (subject hash -> denials), trimmed to the
``KEEP`` largest after every flush and expiring after the hour it covers; a query adds up
the buckets of the last hour. Counts are approximate at the edges: the oldest bucket may
reach a little past the hour, a subject outside a bucket's top ``KEEP`` loses that bucket's
count, and new subjects beyond ``max_pending`` between two flushes are not counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from .admin_wire import TopEntry
from .config import Rule
from .errors import StoreUnavailable
from .keys import Keyspace
from .storecall import store_call

__all__ = ["BUCKET_SECONDS", "LOOKBACK_SECONDS", "TopDenials"]

log = logging.getLogger("ratekeeper.top")

BUCKET_SECONDS = 300
LOOKBACK_SECONDS = 3600
KEEP = 1000  # subjects kept per rule and bucket in Redis
MAX_PENDING = 10_000  # distinct (rule, subject) pairs counted between two flushes
FLUSH_SECONDS = 1.0


def _text(value: Any) -> str:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)


class TopDenials:
    """Counts denials per (rule, subject hash) locally; flushes them to Redis buckets."""

    def __init__(self, redis: Any, keyspace: Keyspace, wall: Callable[[], float], *,
                 max_pending: int = MAX_PENDING) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.wall = wall
        self.max_pending = max_pending
        self.dropped = 0  # denials not counted because too many distinct subjects were pending
        self._pending: dict[str, dict[str, int]] = {}
        self._rules: dict[str, Rule] = {}
        self._size = 0

    def add(self, rule: Rule, subject: str, count: int = 1) -> None:
        """Count ``count`` denials of ``subject`` by ``rule``."""
        counts = self._pending.get(rule.name)
        if counts is None:
            counts = self._pending[rule.name] = {}
            self._rules[rule.name] = rule
        seen = counts.get(subject)
        if seen is None:
            if self._size >= self.max_pending:
                self.dropped += count
                return
            self._size += 1
            counts[subject] = count
        else:
            counts[subject] = seen + count

    async def flush(self) -> None:
        """Write the pending counts to the current bucket; on failure keep them for later."""
        if not self._pending:
            return
        pending, rules = self._pending, self._rules
        self._pending, self._rules, self._size = {}, {}, 0
        bucket = int(self.wall() // BUCKET_SECONDS)
        ttl = LOOKBACK_SECONDS + 2 * BUCKET_SECONDS
        try:
            async with store_call():
                pipe = self.redis.pipeline(transaction=False)
                for name, counts in pending.items():
                    key = self.keyspace.top_key(rules[name], bucket)
                    for subject, count in counts.items():
                        pipe.zincrby(key, count, subject)
                    pipe.zremrangebyrank(key, 0, -(KEEP + 1))
                    pipe.expire(key, ttl)
                await pipe.execute()
        except StoreUnavailable:
            for name, counts in pending.items():
                for subject, count in counts.items():
                    self.add(rules[name], subject, count)
            raise

    async def flush_forever(self, interval: float = FLUSH_SECONDS) -> None:
        """Flush every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush()
            except StoreUnavailable:
                log.debug("top denials not flushed: Redis is unavailable")

    async def top(self, rule: Rule, limit: int) -> list[TopEntry]:
        """The ``limit`` subjects ``rule`` denied most over the last hour (all processes)."""
        with contextlib.suppress(StoreUnavailable):  # the query below fails the same way
            await self.flush()
        now = self.wall()
        first = int((now - LOOKBACK_SECONDS) // BUCKET_SECONDS)
        last = int(now // BUCKET_SECONDS)
        async with store_call():
            pipe = self.redis.pipeline(transaction=False)
            for bucket in range(first, last + 1):
                pipe.zrevrange(self.keyspace.top_key(rule, bucket), 0, KEEP - 1,
                               withscores=True)
            buckets = await pipe.execute()
        totals: dict[str, int] = {}
        for members in buckets:
            for member, score in members:
                subject = _text(member)
                totals[subject] = totals.get(subject, 0) + int(score)
        ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:limit]
        return [TopEntry(subject=subject, denied=count) for subject, count in ranked]
