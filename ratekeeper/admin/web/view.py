"""What the admin page shows: its data gathered from the admin API's code, and text filters.

Every section is read on its own, so a Redis hiccup mid-page blanks one section (it says
so) instead of failing the page. Nothing here can show a raw IP: subjects are hashes, and
the free text (reasons, messages) was refused on the way in if it held one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ratekeeper.admin.api import flag_views
from ratekeeper.admin.common import AdminState
from ratekeeper.api.admin_wire import AuditEvent, BanView, FlagView, TopEntry, TripwireView
from ratekeeper.config.rules import Rule, duration_text
from ratekeeper.errors import StoreUnavailable
from ratekeeper.server.state import Runtime

__all__ = ["FILTERS", "RuleTop", "Sections", "gather"]

AUDIT_SHOWN = 25
TOP_SHOWN = 5


@dataclass(frozen=True, slots=True)
class RuleTop:
    """One rule's most-denied subjects; ``field`` is set when a subject can be banned."""

    rule: Rule
    entries: list[TopEntry]

    @property
    def field(self) -> str | None:
        """The one subject field the rule keys on (a ban of its hash then stops it)."""
        return self.rule.key[0] if len(self.rule.key) == 1 else None


@dataclass(frozen=True, slots=True)
class Sections:
    """The page's data; None where Redis could not be asked for that section."""

    flags: list[FlagView]
    flags_stale: bool
    bans: list[BanView] | None
    audit: list[AuditEvent] | None
    tops: list[RuleTop] | None
    quiet_rules: list[str]  # rules that denied nobody in the last hour
    subject_fields: tuple[str, ...]  # what a ban can name
    tripwires: list[TripwireView] | None = None


async def _or_none(awaitable: Any) -> Any:
    try:
        return await awaitable
    except StoreUnavailable:
        return None


async def _tops(runtime: Runtime) -> tuple[list[RuleTop] | None, list[str]]:
    denials = runtime.checker.denials
    rules = sorted(runtime.checker.config.rules.values(), key=lambda r: r.name)
    if denials is None:
        return [], [r.name for r in rules]
    try:
        found = await asyncio.gather(*(denials.top(rule, TOP_SHOWN) for rule in rules))
    except StoreUnavailable:
        return None, []
    tops = [RuleTop(rule, entries) for rule, entries in zip(rules, found, strict=True)
            if entries]
    return tops, [rule.name for rule, entries in zip(rules, found, strict=True) if not entries]


async def gather(runtime: Runtime, admin: AdminState) -> Sections:
    """Read every section of the page."""
    flags = await flag_views(runtime, admin)
    bans, audit, (tops, quiet), wires = await asyncio.gather(
        _or_none(admin.bans.active(admin.wall())),
        _or_none(admin.audit.recent(AUDIT_SHOWN)),
        _tops(runtime),
        _or_none(admin.tripwires.views()))
    return Sections(flags=flags.flags, flags_stale=flags.stale, bans=bans, audit=audit,
                    tops=tops, quiet_rules=quiet,
                    subject_fields=admin.codecs_for(runtime.checker).subject_fields,
                    tripwires=wires)


# -- text ------------------------------------------------------------------------------------

def clock(at: float | None) -> str:
    """``2026-11-21 19:47:25 UTC``."""
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def relative(at: float | None, now: float) -> str:
    """``5 min ago`` or ``in 2 h``."""
    if at is None:
        return "-"
    delta = at - now
    if abs(delta) < 1:
        return "now"
    return f"in {duration_text(delta)}" if delta > 0 else f"{duration_text(-delta)} ago"


def detail(values: Mapping[str, Any]) -> str:
    """An audit event's detail as one short line."""
    shown = []
    for key, value in values.items():
        if key in ("duration", "expires_in") and isinstance(value, int | float):
            text = duration_text(value)
        elif key.endswith("_at") and isinstance(value, int | float):
            text = clock(value)
        elif isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, Mapping):
            text = ", ".join(f"{k} {v}" for k, v in value.items())
        else:
            text = str(value)
        shown.append(f"{key.replace('_', ' ')}: {text}")
    return " · ".join(shown)


def rate(value: float | None) -> str:
    """Decisions per second, to a sensible precision."""
    if value is None:
        return "?"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


FILTERS: dict[str, Callable[..., str]] = {
    "span": duration_text, "clock": clock, "relative": relative, "detail": detail, "rate": rate}
