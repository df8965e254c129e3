"""Failed sign-ins to the admin page, counted per client network in Redis.

After ``limit`` failed sign-ins from one client (its IP grouped as every limit groups it: IPv6
by /64) within ``window_ms``, the form refuses that client until the window that the first
failure opened has passed; a successful sign-in clears the count. Tokens are long random
strings, so this is a brake on guessing rather than the lock: it makes guessing slow and loud
(every refusal is logged). The count lives under the client's keyed hash, like every other
key, with a TTL of the window; the raw address is never stored.

When Redis cannot be asked, nothing is refused here (signing in needs Redis anyway).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ratekeeper.errors import BadRequest, StoreUnavailable
from ratekeeper.identity.keys import Keyspace
from ratekeeper.storage.storecall import store_call

__all__ = ["SignInThrottle"]

log = logging.getLogger("ratekeeper.admin.web.app")

FAILURES = 10
WINDOW_MS = 15 * 60 * 1000


class SignInThrottle:
    """Counts failed sign-ins per client and says how long a client must wait."""

    def __init__(self, redis: Any, keyspace: Keyspace, *, limit: int = FAILURES,
                 window_ms: int = WINDOW_MS) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self.limit = limit
        self.window_ms = window_ms

    def _key(self, client_ip: str | None) -> str | None:
        if client_ip is None:
            return None
        try:
            value = self.keyspace.ip_value(client_ip)
        except BadRequest:
            return None
        return self.keyspace.signin_key(self.keyspace.subject((("ip", value),)))

    async def wait_ms(self, client_ip: str | None) -> int:
        """0 when this client may try; else the ms until it may try again."""
        key = self._key(client_ip)
        if key is None:
            return 0
        try:
            async with store_call():
                pipe = self.redis.pipeline(transaction=False)
                pipe.get(key)
                pipe.pttl(key)
                count, ttl = await pipe.execute()
        except StoreUnavailable:
            return 0
        if count is None or int(count) < self.limit:
            return 0
        return max(int(ttl), 1000)

    async def failed(self, client_ip: str | None) -> None:
        """Count one failed sign-in (the first one opens the window)."""
        key = self._key(client_ip)
        if key is None:
            return
        try:
            async with store_call():
                pipe = self.redis.pipeline(transaction=False)
                pipe.incr(key)
                pipe.pexpire(key, self.window_ms, nx=True)
                count, _ = await pipe.execute()
        except StoreUnavailable:
            return
        if int(count) == self.limit:
            log.warning("admin page: %d failed sign-ins from one client network; refusing it "
                        "for up to %d min", self.limit, self.window_ms // 60_000)

    async def succeeded(self, client_ip: str | None) -> None:
        """A valid token: forget this client's failures."""
        key = self._key(client_ip)
        if key is None:
            return
        with contextlib.suppress(StoreUnavailable):
            async with store_call():
                await self.redis.delete(key)
