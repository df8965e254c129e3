"""Kill switches: the state of every declared flag, as this process last knew it.

A flag Redis holds no state for (never set, Redis not yet readable, or its data lost) has
the state its config declares with ``assume`` (off unless said): so a sidecar that starts
while Redis is down can start with ``read-only`` on, and every process that reads Redis
agrees with it until an admin sets the flag, which records a state that then wins.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ratekeeper.config.rules import Flag

__all__ = ["SHADOW_FLAG", "FlagBoard", "FlagState"]

# Always available, declared or not: while on, no rule denies (bans still do).
SHADOW_FLAG = "shadow-mode"
SHADOW_DESCRIPTION = ("Global shadow mode: every limit is computed, counted and reported, "
                      "none denies (bans still apply)")


@dataclass(frozen=True, slots=True)
class FlagState:
    """One flag as last synced: on or off, what users are told, who changed it and when."""

    name: str
    enabled: bool = False
    message: str = ""
    updated_by: str | None = None
    updated_at: float | None = None
    expires_at: float | None = None
    assumed: bool = False  # no state in Redis: the config's ``assume`` decided

    def is_on(self, now: float) -> bool:
        """On and not past its expiry."""
        return self.enabled and (self.expires_at is None or self.expires_at > now)


class FlagBoard:
    """The local view of flag state; a check reads it without asking Redis."""

    def __init__(self, declared: Mapping[str, Flag]) -> None:
        self.declared = dict(declared)
        self.declared.setdefault(SHADOW_FLAG, Flag(SHADOW_FLAG, SHADOW_DESCRIPTION))
        self._states: dict[str, FlagState] = self._assumed()
        # True once Redis was seen holding flag state: if it later holds none, Redis lost it
        self.seen_in_store = False

    def _assumed(self) -> dict[str, FlagState]:
        """Every declared flag in the state its config assumes."""
        return {name: FlagState(name, enabled=flag.assume, assumed=True)
                for name, flag in self.declared.items()}

    def replace(self, states: Iterable[FlagState]) -> None:
        """Swap in a fresh snapshot (from Redis) of every flag's state; a flag it does not
        hold keeps to its assumed state."""
        fresh = self._assumed()
        for state in states:
            if state.name in fresh:
                fresh[state.name] = state
        self._states = fresh

    def update(self, state: FlagState) -> None:
        """Set one declared flag's state (after this process wrote it to Redis)."""
        if state.name in self.declared:
            self._states = {**self._states, state.name: state}

    def get(self, name: str) -> FlagState:
        """The state of one declared flag."""
        return self._states[name]

    def all(self) -> list[FlagState]:
        """Every declared flag, by name."""
        return [self._states[name] for name in sorted(self._states)]

    def recorded(self) -> list[FlagState]:
        """The flags whose state came from an admin change (the ones Redis should hold)."""
        return [state for state in self.all() if state.updated_at is not None]

    def is_on(self, name: str, now: float) -> bool:
        """True when flag ``name`` is declared, on and not expired."""
        state = self._states.get(name)
        return state is not None and state.is_on(now)

    def blocking(self, names: Iterable[str], now: float) -> FlagState | None:
        """The first of ``names`` that is on (and not past its expiry), or None."""
        for name in names:
            state = self._states.get(name)
            if state is not None and state.is_on(now):
                return state
        return None

    def off_at(self, names: Iterable[str], now: float) -> float | None:
        """When every one of ``names`` that is on will be off by itself: the latest expiry
        among them, or None when one of them has none."""
        latest = now
        for name in names:
            state = self._states.get(name)
            if state is not None and state.is_on(now):
                if state.expires_at is None:
                    return None
                latest = max(latest, state.expires_at)
        return latest

    def message_for(self, state: FlagState) -> str:
        """What to show users: the message set with the switch, else the declared default."""
        declared = self.declared.get(state.name)
        return state.message or (declared.message if declared else "") or (
            declared.description if declared else ""
        )
