"""The audit trail: every admin change, appended to a capped Redis stream.

An event names its actor by the token's name, and subjects only by their hashes; the API
refuses free text that holds an IP or a token, so neither ever reaches the stream.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from ratekeeper.api.admin_wire import AuditEvent
from ratekeeper.errors import StoreUnavailable
from ratekeeper.storage.storecall import store_call

__all__ = ["AUDIT_MAXLEN", "AuditLog"]

log = logging.getLogger("ratekeeper.control.audit")

# Roughly how many events are kept (XADD MAXLEN ~); older ones are trimmed.
AUDIT_MAXLEN = 10_000

_encode = msgspec.json.Encoder().encode
_decode_detail = msgspec.json.Decoder(dict[str, Any]).decode


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class AuditLog:
    """Appends events to, and reads them back from, one capped stream."""

    def __init__(self, redis: Any, key: str, *, maxlen: int = AUDIT_MAXLEN) -> None:
        self.redis = redis
        self.key = key
        self.maxlen = maxlen

    async def append(self, event: AuditEvent) -> None:
        """Add one event; raises StoreUnavailable when Redis cannot take it."""
        fields = {"at": repr(event.at), "actor": event.actor, "kind": event.kind,
                  "target": event.target, "detail": _encode(event.detail),
                  "reason": event.reason}
        async with store_call():
            await self.redis.xadd(self.key, fields, maxlen=self.maxlen, approximate=True)

    async def record(self, event: AuditEvent) -> bool:
        """Add one event after a change was made: a failure is logged, not raised."""
        try:
            await self.append(event)
        except StoreUnavailable:  # the change itself stands; say loudly that it is unaudited
            log.error("could not append %s event on %s by %s to the audit trail",
                      event.kind, event.target, event.actor)
            return False
        return True

    async def recent(self, limit: int) -> list[AuditEvent]:
        """The last ``limit`` events, newest first."""
        async with store_call():
            entries = await self.redis.xrevrange(self.key, count=limit)
        events = []
        for entry_id, raw in entries:
            fields = {_text(k): _text(v) for k, v in raw.items()}
            try:
                detail = _decode_detail(fields.get("detail", "{}"))
                at = float(fields.get("at", "0"))
            except (msgspec.DecodeError, ValueError):
                detail, at = {}, 0.0
            events.append(AuditEvent(at=at, actor=fields.get("actor", ""),
                                     kind=fields.get("kind", ""),
                                     target=fields.get("target", ""), detail=detail,
                                     reason=fields.get("reason", ""), id=_text(entry_id)))
        return events
