"""Replays random test/hit/clear sequences through ratekeeper's Warehouse adapter and through
Warehouse's own limiter (``limits``' MovingWindowRateLimiter on Redis), and prints where the two
differ and why.

Both run on one virtual clock, in milliseconds: the sidecar (in this process, on a redis-server
this script starts) takes it as its test clock, and ``limits`` reads it through ``time.time``,
which is patched around its calls alone. After every operation the script compares what the
operation answered, then each window's remaining hits and reset, and ``resets_in``, to the
millisecond. A third limiter, ``limits`` taking all of a hit's windows or none, tells the
differences apart:

- *several windows*: Warehouse's ``all(window.hit(...) ...)`` keeps the hit it took in the
  windows before the one that refused, where ratekeeper takes nothing; everything that differs
  from Warehouse but agrees with all-or-nothing is this (documented in docs/warehouse.md);
- *unexplained*: anything that differs from all-or-nothing too. It should stay 0.

One boundary is left out on purpose: a hit exactly one window old still counts for ``limits``
(the window includes its start) and no longer for ratekeeper (it excludes it). Times that
would land on it are moved on by a millisecond.

    .venv/bin/python loadtest/warehouse_replay.py                 # 300 operations per case
    .venv/bin/python loadtest/warehouse_replay.py --ops 1000 --seed 7
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from unittest import mock

from aiohttp import web
from limits import parse_many
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from ratekeeper.app import create_app
from ratekeeper.client import SyncClient
from ratekeeper.config.rules import parse_config
from ratekeeper.integrations.warehouse import RateLimiter
from ratekeeper.settings import Settings

from procs import free_port, start_redis

# The limits replayed: two short windows where a refused hit often spans both, then
# Warehouse's own strings.
CASES = ["1 per 1 second, 2 per 3 seconds", "10 per 5 minutes",
         "5 per 5 minutes, 20 per hour, 50 per day", "2 per minute; 10 per hour"]
WHO = ["203.0.113.7", "None", "c0ffee00-0000-4000-8000-000000000001"]
OPERATIONS = (("test", 35), ("hit", 55), ("clear", 10))


class Clock:
    """Virtual milliseconds, a day ahead of the real clock (so nothing real expires early)."""

    def __init__(self) -> None:
        self.ms = time.time_ns() // 1_000_000 + 86_400_000

    def __call__(self) -> int:
        return self.ms


@contextmanager
def virtual(clock: Clock) -> Iterator[None]:
    """``time.time`` reads the virtual clock, for the ``limits`` calls inside."""
    with mock.patch("time.time", return_value=clock.ms / 1000):
        yield


class Sidecar:
    """ratekeeper's app on a free port, served from an event loop of its own thread."""

    def __init__(self, config: str, redis_url: str, clock: Clock, token: str) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        settings = Settings(redis_url=redis_url, ip_salt=b"replay-salt-long-enough",
                            key_prefix="replay" + uuid.uuid4().hex[:8], redis_timeout_ms=5000,
                            origin_tokens=(token.encode(),))
        self.runner: web.AppRunner | None = None
        asyncio.run_coroutine_threadsafe(
            self._start(settings, config, clock), self.loop).result(60)

    async def _start(self, settings: Settings, config: str, clock: Clock) -> None:
        app = create_app(settings, parse_config(config, source="replay.toml"), clock=clock)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


class WarehouseWay:
    """Warehouse's limiter as it is: one moving window per limit, ``all()`` over them, so a
    hit stops at the first window that refuses and keeps what the earlier ones took."""

    def __init__(self, storage: Any, limit: str, name: str) -> None:
        self.storage = storage
        self.window = MovingWindowRateLimiter(storage)
        self.items = parse_many(limit)
        self.name = name

    def test(self, who: str) -> bool:
        return all(self.window.test(item, self.name, who) for item in self.items)

    def hit(self, who: str) -> bool:
        return all(self.window.hit(item, self.name, who) for item in self.items)

    def clear(self, who: str) -> None:
        for item in self.items:
            self.storage.clear(item.key_for(self.name, who))

    def windows(self, who: str, now_ms: int) -> dict[int, tuple[int, int]]:
        """window seconds -> (remaining, ms until reset), as limits reports them."""
        out = {}
        for item in self.items:
            reset_at, remaining = self.window.get_window_stats(item, self.name, who)
            out[int(item.get_expiry())] = (remaining, round(reset_at * 1000) - now_ms)
        return out

    def resets_in(self, who: str, now_ms: int) -> int | None:
        waits = [ms for remaining, ms in self.windows(who, now_ms).values()
                 if remaining <= 0 and ms > 0]
        return min(waits) if waits else None


