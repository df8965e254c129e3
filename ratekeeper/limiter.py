"""Runs the check script and turns its answer (or Redis's failure) into typed results.

This is the one place where Redis errors become ``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from redis.exceptions import RedisError

from .errors import StoreUnavailable
from .scripts import Scripts

__all__ = ["Limiter", "Outcome", "Status", "WindowState"]


class Status(IntEnum):
    """What the script decided."""

    LIMITED = 0
    ALLOWED = 1
    BANNED = 2
    PENALTY = 3


@dataclass(frozen=True, slots=True)
class WindowState:
    """One window after the decision: hits left, ms until fully reset, ms until retry."""

    remaining: int
    reset_ms: int
    retry_ms: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """The script's answer for one request."""

    status: Status
    now_ms: int
    shadowed: bool
    index: int
    wait_ms: int
    windows: tuple[WindowState, ...]


class Limiter:
    """Decides requests with one script call each; Redis time unless a test clock is given."""

    def __init__(self, redis: Any, *, timeout: float,
                 clock: Callable[[], int] | None = None) -> None:
        self.redis = redis
        self.scripts = Scripts.register(redis)
        self.timeout = timeout
        self._clock = clock

    async def check(self, keys: Sequence[str], cost: int, n_bans: int, n_rules: int,
                    rule_args: Sequence[str | int]) -> Outcome:
        """Run check.lua over ``keys``; ``rule_args`` is the per-rule ARGV tail."""
        now = "" if self._clock is None else str(self._clock())
        args: list[str | int] = [now, cost, n_bans, n_rules, *rule_args]
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self.scripts.check(keys=list(keys), args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
        return parse_outcome(raw)

    async def refund(self, keys: Sequence[str], cost: int, at_ms: int,
                     rule_args: Sequence[str | int]) -> list[int]:
        """Run refund.lua: give back ``cost`` hits taken at ``at_ms``; hits given back per rule."""
        args: list[str | int] = [cost, at_ms, len(keys), *rule_args]
        try:
            async with asyncio.timeout(self.timeout):
                raw = await self.scripts.refund(keys=list(keys), args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc
        return [int(v) for v in raw]

    async def claim(self, key: str, ttl_ms: int) -> bool:
        """SET NX with a TTL: True for the first caller only (e.g. one refund per token)."""
        try:
            async with asyncio.timeout(self.timeout):
                return bool(await self.redis.set(key, b"1", nx=True, px=max(ttl_ms, 1)))
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc

    async def release(self, key: str) -> None:
        """Undo a claim (best effort: a claim whose work failed may be retried)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self.redis.delete(key)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}") from exc

    def now_ms(self) -> int:
        """This process's idea of now in ms: the test clock when one is injected."""
        return self._clock() if self._clock is not None else time.time_ns() // 1_000_000

    async def ready(self) -> bool:
        """True when Redis answers and the scripts are loaded (loading them if flushed)."""
        try:
            async with asyncio.timeout(max(self.timeout, 0.5)):
                loaded = await self.redis.script_exists(*self.scripts.shas)
                if not all(loaded):
                    for script in self.scripts.all:
                        await self.redis.script_load(script.script)
                return True
        except (RedisError, OSError, TimeoutError):
            return False


def parse_outcome(raw: Sequence[int]) -> Outcome:
    """Validate the flat array check.lua returns."""
    values = [int(v) for v in raw]
    head, tail = values[:5], values[5:]
    windows = tuple(
        WindowState(remaining=tail[i], reset_ms=tail[i + 1], retry_ms=tail[i + 2])
        for i in range(0, len(tail), 3)
    )
    return Outcome(status=Status(head[0]), now_ms=head[1], shadowed=bool(head[2]),
                   index=head[3], wait_ms=head[4], windows=windows)
