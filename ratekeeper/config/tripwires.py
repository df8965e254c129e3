"""Tripwires and alerts in the rules file: ``[tripwires.<name>]`` and ``[alerts]``.

A tripwire watches the decisions of one action across every process and instance; when as
many as its threshold happen within its window it turns a kill switch on for a while (or, in
shadow mode, only says that it would have). ``[alerts]`` lists the webhooks every event is
posted to. Both are parsed here and validated against the actions and flags of the file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from limits import parse_many

__all__ = ["COUNTED", "Alerting", "Tripwire", "parse_alerts", "parse_tripwires"]

Counted = Literal["allowed", "denied", "all"]
COUNTED: tuple[Counted, ...] = ("allowed", "denied", "all")
MAX_WEBHOOKS = 10

# where (a dotted key), what is wrong
Report = Callable[[str, str], None]


@dataclass(frozen=True, slots=True)
class Tripwire:
    """Trips when ``threshold`` decisions of ``action`` (those ``counted``) happen within
    ``window`` seconds: turns ``flag`` on for ``duration`` seconds, unless ``shadow``."""

    name: str
    action: str
    counted: Counted
    threshold: int
    window: int  # seconds
    flag: str
    duration: int  # seconds
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class Alerting:
    """Where alerts go: webhook URLs (http or https), each sent every event."""

    webhooks: tuple[str, ...] = ()


def parse_tripwires(value: object, *, actions: Mapping[str, object],
                    flags: Mapping[str, object], names_ok: Callable[[str], bool],
                    duration: Callable[[object], int], error: Report
                    ) -> dict[str, Tripwire]:
    """The ``[tripwires]`` table, checked against the file's actions and flags."""
    if not isinstance(value, dict):
        error("tripwires", "must be a table of [tripwires.<name>] tables")
        return {}
    wires: dict[str, Tripwire] = {}
    for name, data in value.items():
        where = f"tripwires.{name}"
        if not names_ok(name):
            error(where, "names use a-z, 0-9, '.', '_' and '-' (at most 64)")
            continue
        if not isinstance(data, dict):
            error(where, "must be a table")
            continue
        wire = _tripwire(name, data, where, actions, flags, duration, error)
        if wire is not None:
            wires[name] = wire
    return wires


def _tripwire(name: str, data: dict[str, Any], where: str, actions: Mapping[str, object],
              flags: Mapping[str, object], duration: Callable[[object], int],
              error: Report) -> Tripwire | None:
    allowed = {"action", "count", "threshold", "flag", "duration", "shadow"}
    ok = True
    for key in data:
        if key not in allowed:
            error(f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
            ok = False
    action = data.get("action")
    if not isinstance(action, str) or action not in actions:
        error(f"{where}.action", "must name a declared action")
        ok = False
    counted = data.get("count", "all")
    if counted not in COUNTED:
        error(f"{where}.count", 'must be one of "allowed", "denied", "all"')
        ok = False
    flag = data.get("flag")
    if not isinstance(flag, str) or flag not in flags:
        error(f"{where}.flag", "must name a declared flag")
        ok = False
    window = _threshold(data.get("threshold"), f"{where}.threshold", error)
    seconds = 0
    if "duration" not in data:
        error(f"{where}.duration", 'is required: how long the flag stays on, e.g. "1 hour"')
        ok = False
    else:
        try:
            seconds = duration(data["duration"])
        except ValueError as exc:
            error(f"{where}.duration", str(exc))
            ok = False
        else:
            if seconds < 1:
                error(f"{where}.duration", "must be at least one second")
                ok = False
    shadow = data.get("shadow", False)
    if not isinstance(shadow, bool):
        error(f"{where}.shadow", "must be true or false")
        ok = False
    if not ok or window is None:
        return None
    return Tripwire(name=name, action=str(action), counted=counted, threshold=window[0],
                    window=window[1], flag=str(flag), duration=seconds, shadow=shadow)


def _threshold(value: object, where: str, error: Report) -> tuple[int, int] | None:
    """(hits, seconds) of one limit such as ``"300 per 10 minutes"``."""
    if not isinstance(value, str) or not value.strip():
        error(where, 'is required, one limit such as "300 per 10 minutes"')
        return None
    try:
        items = parse_many(value)
    except ValueError:
        error(where, f'cannot parse "{value}" (write e.g. "300 per 10 minutes")')
        return None
    if len(items) != 1:
        error(where, "must be one limit, not several")
        return None
    item = items[0]
    if item.amount < 1:
        error(where, "must be at least 1")
        return None
    return int(item.amount), int(item.get_expiry())


def parse_alerts(value: object, error: Report) -> Alerting:
    """The ``[alerts]`` table."""
    if not isinstance(value, dict):
        error("alerts", "must be a table")
        return Alerting()
    for key in value:
        if key != "webhooks":
            error(f"alerts.{key}", "unknown key (allowed: webhooks)")
    hooks = value.get("webhooks", [])
    if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
        error("alerts.webhooks", "must be a list of URLs")
        return Alerting()
    if len(hooks) > MAX_WEBHOOKS:
        error("alerts.webhooks", f"lists more than {MAX_WEBHOOKS} URLs")
        return Alerting()
    if len(set(hooks)) != len(hooks):
        error("alerts.webhooks", "lists a URL twice")
    for index, hook in enumerate(hooks):
        try:
            parts = urlsplit(hook)
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            usable = False
        if not usable:
            # (not repeated: a webhook URL often carries its own secret)
            error(f"alerts.webhooks[{index}]", "must be an http:// or https:// URL")
    return Alerting(webhooks=tuple(dict.fromkeys(hooks)))
