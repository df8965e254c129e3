"""The most-denied subjects per rule over the last hour, counted in bounded memory.

Denials are counted in this process and flushed to Redis about once a second, so a flood of
denied requests costs a few Redis commands per second, not one per denial. In Redis each
rule has one sorted set per minute (subject hash -> denials), trimmed to the ``KEEP``
largest after every flush and expiring one hour after its minute began (so no key lives
longer than an hour); a query adds up the live minutes in Redis (ZUNIONSTORE into a
short-lived key of the same slot). Counts are approximate at the edges: the window is the
last 59 to 60 minutes, a subject outside a minute's top ``KEEP`` loses that minute's count,
and new subjects beyond ``max_pending`` between two flushes are not counted.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

from ratekeeper.api.admin_wire import MAX_TOP_LIMIT, TopEntry
from ratekeeper.config.rules import Rule
from ratekeeper.errors import StoreUnavailable
from ratekeeper.identity.keys import Keyspace
from ratekeeper.storage.storecall import flush_every, store_call

__all__ = ["BUCKET_SECONDS", "LOOKBACK_SECONDS", "TopDenials"]

log = logging.getLogger("ratekeeper.decision.top")

BUCKET_SECONDS = 60
LOOKBACK_SECONDS = 3600
KEEP = MAX_TOP_LIMIT  # subjects kept per rule and minute in Redis
QUERY_TTL_MS = 10_000  # the summed copy a query makes lives at most this long
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
        now = self.wall()
        bucket = int(now // BUCKET_SECONDS)
        # relative, not EXPIREAT: the wall clock may be a test's, Redis's clock is real
        ttl = max(1, int(bucket * BUCKET_SECONDS + LOOKBACK_SECONDS - now))
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
        await flush_every(interval, self.flush, "top denials", log)

    async def top(self, rule: Rule, limit: int) -> list[TopEntry]:
        """The ``limit`` subjects ``rule`` denied most over the last hour (all processes)."""
        with contextlib.suppress(StoreUnavailable):  # the query below fails the same way
            await self.flush()
        now = self.wall()
        last = int(now // BUCKET_SECONDS)
        keys = [self.keyspace.top_key(rule, bucket)
                for bucket in range(last - LOOKBACK_SECONDS // BUCKET_SECONDS + 1, last + 1)]
        total = self.keyspace.top_key(rule, f"q{secrets.token_hex(6)}")
        async with store_call():
            pipe = self.redis.pipeline(transaction=False)
            pipe.zunionstore(total, keys)
            pipe.pexpire(total, QUERY_TTL_MS)
            pipe.zrevrange(total, 0, limit - 1, withscores=True)
            pipe.delete(total)
            ranked = (await pipe.execute())[2]
        entries = [(_text(member), int(score)) for member, score in ranked]
        entries.sort(key=lambda item: (-item[1], item[0]))  # ties in a stable order
        return [TopEntry(subject=subject, denied=count) for subject, count in entries]
