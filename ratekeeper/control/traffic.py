"""The shared picture of traffic: every process's decisions, counted together in Redis.

Each process tallies its decisions in memory (``Metrics.take_traffic``: the counts the
Prometheus flush already makes, so a check pays nothing for them) and, about once a second,
adds them in one ``traffic.lua`` call to:

- one HASH per minute, ``<action>|<category>`` and ``rule|<rule>|<category>`` -> count,
  expiring an hour after its minute began (as the top lists' minutes do, no key of the picture
  outlives the hour it shows): the admin page's chart and its rules that deny most;
- each tripwire's counter, which the same call compares with the tripwire's threshold
  (``tripwires.py`` reacts to a trip).

A decision falls in one category: ``allowed`` (shadow-mode denials included), ``limited`` (a
rule's window), ``boxed`` (a rule's penalty box), ``banned`` (an admin's ban), ``disabled`` (a
kill switch) or ``degraded`` (Redis could not be asked; the fail mode decided). A tripwire
counting ``allowed`` counts the first, ``denied`` the four after it, ``all`` every one.

Every key (named by ``Keyspace``) shares the hash tag ``{traffic}``, so on a Cluster one call
reaches them all. Counts that could not reach Redis are kept for the next call (they land a
second or so late), so a moment without Redis loses no wave.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ratekeeper.config.tripwires import Tripwire
from ratekeeper.identity.keys import Keyspace
from ratekeeper.metrics import Metrics
from ratekeeper.storage.scripts import LuaScript, read_script
from ratekeeper.storage.storecall import store_call

__all__ = ["CATEGORIES", "DENIED", "MINUTES", "Picture", "Traffic", "category"]

log = logging.getLogger("ratekeeper.control.traffic")

CATEGORIES = ("allowed", "limited", "boxed", "banned", "disabled", "degraded")
DENIED = frozenset({"limited", "boxed", "banned", "disabled"})
MINUTES = 60  # the picture's span: a minute's HASH expires this long after it began
MAX_PENDING = 10_000  # distinct tallies kept while Redis is away (bounded by the config anyway)
_OUTCOMES = {"allowed": "allowed", "shadow": "allowed", "rate_limited": "limited",
             "disabled": "disabled", "degraded": "degraded"}


def category(rule: str, outcome: str) -> str:
    """The category of a decision by its metric outcome and deciding rule."""
    if outcome == "banned":
        return "boxed" if rule else "banned"  # a penalty box names its rule; a ban, none
    return _OUTCOMES.get(outcome, "allowed")


def counts_for(wire: Tripwire, category: str) -> bool:
    """Whether ``wire`` counts decisions of ``category``."""
    if wire.counted == "all":
        return True
    if wire.counted == "allowed":
        return category == "allowed"
    return category in DENIED


@dataclass(frozen=True, slots=True)
class Picture:
    """The last ``MINUTES`` minutes of every process's decisions, oldest minute first."""

    first_minute: int  # Unix seconds // 60 of the first column
    # action -> category -> one count per minute
    actions: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    # rule -> category (limited: its windows, boxed: its penalty box) -> denials in the span
    rules: dict[str, dict[str, int]] = field(default_factory=dict)

    def total(self, action: str, categories: Iterable[str] = CATEGORIES) -> int:
        """Decisions of ``action`` in ``categories`` over the whole span."""
        series = self.actions.get(action, {})
        return sum(sum(series.get(c, ())) for c in categories)

    def denying_rules(self) -> list[tuple[str, dict[str, int]]]:
        """Rules with denials in the span, the most denying first."""
        return sorted(self.rules.items(), key=lambda item: (-sum(item[1].values()), item[0]))


def _int(value: Any) -> int:
    return int(value.decode() if isinstance(value, bytes) else value)


