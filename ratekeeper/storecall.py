"""Redis calls of the admin side (flags, bans, audit, top counts) under one deadline.

Like ``limiter.py`` for the hot path, this is where their Redis failures become
``StoreUnavailable``: an admin change either reaches Redis or is reported as not made.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import RedisError

from .errors import StoreUnavailable

__all__ = ["ADMIN_TIMEOUT", "store_call"]

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
