"""The admin page's health line: is Redis answering, the breaker, and decisions per second.

Each process counts its decisions in memory (``Checker.decided``, no Redis call per
decision) and, once a second, adds what it decided to one counter per Unix second in Redis
(``<prefix>:{decisions}:<second>``, gone after two minutes). The page sums the last ten
complete seconds, so it shows the rate of every process and instance that shares the Redis,
whichever worker serves the page; when Redis cannot be asked it shows this process's own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ratekeeper.control.sync import StateSync
from ratekeeper.decision.checker import Checker
from ratekeeper.errors import StoreUnavailable
from ratekeeper.server.state import Runtime
from ratekeeper.storage.storecall import flush_every, store_call

__all__ = ["DecisionRate", "Health", "health"]

log = logging.getLogger("ratekeeper.admin.web.app")

RATE_WINDOW = 10  # seconds averaged
COUNTER_TTL = 120  # seconds a per-second counter lives in Redis
FLUSH_SECONDS = 1.0
HEALTH_TIMEOUT = 0.5  # the page waits at most this long on a Redis that does not answer


class DecisionRate:
    """Decisions per second, of this process and (through Redis) of all of them."""

    def __init__(self, runtime: Runtime, wall: Callable[[], float]) -> None:
        self.runtime = runtime
        self.wall = wall
        self._checker: Checker | None = None
        self._seen = 0
        self._pending = 0  # counted, not yet in Redis
        self._local: dict[int, int] = {}  # second -> this process's decisions

    def _take(self) -> int:
        """Decisions since the last look (a reload starts a fresh Checker at zero)."""
        checker = self.runtime.checker
        if checker is not self._checker:
            self._checker, self._seen = checker, 0
        count = checker.decided - self._seen
        self._seen = checker.decided
        return count

    async def flush(self) -> None:
        """Add what was decided since the last flush to this second's counter."""
        count = self._take()
        second = int(self.wall())
        if count:
            self._local[second] = self._local.get(second, 0) + count
            for old in [s for s in self._local if s < second - COUNTER_TTL]:
                del self._local[old]
        total = self._pending + count
        if not total:
            return
        key = self.runtime.checker.keyspace.decisions_key(second)
        try:
            async with store_call():
                pipe = self.runtime.store.redis.pipeline(transaction=False)
                pipe.incrby(key, total)
                pipe.expire(key, COUNTER_TTL)
                await pipe.execute()
        except StoreUnavailable:
            self._pending = total  # counted into a later second once Redis is back
            raise
        self._pending = 0

    async def flush_forever(self, interval: float = FLUSH_SECONDS) -> None:
        """Flush every ``interval`` seconds until cancelled."""
        await flush_every(interval, self.flush, "decision counts", log)

    def _seconds(self) -> range:
        # the current and the previous second may still be missing other processes' counts
        now = int(self.wall())
        return range(now - 1 - RATE_WINDOW, now - 1)

    def here(self) -> float:
        """This process's decisions per second over the last ``RATE_WINDOW`` seconds."""
        return sum(self._local.get(s, 0) for s in self._seconds()) / RATE_WINDOW

    async def everywhere(self) -> float:
        """Every process's decisions per second over the last ``RATE_WINDOW`` seconds."""
        keyspace = self.runtime.checker.keyspace
        keys = [keyspace.decisions_key(s) for s in self._seconds()]
        async with store_call(HEALTH_TIMEOUT):
            values = await self.runtime.store.redis.mget(keys)  # one slot: {decisions}
        return sum(int(v) for v in values if v is not None) / RATE_WINDOW


@dataclass(frozen=True, slots=True)
class Health:
    """One line of the page: what an admin checks first in an incident."""

    redis: bool  # Redis answers (and the scripts are loaded)
    store: str  # memory, redis, cluster or sentinel
    breaker: str  # closed, open or half-open
    listening: bool | None  # subscribed to admin changes (None: one process, no need)
    flags_stale: bool  # the flags shown are this process's last known state
    rate_everywhere: float | None  # None when Redis could not be asked
    rate_here: float

    @property
    def degraded(self) -> bool:
        """Checks are (or may be) answered by the fail modes instead of Redis."""
        return not self.redis or self.breaker != "closed"


async def health(runtime: Runtime, sync: StateSync, rate: DecisionRate,
                 flags_stale: bool) -> Health:
    """Ask Redis once (under the limiter's breaker) and gather the rest from this process."""
    ready = await runtime.limiter.ready()
    everywhere: float | None = None
    if ready:
        try:
            everywhere = await rate.everywhere()
        except StoreUnavailable:
            everywhere = None
    return Health(redis=ready, store=runtime.store.kind, breaker=runtime.limiter.breaker_state,
                  listening=sync.subscribed if sync.listen else None, flags_stale=flags_stale,
                  rate_everywhere=everywhere, rate_here=rate.here())
