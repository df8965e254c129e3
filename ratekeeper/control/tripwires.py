"""Tripwires: a kill switch that turns itself on when an action's traffic passes a threshold.

A tripwire (``[tripwires.<name>]``) counts the decisions of one action, across every process
and instance, in ``traffic.lua``'s shared counter. When the count within its window reaches
its threshold, that script sets the tripwire's trip key (NX, expiring after the trip's
duration) in the same step, so however many processes see the threshold at once one of them
trips it; that one then:

1. turns the flag on, expiring after ``duration`` (``updated_by`` ``tripwire:<name>``), in the
   flags HASH, and announces it, as an admin's change would be (unless ``shadow``);
2. appends an audit event: actor ``tripwire:<name>``, kind ``tripwire``, target the flag, the
   count it saw in its detail;
3. sends an alert.

It does not trip again while its flag is on or its trip key lives (``duration``). Admins can
disarm a tripwire (it goes on counting but never trips) and re-arm it, which also clears a
trip, so it may trip again at once. Disarmed tripwires are a HASH without expiry, like the
flags: an admin's decision stands until an admin changes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from ratekeeper.api.admin_wire import AuditEvent, TripwireView
from ratekeeper.config.rules import Config, duration_text
from ratekeeper.config.tripwires import Tripwire
from ratekeeper.control.alerts import Alerts, BreakerWatch
from ratekeeper.control.audit import AuditLog
from ratekeeper.control.flagstore import FlagStore
from ratekeeper.control.sync import Event, StateSync
from ratekeeper.control.traffic import Traffic
from ratekeeper.decision.flags import FlagBoard, FlagState
from ratekeeper.errors import StoreUnavailable
from ratekeeper.metrics import Metrics
from ratekeeper.storage.scripts import LuaScript, read_script
from ratekeeper.storage.storecall import flush_every, store_call

__all__ = ["FLUSH_SECONDS", "Tripwires", "actor_of"]

log = logging.getLogger("ratekeeper.control.tripwires")

FLUSH_SECONDS = 1.0  # how often each process adds its decisions to the shared counts


class Disarmed(msgspec.Struct, frozen=True):
    """Who disarmed a tripwire, when and why (a field of the disarmed HASH)."""

    by: str
    at: float
    reason: str = ""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Disarmed).decode


def actor_of(wire: Tripwire) -> str:
    """The name the flags list and the audit trail give a tripwire."""
    return f"tripwire:{wire.name}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _clock(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


class Tripwires:
    """Trips the config's tripwires from the shared counts, and shows and changes their state."""

    def __init__(self, traffic: Traffic, config: Callable[[], Config], board: FlagBoard,
                 flagstore: FlagStore, audit: AuditLog, sync: StateSync, alerts: Alerts,
                 metrics: Metrics | None, wall: Callable[[], float]) -> None:
        self.traffic = traffic
        self.config = config  # the live config (a reload swaps it)
        self.board = board
        self.flagstore = flagstore
        self.audit = audit
        self.sync = sync
        self.alerts = alerts
        self.metrics = metrics
        self.wall = wall
        self.redis = traffic.redis
        self.keys = traffic.keys
        self._state = LuaScript(self.redis, "tripwire_state", read_script("tripwire_state"))
        # trips won in Redis whose flag could not be written yet: (wire, count, when won)
        self._owed: list[tuple[Tripwire, int, float]] = []

    def get(self, name: str) -> Tripwire | None:
        """The tripwire ``name`` of the live config."""
        return self.config().tripwires.get(name)

    async def flush(self) -> list[tuple[Tripwire, int]]:
        """Add this process's decisions to the shared counts and react to what tripped (and
        to a trip an earlier flush won but could not act on). Raises StoreUnavailable (the
        counts, and the trips not acted on, are kept for the next flush)."""
        wires = list(self.config().tripwires.values())
        now = self.wall()
        trips = await self.traffic.record(wires, lambda w: self.board.is_on(w.flag, now))
        # a trip this process won in Redis is its alone to act on: no other process will
        owed, self._owed = self._owed, []
        todo = [(wire, count, now) for wire, count in trips] + [
            (wire, count, at) for wire, count, at in owed if now < at + wire.duration]
        for i, (wire, count, at) in enumerate(todo):
            try:
                await self.trip(wire, count, at)
            except StoreUnavailable:
                self._owed = todo[i:]
                raise
        return [(wire, count) for wire, count, _ in todo]

    async def flush_forever(self, breaker: Callable[[], str],
                            interval: float = FLUSH_SECONDS) -> None:
        """Every ``interval``: alert on a change of the circuit breaker's state, then flush
        (while Redis is unavailable the counts wait for the next time). Until cancelled."""
        watch = BreakerWatch(self.alerts)

        async def round_() -> None:
            watch.look(breaker())
            await self.flush()

        await flush_every(interval, round_, "traffic counts", log)

    async def trip(self, wire: Tripwire, count: int, at: float | None = None) -> None:
        """What a trip does (this process won it in Redis at ``at``, default now): the flag,
        the audit, the alert. Raises StoreUnavailable before it has done any of them."""
        now = self.wall()
        actor = actor_of(wire)
        seen = (f"{count} {wire.action} decisions ({wire.counted}) within "
                f"{duration_text(wire.window)} reached its threshold of {wire.threshold}")
        detail: dict[str, Any] = {"count": count, "threshold": wire.threshold,
                                  "window": wire.window, "action": wire.action,
                                  "counted": wire.counted}
        if wire.shadow:
            if self.metrics is not None:
                self.metrics.tripped(wire.name, wire.shadow)
            detail["shadow"] = True
            log.warning("tripwire %s (shadow) would have tripped: %s; %s stays as it is",
                        wire.name, seen, wire.flag)
            await self.audit.record(AuditEvent(at=now, actor=actor, kind="tripwire",
                                               target=wire.flag, detail=detail))
            self.alerts.send("tripwire", f"Tripwire {wire.name} (shadow) would have tripped: "
                                         f"{seen}. {wire.flag} was not turned on.",
                             tripwire=wire.name, shadow=True, flag=wire.flag, **_fields(detail))
            return
        # the trip's duration runs from when it was won, as its trip key's TTL does
        until = (now if at is None else at) + wire.duration
        state = FlagState(name=wire.flag, enabled=True, message="", updated_by=actor,
                          updated_at=now, expires_at=until)
        await self.flagstore.set(self.board, state)
        if self.metrics is not None:
            self.metrics.tripped(wire.name, wire.shadow)
        detail.update(duration=wire.duration, expires_at=until)
        log.warning("tripwire %s tripped: %s; %s is on for %s", wire.name, seen, wire.flag,
                    duration_text(wire.duration))
        await self.audit.record(AuditEvent(at=now, actor=actor, kind="tripwire",
                                           target=wire.flag, detail=detail))
        await self.sync.announce(Event(kind="flags"))
        self.alerts.send("tripwire", f"Tripwire {wire.name} tripped: {seen}. {wire.flag} is on "
                                     f"for {duration_text(wire.duration)}, until {_clock(until)}.",
                         tripwire=wire.name, shadow=False, flag=wire.flag, **_fields(detail))

    async def views(self) -> list[TripwireView]:
        """Every tripwire of the live config with its shared state. Raises StoreUnavailable."""
        wires = sorted(self.config().tripwires.values(), key=lambda w: w.name)
        keys = [self.keys.tripwires_disarmed_key()]
        args: list[str | int] = ["" if self.traffic.now_ms is None else self.traffic.now_ms()]
        for wire in wires:
            keys += [self.keys.tripwire_counter_key(wire.name),
                     self.keys.tripwire_trip_key(wire.name)]
            args.append(wire.window * 1000)
        async with store_call():
            reply = await self._state(keys=keys, args=args)
        now_ms = int(reply[0])
        disarmed: dict[str, Disarmed] = {}
        rest = reply[1 + 2 * len(wires):]
        for name, raw in zip(rest[::2], rest[1::2], strict=True):
            try:
                disarmed[_text(name)] = _decode(raw)
            except msgspec.DecodeError:
                disarmed[_text(name)] = Disarmed(by="?", at=0.0)
        views = []
        for i, wire in enumerate(wires):
            count, pttl = int(reply[1 + 2 * i]), int(reply[2 + 2 * i])
            off = disarmed.get(wire.name)
            views.append(TripwireView(
                name=wire.name, action=wire.action, count=wire.counted,
                threshold=wire.threshold, window=wire.window, flag=wire.flag,
                duration=wire.duration, shadow=wire.shadow, armed=off is None,
                seen=count,
                tripped_until=(now_ms + pttl) / 1000 if pttl > 0 else None,
                disarmed_by=off.by if off else None, disarmed_at=off.at if off else None,
                reason=off.reason if off else ""))
        return views

    async def view(self, name: str) -> TripwireView | None:
        """One tripwire's state."""
        return next((v for v in await self.views() if v.name == name), None)

    async def set_armed(self, wire: Tripwire, armed: bool, by: str, reason: str) -> None:
        """Disarm (it counts, never trips) or re-arm (a trip that lives is cleared too), with
        an audit event and an alert. Raises StoreUnavailable."""
        now = self.wall()
        async with store_call():
            pipe = self.redis.pipeline(transaction=False)
            if armed:
                pipe.hdel(self.keys.tripwires_disarmed_key(), wire.name)
                pipe.delete(self.keys.tripwire_trip_key(wire.name))
            else:
                pipe.hset(self.keys.tripwires_disarmed_key(), wire.name,
                          _encode(Disarmed(by=by, at=now, reason=reason)))
            await pipe.execute()
        verb = "re-armed" if armed else "disarmed"
        kind = "tripwire-arm" if armed else "tripwire-disarm"
        await self.audit.record(AuditEvent(at=now, actor=by, kind=kind, target=wire.name,
                                           reason=reason))
        log.info("tripwire %s %s by %s", wire.name, verb, by)
        self.alerts.send(kind,
                         f"{by} {verb} tripwire {wire.name}" + (f": {reason}" if reason else ""),
                         tripwire=wire.name, by=by, reason=reason)


def _fields(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in detail.items() if k not in ("shadow",)}