class AllOrNothing(WarehouseWay):
    """The same windows, but a hit takes in every window or in none (ratekeeper's rule)."""

    def hit(self, who: str) -> bool:
        if not self.test(who):
            return False
        for item in self.items:
            self.window.hit(item, self.name, who)
        return True


@dataclass
class Report:
    """What one case's replay found."""

    limit: str
    ops: int = 0
    differ: int = 0  # operations where anything differs from Warehouse's way
    kinds: Counter[str] = field(default_factory=Counter)
    unexplained: list[str] = field(default_factory=list)


def _ms(value: timedelta | None) -> int | None:
    return None if value is None else round(value.total_seconds() * 1000)


def replay(limit: str, ops: int, seed: int, redis_url: str) -> Report:
    """Replay ``ops`` random operations on ``limit``; the differences, explained or not."""
    name = "replayed"
    config = (f'[rules.{name}]\nlimit = "{limit}"\nkey = ["subject"]\n'
              f"[actions.{name}]\nrules = [\"{name}\"]\nclearable = true\n")
    clock = Clock()
    token = uuid.uuid4().hex
    sidecar = Sidecar(config, redis_url, clock, token)
    client = SyncClient(f"http://127.0.0.1:{sidecar.port}", timeout=5.0, origin_token=token)
    ours = RateLimiter(client, limit, identifiers=[name])
    storage = storage_from_string(redis_url)
    run = uuid.uuid4().hex[:8]
    theirs = WarehouseWay(storage, limit, f"ww-{run}")
    whole = AllOrNothing(storage, limit, f"aon-{run}")
    windows_ms = sorted(int(item.get_expiry()) * 1000 for item in parse_many(limit))
    rng = random.Random(seed)
    seen: set[int] = set()
    report = Report(limit)
    try:
        for index in range(ops):
            step = rng.randint(1, max(2, windows_ms[0] * 6 // 10))
            at = clock.ms + step
            while any(at - w in seen for w in windows_ms):  # the boundary left out (above)
                at += 1
            clock.ms = at
            seen.add(at)
            who = rng.choice(WHO)
            op = rng.choices([o for o, _ in OPERATIONS], [w for _, w in OPERATIONS])[0]
            got = getattr(ours, op)(who)
            with virtual(clock):
                want, whole_got = getattr(theirs, op)(who), getattr(whole, op)(who)
            stats = {s.window_seconds: (s.remaining, _ms(s.resets_in))
                     for s in ours.get_window_stats(who)}
            resets = _ms(ours.resets_in(who))
            with virtual(clock):
                compared = [("answer", got, want, whole_got),
                            ("windows", stats, theirs.windows(who, at), whole.windows(who, at)),
                            ("resets_in", resets, theirs.resets_in(who, at),
                             whole.resets_in(who, at))]
            report.ops += 1
            differs = False
            for what, mine, warehouse, all_or_none in compared:
                if mine == warehouse:
                    continue
                differs = True
                if mine == all_or_none:
                    report.kinds[f"several windows ({what})"] += 1
                else:
                    report.unexplained.append(
                        f"op {index} {op}({who!r}) {what}: ratekeeper {mine}, Warehouse "
                        f"{warehouse}, all-or-nothing {all_or_none}")
            report.differ += differs
    finally:
        client.close()
        sidecar.stop()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=300, help="operations per case")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--limit", action="append", help="a limit string (default: the cases)")
    args = parser.parse_args()
    logging.getLogger("ratekeeper").setLevel(logging.ERROR)  # (no admin token: said once)
    redis = start_redis()
    unexplained = 0
    try:
        for number, limit in enumerate(args.limit or CASES):
            report = replay(limit, args.ops, args.seed + number, redis.url)
            print(f'"{report.limit}": {report.ops} operations, {report.differ} differ from '
                  f"Warehouse's limiter")
            for kind, count in sorted(report.kinds.items()):
                print(f"  {kind}: {count}")
            print(f"  unexplained: {len(report.unexplained)}")
            for line in report.unexplained[:10]:
                print(f"    {line}")
            unexplained += len(report.unexplained)
    finally:
        redis.stop()
    print(f"unexplained differences: {unexplained}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