class Traffic:
    """Adds this process's decisions to the shared counts; reads the picture back."""

    def __init__(self, redis: Any, keys: Keyspace, metrics: Metrics,
                 wall: Callable[[], float], *, now_ms: Callable[[], int] | None = None
                 ) -> None:
        self.redis = redis
        self.keys = keys  # names the keys (``traffic_minute_key``, ``tripwire_*_key``)
        self.metrics = metrics
        self.wall = wall  # names the minute
        self.now_ms = now_ms  # a test clock for the tripwire windows; None: Redis TIME
        self._record = LuaScript(redis, "traffic", read_script("traffic"))
        self._pending: dict[tuple[str, str, str], int] = {}
        metrics.tapped = True

    def take(self) -> dict[tuple[str, str, str], int]:
        """What was decided since the last take, with what an earlier call could not write."""
        taken = self.metrics.take_traffic()
        pending, self._pending = self._pending, {}
        for key, count in taken.items():
            pending[key] = pending.get(key, 0) + count
        return pending

    async def record(self, tripwires: Sequence[Tripwire],
                     blocked: Callable[[Tripwire], bool]) -> list[tuple[Tripwire, int]]:
        """Add what was decided since the last call; the tripwires this call tripped, with
        the count that tripped each. Raises StoreUnavailable (the counts are kept)."""
        tallies = self.take()
        if not tallies:
            return []
        by_field: dict[str, int] = {}
        by_action: dict[str, dict[str, int]] = {}
        for (action, rule, outcome), count in tallies.items():
            kind = category(rule, outcome)
            name = f"{action}|{kind}"
            by_field[name] = by_field.get(name, 0) + count
            seen = by_action.setdefault(action, {})
            seen[kind] = seen.get(kind, 0) + count
            if rule and kind in ("limited", "boxed"):
                name = f"rule|{rule}|{kind}"
                by_field[name] = by_field.get(name, 0) + count
        wires: list[tuple[Tripwire, int]] = []
        for wire in tripwires:
            seen = by_action.get(wire.action, {})
            count = sum(n for kind, n in seen.items() if counts_for(wire, kind))
            if count:
                wires.append((wire, count))
        now = self.wall()
        minute = int(now // 60)
        ttl_ms = max(1, round(((minute + MINUTES) * 60 - now) * 1000))
        keys = [self.keys.traffic_minute_key(minute), self.keys.tripwires_disarmed_key()]
        args: list[str | int] = ["" if self.now_ms is None else self.now_ms(), ttl_ms,
                                 len(by_field)]
        for name, count in by_field.items():
            args += [name, count]
        args.append(len(wires))
        for wire, count in wires:
            keys += [self.keys.tripwire_counter_key(wire.name),
                     self.keys.tripwire_trip_key(wire.name)]
            args += [wire.name, count, wire.threshold, wire.window * 1000,
                     wire.duration * 1000, "1" if blocked(wire) else "0"]
        try:
            async with store_call():
                reply = await self._record(keys=keys, args=args)
        except BaseException:
            self._keep(tallies)
            raise
        return [(wires[_int(reply[i]) - 1][0], _int(reply[i + 1]))
                for i in range(0, len(reply), 2)]

    def _keep(self, tallies: Mapping[tuple[str, str, str], int]) -> None:
        """Keep counts a call could not write, for the next one (bounded)."""
        pending = self._pending
        for key, count in tallies.items():
            if key in pending or len(pending) < MAX_PENDING:
                pending[key] = pending.get(key, 0) + count

    async def picture(self) -> Picture:
        """The last ``MINUTES`` minutes, read from Redis. Raises StoreUnavailable."""
        last = int(self.wall() // 60)
        first = last - MINUTES + 1
        async with store_call():
            pipe = self.redis.pipeline(transaction=False)
            for minute in range(first, last + 1):
                pipe.hgetall(self.keys.traffic_minute_key(minute))
            minutes = await pipe.execute()
        picture = Picture(first_minute=first)
        for column, raw in enumerate(minutes):
            for key, value in raw.items():
                name = key.decode() if isinstance(key, bytes) else str(key)
                parts = name.split("|")
                if len(parts) == 2 and parts[1] in CATEGORIES:
                    series = picture.actions.setdefault(parts[0], {})
                    row = series.setdefault(parts[1], [0] * MINUTES)
                    row[column] += _int(value)
                elif len(parts) == 3 and parts[0] == "rule" and parts[2] in CATEGORIES:
                    denials = picture.rules.setdefault(parts[1], {})
                    denials[parts[2]] = denials.get(parts[2], 0) + _int(value)
        return picture
