"""Redis calls of the admin side (flags, bans, audit, top counts) under one deadline.

Like ``limiter.py`` for the hot path, this is where their Redis failures become
``StoreUnavailable``: an admin change either reaches Redis or is reported as not made.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from redis.exceptions import RedisError

from ratekeeper.errors import StoreUnavailable

__all__ = ["ADMIN_TIMEOUT", "flush_every", "store_call"]

# Admin calls are rare and not on the request path; they may wait longer than a check.
ADMIN_TIMEOUT = 2.0


@asynccontextmanager
async def store_call(timeout: float = ADMIN_TIMEOUT) -> AsyncIterator[None]:
    """Run the block's Redis commands under ``timeout``; failures raise StoreUnavailable."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except (RedisError, OSError, TimeoutError) as exc:
        # the class and redis-py's own words (about the server, never about a client)
        raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}"[:200]) from exc


async def flush_every(interval: float, flush: Callable[[], Awaitable[None]], what: str,
                      log: logging.Logger) -> None:
    """Call ``flush`` every ``interval`` seconds until cancelled; while Redis is unavailable,
    say so at debug level (``what`` names what was not flushed) and try again next time. A
    round that fails otherwise is logged, and the next one comes all the same."""
    while True:
        await asyncio.sleep(interval)
        try:
            await flush()
        except StoreUnavailable:
            log.debug("%s not flushed: Redis is unavailable", what)
        except Exception:
            log.exception("%s: the flush failed", what)
