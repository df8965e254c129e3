"""Bans: a key per banned subject that check.lua honours, and an index to list them by.

A ban's id is the subject's keyed hash, so banning a subject again replaces its ban and a
retry after a failure is always safe. The ban key (``rk:{hash}:b``) lives in the subject's
slot and expires with the ban; the index (one HASH in its own slot) is what ``list`` reads,
and entries past their expiry are dropped from it as it is read. Neither holds a raw value.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from ratekeeper.api.admin_wire import BanView
from ratekeeper.errors import StoreUnavailable
from ratekeeper.storage.storecall import store_call

__all__ = ["BanBook"]

log = logging.getLogger("ratekeeper.control.bans")

# The index outlives its longest ban by this much, then goes by itself.
INDEX_SLACK_MS = 60_000


class BanRecord(msgspec.Struct, frozen=True):
    """A ban as the index stores it; the HASH field is its id."""

    field: str
    reason: str
    created_by: str
    created_at: float
    expires_at: float


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(BanRecord).decode


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class BanBook:
    """Adds, lists and lifts bans; every Redis failure is StoreUnavailable."""

    def __init__(self, redis: Any, index_key: str) -> None:
        self.redis = redis
        self.index_key = index_key

    async def add(self, ban: BanView, ban_key: str, duration_ms: int) -> None:
        """Ban (enforced first, then listed); idempotent, so a retry after a failure is safe."""
        record = BanRecord(field=ban.field, reason=ban.reason, created_by=ban.created_by,
                           created_at=ban.created_at, expires_at=ban.expires_at)
        ttl = duration_ms + INDEX_SLACK_MS
        async with store_call():
            await self.redis.set(ban_key, "1", px=duration_ms)
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(self.index_key, ban.id, _encode(record))
            # the index lives as long as its longest ban: set a TTL if none, else only grow it
            pipe.pexpire(self.index_key, ttl, nx=True)
            pipe.pexpire(self.index_key, ttl, gt=True)
            await pipe.execute()

    async def lift(self, ban_id: str, ban_key: str) -> bool:
        """Remove a ban; False when there was none."""
        async with store_call():
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(ban_key)
            pipe.hdel(self.index_key, ban_id)
            deleted, unlisted = await pipe.execute()
        return bool(deleted or unlisted)

    async def active(self, now: float) -> list[BanView]:
        """Every ban not yet expired, newest first; expired entries are pruned on the way."""
        async with store_call():
            raw = await self.redis.hgetall(self.index_key)
        bans, expired = [], []
        for key, value in raw.items():
            ban_id = _text(key)
            try:
                record = _decode(value)
            except msgspec.DecodeError:
                log.error("ignoring an unreadable ban entry in Redis")
                continue
            if record.expires_at <= now:
                expired.append(ban_id)
                continue
            bans.append(BanView(id=ban_id, field=record.field, reason=record.reason,
                                created_by=record.created_by, created_at=record.created_at,
                                expires_at=record.expires_at))
        if expired:
            try:
                async with store_call():
                    await self.redis.hdel(self.index_key, *expired)
            except StoreUnavailable:  # pruning is housekeeping; the next read tries again
                log.debug("could not prune %d expired ban entries", len(expired))
        bans.sort(key=lambda ban: ban.created_at, reverse=True)
        return bans
