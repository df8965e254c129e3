"""Kill switches: the state of every declared flag, as this process last knew it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .config import Flag

__all__ = ["FlagBoard", "FlagState"]


@dataclass(frozen=True, slots=True)
class FlagState:
    """One flag as last synced: on or off, what users are told, who changed it and when."""

    name: str
    enabled: bool = False
    message: str = ""
    updated_by: str | None = None
    updated_at: float | None = None
    expires_at: float | None = None


class FlagBoard:
    """The local view of flag state; a check reads it without asking Redis."""

    def __init__(self, declared: Mapping[str, Flag]) -> None:
        self.declared = dict(declared)
        self._states: dict[str, FlagState] = {name: FlagState(name) for name in declared}

    def replace(self, states: Iterable[FlagState]) -> None:
        """Swap in a fresh snapshot (from Redis) of every flag's state."""
        fresh = {name: FlagState(name) for name in self.declared}
        for state in states:
            if state.name in fresh:
                fresh[state.name] = state
        self._states = fresh

    def get(self, name: str) -> FlagState:
        """The state of one declared flag."""
        return self._states[name]

    def all(self) -> list[FlagState]:
        """Every declared flag, by name."""
        return [self._states[name] for name in sorted(self._states)]

    def blocking(self, names: Iterable[str], now: float) -> FlagState | None:
        """The first of ``names`` that is on (and not past its expiry), or None."""
        for name in names:
            state = self._states.get(name)
            if state is not None and state.enabled and (
                state.expires_at is None or state.expires_at > now
            ):
                return state
        return None

    def message_for(self, state: FlagState) -> str:
        """What to show users: the message set with the switch, else the declared default."""
        declared = self.declared.get(state.name)
        return state.message or (declared.message if declared else "") or (
            declared.description if declared else ""
        )
