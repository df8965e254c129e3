"""The baseline: ``limits``' MovingWindowRateLimiter in-process on its async Redis storage.

This is what PyPI does today (Warehouse's ``RateLimiter`` over ``limits``), measured the
way the sidecar is: the same two-window rule, decided for random IPs of the same pool, by
as many processes as the sidecar has workers, with the same total concurrency. A decision
is Warehouse's ``hit()``: every window hit in order, stopping at the first that refuses.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
from multiprocessing.connection import Connection
from typing import Any

import uvloop
from limits import parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

__all__ = ["run_limits"]


async def _decide(port: int, limit: str, tasks: int, warmup: float, seconds: float,
                  pool: int, seed: int) -> tuple[int, int]:
    storage = RedisStorage(f"async+redis://127.0.0.1:{port}/0", implementation="redispy")
    limiter = MovingWindowRateLimiter(storage)
    items = parse_many(limit)
    rng = random.Random(seed)
    start = time.perf_counter()
    counting_from = start + warmup
    stop_at = counting_from + seconds
    decided = allowed = 0

    async def worker() -> None:
        nonlocal decided, allowed
        while True:
            i = rng.randrange(pool)
            ip = f"198.{18 + i // 65536}.{i // 256 % 256}.{i % 256}"
            ok = True
            for item in items:  # Warehouse: all(window.hit(limit, ...) for limit in limits)
                if not await limiter.hit(item, "bench", ip):
                    ok = False
                    break
            now = time.perf_counter()
            if now >= stop_at:
                return
            if now >= counting_from:
                decided += 1
                allowed += ok

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return decided, allowed


def _process(port: int, limit: str, tasks: int, warmup: float, seconds: float, pool: int,
             seed: int, out: Connection) -> None:
    out.send(uvloop.run(_decide(port, limit, tasks, warmup, seconds, pool, seed)))


def run_limits(port: int, *, limit: str, processes: int, concurrency: int, seconds: float,
               warmup: float = 1.0, pool: int = 100_000) -> dict[str, Any]:
    """Decisions per second of ``processes`` in-process limiters sharing ``concurrency``."""
    context = multiprocessing.get_context("fork")
    pipes, children = [], []
    for index in range(processes):
        receiver, sender = context.Pipe(duplex=False)
        tasks = concurrency // processes + (index < concurrency % processes)
        child = context.Process(target=_process, args=(port, limit, tasks, warmup, seconds,
                                                       pool, 1000 + index, sender))
        child.start()
        pipes.append(receiver)
        children.append(child)
    results = [pipe.recv() for pipe in pipes]
    for child in children:
        child.join(10)
    decided = sum(r[0] for r in results)
    return {"limit": limit, "processes": processes, "concurrency": concurrency,
            "seconds": seconds, "decisions": decided, "allowed": sum(r[1] for r in results),
            "decisions_per_s": decided / seconds}
