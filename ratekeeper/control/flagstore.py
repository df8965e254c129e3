"""Where flag state lives: one Redis HASH (one slot), read whole, written one flag at a time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgspec

from ratekeeper.decision.flags import FlagBoard, FlagState
from ratekeeper.storage.scripts import LuaScript, read_script
from ratekeeper.storage.storecall import store_call

__all__ = ["EXPIRY_ACTOR", "FlagStore"]

log = logging.getLogger("ratekeeper.decision.flags")

# Who the flags list and the audit trail name when an expiry turned a flag off.
EXPIRY_ACTOR = "ratekeeper"


class FlagRecord(msgspec.Struct, frozen=True, omit_defaults=True):
    """A flag's state as stored: the HASH field is the name."""

    enabled: bool
    message: str = ""
    updated_by: str | None = None
    updated_at: float | None = None
    expires_at: float | None = None


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(FlagRecord).decode


def encode_state(state: FlagState) -> bytes:
    """The stored JSON of one flag's state."""
    return _encode(FlagRecord(enabled=state.enabled, message=state.message,
                              updated_by=state.updated_by, updated_at=state.updated_at,
                              expires_at=state.expires_at))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class FlagStore:
    """Reads and writes the flags HASH; every Redis failure is StoreUnavailable."""

    def __init__(self, redis: Any, key: str) -> None:
        self.redis = redis
        self.key = key
        self._set_script = LuaScript(redis, "flag_set", read_script("flag_set"))
        self._expire = LuaScript(redis, "flag_expire", read_script("flag_expire"))

    async def load(self) -> list[FlagState] | None:
        """Every stored flag state, or None when Redis holds none at all."""
        async with store_call():
            raw = await self.redis.hgetall(self.key)
        if not raw:
            return None
        states = []
        for name, value in raw.items():
            try:
                record = _decode(value)
            except msgspec.DecodeError:
                log.error("ignoring an unreadable state of flag %r in Redis", _text(name))
                continue
            states.append(FlagState(name=_text(name), enabled=record.enabled,
                                    message=record.message, updated_by=record.updated_by,
                                    updated_at=record.updated_at,
                                    expires_at=record.expires_at))
        return states

    async def put(self, state: FlagState | None, restore: Sequence[FlagState] = ()) -> bool:
        """Write ``state`` (if any); restore the snapshot ``restore`` if Redis lost the HASH.

        Returns True when the snapshot was restored.
        """
        args: list[str | bytes] = ["", ""] if state is None else [state.name,
                                                                  encode_state(state)]
        for known in restore:
            args += [known.name, encode_state(known)]
        async with store_call():
            restored = await self._set_script(keys=[self.key], args=args)
        return bool(restored)

    async def set(self, board: FlagBoard, state: FlagState) -> None:
        """Write a flag's new ``state`` and make it this process's at once (``board``); the
        board's other flags restore the HASH if Redis lost it. Raises StoreUnavailable."""
        restore = ([s for s in board.recorded() if s.name != state.name]
                   if board.seen_in_store else [])
        await self.put(state, restore)
        board.seen_in_store = True
        board.update(state)

    async def expire(self, state: FlagState, now: float) -> FlagState | None:
        """Turn off ``state`` (on, past its expiry); the new state if this call did it."""
        off = FlagState(name=state.name, enabled=False, message=state.message,
                        updated_by=EXPIRY_ACTOR, updated_at=now, expires_at=None)
        async with store_call():
            done = await self._expire(keys=[self.key],
                                      args=[state.name, encode_state(state), encode_state(off)])
        return off if done else None
